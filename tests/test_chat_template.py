"""Chat templates: found wherever transformers keeps them, rendered exactly as transformers'
``apply_chat_template`` renders them, a template that cannot render is an error naming its file, and the plain
format is left for tokenizers with no template at all (said once in the log)."""

import json
import logging

import pytest

from gptjax.data import chat_template
from gptjax.data import vocab as vocab_lib

transformers = pytest.importorskip("transformers")

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

ZEPHYR = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Llama-2 style: BOS per turn, the system prompt folded into the first user turn, strict alternation.
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}
{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}
{% for message in loop_messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if loop.index0 == 0 and system_message != false %}
{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
{% else %}{% set content = message['content'] %}{% endif %}
{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}
{% endfor %}"""
# ChatML with whitespace control, loop.last, a namespace, tools / tojson and a {% generation %} block.
CHATML = """{%- set ns = namespace(turns=0) -%}
{%- if tools %}<|im_start|>system
{{ tools | tojson }}<|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- set ns.turns = ns.turns + 1 -%}
<|im_start|>{{ message.role }}
{% if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}
{%- else %}{{ message.content }}{% endif %}<|im_end|>
{% if loop.last and message.role == 'assistant' %}<!-- {{ ns.turns }} turns -->{% endif %}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""
# Gemma style: no system role, 'model' for the assistant, BOS once, loop.first, a break.
GEMMA = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}
{{ raise_exception('System role not supported') }}{% endif %}
{% for message in messages %}{% if message['content'] == 'STOP' %}{% break %}{% endif %}
{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}
{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}
{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"""

SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
MULTI = [
    {"role": "user", "content": "hi ünïcode"},
    {"role": "assistant", "content": " hello "},
    {"role": "user", "content": "rev abc="},
]
DONE = [*MULTI, {"role": "assistant", "content": "cba"}]
STOPPED = [*MULTI, {"role": "assistant", "content": "STOP"}, {"role": "user", "content": "unseen"}]
CONVERSATIONS = [SYSTEM, MULTI, DONE, MULTI[:1], STOPPED]


def _tokenizer_dir(path, config=None, **files):
    """A tiny word-level tokenizer directory (templates only read the special tokens' text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<pad>", "hi", "hello", "abc"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIALS, **(config or {})}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name, text in files.items():
        (path / name.replace("__", "/")).parent.mkdir(exist_ok=True)
        (path / name.replace("__", "/")).write_text(text)
    return path


def _theirs(path, messages, add_generation_prompt, template=None):
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    return ref.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _ours(path, messages, add_generation_prompt):
    """Our rendering with the BOS text the converters add put back (they add it as an id)."""
    v = vocab_lib.HuggingFaceVocabulary(str(path))
    text = v.render_chat(messages, add_generation_prompt=add_generation_prompt)
    return text, "<s>" + text


@pytest.mark.parametrize("name, template", [("zephyr", ZEPHYR), ("chatml", CHATML), ("gemma", GEMMA)])
def test_rendering_equals_transformers_on_a_set_of_conversations(tmp_path, name, template):
    path = _tokenizer_dir(tmp_path / name, **{"chat_template.jinja": template})
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    v = vocab_lib.HuggingFaceVocabulary(str(path))
    for messages in CONVERSATIONS:
        if name == "gemma" and messages is SYSTEM:
            continue  # refused: below
        for gen in (True, False):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            got = v.render_chat(messages, add_generation_prompt=gen)
            # the converters add BOS as an id, so a template's leading BOS text is not part of ours
            assert got == want.removeprefix("<s>"), (messages, gen)
            assert want.startswith("<s>") == (name == "gemma")
    # the features each template exercises did their work
    if name == "chatml":
        assert v.render_chat(DONE[:2], add_generation_prompt=False).endswith("<!-- 2 turns -->")
    if name == "gemma":
        assert "<start_of_turn>model\nhello<end_of_turn>" in v.render_chat(STOPPED)
        assert "STOP" not in v.render_chat(STOPPED) and "unseen" not in v.render_chat(STOPPED)


def test_llama2_template_with_system_bos_per_turn_and_its_refusal(tmp_path):
    path = _tokenizer_dir(tmp_path / "llama2", {"chat_template": LLAMA2})
    for messages in (SYSTEM, MULTI, DONE, MULTI[:1]):
        for gen in (True, False):
            assert _ours(path, messages, gen)[1] == _theirs(path, messages, gen)
    assert "<<SYS>>\nBe brief.\n<</SYS>>\n\n2+2? [/INST]" in _ours(path, SYSTEM, True)[0]
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        _theirs(path, twice, True)
    with pytest.raises(
        ValueError, match=r"tokenizer_config\.json\['chat_template'\]: .*refuses.*must alternate"
    ):
        _ours(path, twice, True)


@pytest.mark.parametrize(
    "where",
    ["jinja_over_config", "config_string", "config_named_list", "additional_default", "legacy_json"],
)
def test_template_found_wherever_transformers_saves_it(tmp_path, where):
    other = "{% for m in messages %}WRONG{% endfor %}"
    files, config = {}, {}
    if where == "jinja_over_config":  # the .jinja file wins over the config entry, as in transformers
        files["chat_template.jinja"], config["chat_template"] = ZEPHYR, other
    elif where == "config_string":
        config["chat_template"] = ZEPHYR
    elif where == "config_named_list":
        config["chat_template"] = [
            {"name": "tool_use", "template": other},
            {"name": "default", "template": ZEPHYR},
        ]
    elif where == "additional_default":
        files["additional_chat_templates__default.jinja"] = ZEPHYR
        files["additional_chat_templates__tool_use.jinja"] = other
    else:  # older processors' chat_template.json: transformers' tokenizers do not read it; we do
        files["chat_template.json"] = json.dumps({"chat_template": ZEPHYR})
    path = _tokenizer_dir(tmp_path / where, config, **files)
    template = ZEPHYR if where == "legacy_json" else None
    for messages in (SYSTEM, DONE):
        assert _ours(path, messages, True)[0] == _theirs(path, messages, True, template)
    assert vocab_lib.HuggingFaceVocabulary(str(path)).chat_template == ZEPHYR


def test_a_template_we_cannot_render_names_its_file_and_never_falls_back(tmp_path):
    broken = _tokenizer_dir(tmp_path / "broken", **{"chat_template.jinja": "{% for m in messages %}{{ m }"})
    v = vocab_lib.HuggingFaceVocabulary(str(broken))  # a pretraining run never renders chat: no error yet
    with pytest.raises(ValueError, match=r"broken/chat_template\.jinja: .*not valid Jinja \(template line 1"):
        v.render_chat(MULTI)
    odd = _tokenizer_dir(tmp_path / "odd", **{"chat_template.jinja": "{{ messages[0].content.nope() }}"})
    with pytest.raises(ValueError, match=r"odd/chat_template\.jinja: the chat template cannot render"):
        vocab_lib.HuggingFaceVocabulary(str(odd)).render_chat(MULTI)
    gemma = _tokenizer_dir(tmp_path / "gemma", **{"chat_template.jinja": GEMMA})
    with pytest.raises(ValueError, match=r"gemma/chat_template\.jinja: .*refuses.*System role not supported"):
        vocab_lib.HuggingFaceVocabulary(str(gemma)).render_chat(SYSTEM)
    # named templates and no default: the tokenizer loads (as in transformers), chat is refused
    named = _tokenizer_dir(tmp_path / "named", {"chat_template": [{"name": "tool_use", "template": ZEPHYR}]})
    v = vocab_lib.HuggingFaceVocabulary(str(named))
    assert v.encode("hi") == [4]
    with pytest.raises(
        ValueError, match=r"tokenizer_config\.json\['chat_template'\]: .*'tool_use'.*'default'"
    ):
        v.render_chat(MULTI)
    with pytest.raises(Exception, match="default"):
        _theirs(named, MULTI, True)
    only = _tokenizer_dir(tmp_path / "only", **{"additional_chat_templates__tool_use.jinja": ZEPHYR})
    with pytest.raises(ValueError, match=r"only/additional_chat_templates: .*\['tool_use'\]"):
        vocab_lib.HuggingFaceVocabulary(str(only)).render_chat(MULTI)


def test_plain_format_only_without_any_template_and_said_once(tmp_path, caplog):
    path = _tokenizer_dir(tmp_path / "bare")
    v = vocab_lib.HuggingFaceVocabulary(str(path))
    assert v.chat_template is None and chat_template.find(str(path)) is None
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            assert v.render_chat(MULTI[:1]) == "user: hi ünïcode\nassistant: "
    said = [r for r in caplog.records if "has no chat template" in r.getMessage()]
    assert len(said) == 1 and str(path / "tokenizer.json") in said[0].getMessage()


def test_the_plain_template_as_jinja_renders_the_plain_format(tmp_path):
    path = _tokenizer_dir(tmp_path / "plain", **{"chat_template.jinja": vocab_lib.PLAIN_CHAT_TEMPLATE})
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = vocab_lib.render_plain_chat(messages, gen)
            assert _ours(path, messages, gen)[0] == want and _theirs(path, messages, gen) == "<s>" + want

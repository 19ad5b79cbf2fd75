"""Hugging Face chat templates: found wherever transformers saves them, rendered as transformers renders them.

    template = chat_template.find(directory)      # a Template, or None when the tokenizer has none
    text = template.render(messages, add_generation_prompt=True, tokens={"bos_token": "<s>", ...})

Where a tokenizer directory keeps its template, first found wins (transformers' own order):
``chat_template.jinja`` (where current transformers saves it), ``additional_chat_templates/default.jinja``,
``tokenizer_config.json["chat_template"]`` (a string, or a list of named templates: 'default' is used), then
the older processors' ``chat_template.json``. A template is Jinja run in a sandbox with what transformers
gives it (``messages``, ``add_generation_prompt``, ``tools``/``documents`` as None, the special tokens,
``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text, loop controls and
``{% generation %}`` blocks), so its text equals ``tokenizer.apply_chat_template(..., tokenize=False)``.
A template that does not parse or render is an error naming its file; nothing falls back to another format.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

# Where transformers keeps a tokenizer's templates (transformers.utils.hub's names)
JINJA_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
LEGACY_FILE = "chat_template.json"
FILES = (JINJA_FILE, LEGACY_FILE)  # files an export copies (and the TEMPLATE_DIR folder)


@dataclasses.dataclass(frozen=True)
class Template:
    """One chat template: its Jinja text and where it came from (named in every error). ``unusable`` says why
    a tokenizer's templates cannot be used (named ones and no default): as in transformers, the tokenizer
    still loads, for uses without chat, and rendering raises it."""

    text: str
    source: str
    unusable: str = ""

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, tokens: Mapping[str, str]
    ) -> str:
        """The template's text for ``messages``; ``tokens``: special tokens by name (``bos_token``, ...)."""
        if self.unusable:
            raise ValueError(self.unusable)
        compiled = _compile(self.text, self.source)
        # transformers drops keys whose value is None (an absent ``name``), so templates test them as absent
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return compiled.render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **tokens,
            )
        except _Refused as e:
            raise ValueError(f"{self.source}: the chat template refuses these messages: {e}") from None
        except Exception as e:  # whatever the template trips on, the user must learn which file it was
            raise ValueError(
                f"{self.source}: the chat template cannot render these messages ({type(e).__name__}: {e})"
            ) from e


class _Refused(Exception):
    """A template's own ``raise_exception(message)``."""


def _raise_exception(message: str):
    raise _Refused(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' keeps text as it is, and so do we.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(text: str, source: str):
    # jinja2 is a dependency of gptjax; imported here as only chat templates need it
    import jinja2
    from jinja2 import ext, sandbox

    class GenerationBlock(ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers' masks; it renders
        its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    # Templates come with downloaded checkpoints: sandboxed, with transformers' whitespace settings.
    env = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols, GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(
            f"{source}: the chat template is not valid Jinja (template line {e.lineno}: {e.message})"
        ) from None


def _no_default(source: str, names: list[str]) -> Template:
    return Template(
        "",
        source,
        unusable=f"{source}: named chat templates {sorted(names)} and none called 'default', the one gptjax "
        "renders (rename the one to use)",
    )


def _pick(value: Any, source: str) -> Template | None:
    """A ``chat_template`` entry: a string, or transformers' list of {name, template} (its 'default')."""
    if value is None:
        return None
    if isinstance(value, str):
        return Template(value, source)
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= set(t) for t in value):
        named = {t["name"]: t["template"] for t in value}
        return Template(named["default"], source) if "default" in named else _no_default(source, list(named))
    raise ValueError(f"{source}: 'chat_template' must be a string or a list of {{name, template}}")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def find(directory: str, tokenizer_config: Mapping[str, Any] | None = None) -> Template | None:
    """The chat template kept in a tokenizer ``directory`` (module doc for where), or None if it has none.

    ``tokenizer_config``: its tokenizer_config.json when the caller has read it already.
    """
    for name in (JINJA_FILE, os.path.join(TEMPLATE_DIR, "default.jinja")):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return Template(f.read(), path)
    extra = os.path.join(directory, TEMPLATE_DIR)
    if os.path.isdir(extra) and any(n.endswith(".jinja") for n in os.listdir(extra)):
        return _no_default(
            extra, [n.removesuffix(".jinja") for n in os.listdir(extra) if n.endswith(".jinja")]
        )
    cfg_file = os.path.join(directory, "tokenizer_config.json")
    if tokenizer_config is None and os.path.isfile(cfg_file):
        tokenizer_config = _read_json(cfg_file)
    found = _pick((tokenizer_config or {}).get("chat_template"), f"{cfg_file}['chat_template']")
    legacy = os.path.join(directory, LEGACY_FILE)
    if found is None and os.path.isfile(legacy):
        found = _pick(_read_json(legacy).get("chat_template"), legacy)
    return found

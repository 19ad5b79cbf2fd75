"""Reading a raw record's fields for the formats' parsers: errors name the file and line (``where``) and the
field, and say how to map another field name (the source's ``fields.*`` option).

TRL's dataset forms are read as they come: a prompt or response field holds a string (TRL's standard form) or
a list of chat messages (its conversational form), told apart per record. Each parser names the form it
found (``form``): the source's counts get ``<format>_form_<name>``, and the first record of each form in a
source is logged, so a user sees how their data was read.
"""

from __future__ import annotations

from collections.abc import Callable

from absl import logging

RenderChat = Callable[..., str]

COMPLETION = "completion"  # TRL's name for the response, read where the default 'response' field is absent

FORMS = {  # the forms a record can come in, and how the log describes them
    "prompt": "a prompt string",
    "conversational_prompt": "a prompt as chat messages, rendered with the chat template",
    "messages": "chat 'messages' rendered with the chat template (for SFT the last is the assistant's reply)",
    "prompt_completion": "a prompt and its response as strings",
    "conversational_prompt_completion": "a prompt and its response, chat messages rendered with the template",
    "ranked": "a prompt and responses ranked best -> worst (or by scores)",
    "explicit_prompt": "a prompt with chosen / rejected strings",
    "conversational_explicit_prompt": "a prompt with chosen / rejected, chat messages rendered with the "
    "template",
    "implicit_prompt": "chosen / rejected strings; the prompt is their shared beginning, up to a word break",
    "conversational_implicit_prompt": "chosen / rejected conversations; the prompt is their shared first "
    "messages",
}


def form(counts, fmt: str, name: str, where: str) -> None:
    """Count a record of ``fmt`` read in form ``name`` (``FORMS``); the first of each form is logged."""
    if counts is None:
        return
    key = f"{fmt}_form_{name}"
    if not counts[key]:
        logging.info("data %s: %s records in form %r: %s", where, fmt, name, FORMS[name])
    counts[key] += 1


def string(rec: dict, key: str, where: str, fmt: str) -> str:
    if key not in rec:
        raise ValueError(
            f"{where}: missing field {key!r} (format {fmt!r}; fields present: {sorted(rec)}; "
            f"map another name with the source's fields.* option)"
        )
    value = rec[key]
    if not isinstance(value, str):
        raise TypeError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def is_chat(value) -> bool:
    """A field holding chat messages (a list, or TFDS' dict of lists) rather than a string."""
    return isinstance(value, (list, dict))


def messages(rec: dict, key: str, where: str) -> list[dict]:
    msgs = rec[key]
    if isinstance(msgs, dict) and set(msgs) >= {"role", "content"}:  # TFDS Sequence of dicts: dict of lists
        msgs = [{"role": r, "content": c} for r, c in zip(msgs["role"], msgs["content"], strict=True)]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: field {key!r} must be a non-empty list of messages, got {msgs!r:.80}")
    for i, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise TypeError(
                f"{where}: field {key!r}[{i}] must have string 'role' and 'content', got {m!r:.80}"
            )
    # Table formats (Parquet, datasets) give every message every column, None where it had none: as
    # transformers does, such keys are left out, so a template sees them as absent.
    return [{k: v for k, v in m.items() if v is not None} for m in msgs]


def reply(rec: dict, key: str, where: str, fmt: str) -> str:
    """A response field: a string, or a list holding one assistant message (its content)."""
    if key in rec and is_chat(rec[key]):
        msgs = messages(rec, key, where)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise ValueError(
                f"{where}: field {key!r} must hold one assistant message (the response), got roles "
                f"{[m['role'] for m in msgs]}"
            )
        return msgs[0]["content"]
    return string(rec, key, where, fmt)


def prompt_text(rec: dict, f, where: str, fmt: str, render_chat: RenderChat) -> tuple[str, str]:
    """(the prompt, its form): a string, chat messages in the prompt field, or, without a prompt field, chat
    ``messages``; messages are rendered with the generation prompt."""
    if f.prompt not in rec and f.messages in rec:
        return render_chat(messages(rec, f.messages, where), add_generation_prompt=True), "messages"
    if f.prompt in rec and is_chat(rec[f.prompt]):
        text = render_chat(messages(rec, f.prompt, where), add_generation_prompt=True)
        return text, "conversational_prompt"
    return string(rec, f.prompt, where, fmt), "prompt"


def prompt(rec: dict, f, where: str, fmt: str, render_chat: RenderChat, counts=None) -> str:
    """The prompt field (a string or chat messages), or chat ``messages``, rendered with the generation
    prompt; with ``counts``, its form is counted (and logged the first time)."""
    text, name = prompt_text(rec, f, where, fmt, render_chat)
    form(counts, fmt, name, where)
    return text

"""Reading a raw record's fields for the formats' parsers: errors name the file and line (``where``) and the
field, and say how to map another field name (the source's ``fields.*`` option)."""

from __future__ import annotations

from collections.abc import Callable

RenderChat = Callable[..., str]


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
    return msgs


def prompt(rec: dict, f, where: str, fmt: str, render_chat: RenderChat) -> str:
    """The prompt field, or chat ``messages`` rendered with the generation prompt."""
    if f.prompt not in rec and f.messages in rec:
        return render_chat(messages(rec, f.messages, where), add_generation_prompt=True)
    return string(rec, f.prompt, where, fmt)

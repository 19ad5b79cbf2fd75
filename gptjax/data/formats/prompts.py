"""'prompts': prompts for RL (rollouts generate the responses).

Record ``{"prompt": str, "fields": {name: value}}``: the prompt (or chat ``messages``, rendered with the
generation prompt) and every other field of the raw record, any JSON value, kept as it was (never cleaned):
a task's ground truth, e.g. ``{"prompt": "Q: 7+12-5 A:", "answer": "14"}`` keeps ``answer``; ``fields`` is
absent when there are none. Demonstrations and rankings feed it their prompts. Item int32[m] = BOS prompt;
here ``seq_len`` is the prompt length P, and a longer prompt keeps its end (the question and the generation
prompt sit there). Batch: ``prompt_BP`` (right-padded, or left with ``data.pad_side='left'``),
``prompt_lengths_B``, ``prompt_ids_B`` (rows of the iterator's prompt table: ``it.prompt_text(ids)`` gives
the strings back, ``it.prompt_fields(ids)`` the records' other fields by name).
"""

from __future__ import annotations

import numpy as np

from gptjax.data.formats import Format, batching, fields


def parse(rec: dict, f, where: str, render_chat, counts) -> dict:
    out = {"prompt": fields.prompt(rec, f, where, "prompt", render_chat, counts)}
    used = f.prompt if f.prompt in rec else f.messages  # the field the prompt came from
    other = {k: v for k, v in rec.items() if k != used}
    if other:
        out["fields"] = other
    return out


def prompt_only(rec: dict) -> dict:
    """A demonstration's or ranking's prompt (and its ``fields``, where its record kept any)."""
    return {"prompt": rec["prompt"], **({"fields": rec["fields"]} if rec.get("fields") else {})}


def tokenize(records: list[dict], vocab, seq_len: int, overflow: str, counts) -> list:
    items: list = []
    for rec in records:
        toks = [vocab.bos_id] + vocab.encode(rec["prompt"])
        if len(toks) > seq_len:
            if overflow == "drop":
                counts["prompts_dropped_too_long"] += 1
                items.append(None)
                continue
            counts["prompts_truncated_keep_end"] += 1  # the end holds the question / generation prompt
            toks = [vocab.bos_id] + toks[len(toks) - seq_len + 1 :]
        items.append(np.asarray(toks, np.int32))
    return items


def prompt_batch(items: list, uids: list[int], seq_len: int, pad_id: int, pad_side: str):
    """[B, P] prompts (BOS + prompt), right- or left-padded, with lengths and ids into the prompt table."""
    B, P = len(uids), seq_len
    prompts = np.full((B, P), pad_id, np.int32)
    lengths = np.zeros((B,), np.int32)
    for b, uid in enumerate(uids):
        toks = items[uid]
        n = len(toks)
        if pad_side == "left":
            prompts[b, P - n :] = toks
        else:
            prompts[b, :n] = toks
        lengths[b] = n
    return {"prompt_BP": prompts, "prompt_lengths_B": lengths, "prompt_ids_B": np.asarray(uids, np.int32)}


def batcher(items, *, batch_size, seq_len, pad_id, data_cfg, overflow, counts) -> batching.Rows:
    del overflow, counts
    pad_side = data_cfg.pad_side
    return batching.Rows(lambda uids: prompt_batch(items, uids, seq_len, pad_id, pad_side), batch_size)


def shapes(batch_size: int, seq_len: int, data_cfg=None) -> dict:
    del data_cfg
    return {
        "prompt_BP": ((batch_size, seq_len), np.int32),
        "prompt_lengths_B": ((batch_size,), np.int32),
        "prompt_ids_B": ((batch_size,), np.int32),
    }


FORMAT = Format(
    name="prompts",
    what="prompts",
    record="prompt",
    parse=parse,
    tokenize=tokenize,
    batcher=batcher,
    shapes=shapes,
    feeds={"sft": prompt_only, "rank": prompt_only},
)

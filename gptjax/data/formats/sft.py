"""'sft': demonstrations (prompt -> response), packed like text, with no loss on the prompt.

Record ``{"prompt": str, "response": str}``, read from TRL's forms too (``fields``): a prompt and a
``response`` (or TRL's ``completion``) as strings or chat messages (a prompt list rendered with the generation
prompt; a response list holding the assistant's one message), or chat ``messages`` ending with the
assistant's reply; a ranking feeds it its best response. Item (int32[m], p) = BOS prompt response EOS,
p = BOS + prompt tokens. A demonstration truncated down to its prompt has nothing to learn and is dropped
(counted). Batch: the packed keys of 'pretrain' (``batching.Packer``), ``weights_BL`` 0 on prompt targets too.
"""

from __future__ import annotations

import numpy as np

from gptjax.data.formats import Format, batching, fields


def parse(rec: dict, f, where: str, render_chat, counts) -> dict:
    if f.prompt not in rec and f.messages in rec:
        msgs = fields.messages(rec, f.messages, where)
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: field {f.messages!r}: the last message must be the assistant's reply")
        fields.form(counts, "sft", "messages", where)
        return {
            "prompt": render_chat(msgs[:-1], add_generation_prompt=True),
            "response": msgs[-1]["content"],
        }
    prompt, prompt_form = fields.prompt_text(rec, f, where, "sft", render_chat)
    # TRL's 'completion' stands in for the default response field; a field the user named is theirs alone
    trl = f.response == "response" and f.response not in rec and fields.COMPLETION in rec
    key = fields.COMPLETION if trl else f.response
    response = fields.reply(rec, key, where, "sft")
    chat = prompt_form != "prompt" or fields.is_chat(rec[key])
    fields.form(counts, "sft", "conversational_prompt_completion" if chat else "prompt_completion", where)
    return {"prompt": prompt, "response": response}


def best_response(rec: dict) -> dict:
    """A ranking as the demonstration of its best response."""
    return {"prompt": rec["prompt"], "response": rec["responses"][0]}


def tokenize(records: list[dict], vocab, seq_len: int, overflow: str, counts) -> list:
    items: list = []
    for rec in records:
        prompt = [vocab.bos_id] + vocab.encode(rec["prompt"])
        whole = prompt + vocab.encode(rec["response"]) + [vocab.eos_id]
        toks = batching.cut(whole, seq_len, overflow, counts, "demonstrations")
        if toks is not None and len(prompt) >= len(toks):  # truncation left no response token to learn
            counts["demonstrations_dropped_prompt_fills_context"] += 1
            toks = None
        items.append(None if toks is None else (np.asarray(toks, np.int32), len(prompt)))
    return items


def _doc(item):
    return item  # (tokens, prompt length)


def batcher(items, *, batch_size, seq_len, pad_id, data_cfg, overflow, counts) -> batching.Packer:
    del overflow, counts  # demonstrations are never split across rows
    return batching.Packer(items, _doc, batch_size, seq_len, pad_id, pack=data_cfg.pack, split_docs=False)


FORMAT = Format(
    name="sft",
    what="demonstrations",
    record="sft",
    parse=parse,
    tokenize=tokenize,
    batcher=batcher,
    shapes=batching.packed_shapes,
    feeds={"rank": best_response},
)

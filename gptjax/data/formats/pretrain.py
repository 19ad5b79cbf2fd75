"""'pretrain': raw text, packed.

Record ``{"text": str}``; item int32[m] = BOS text EOS. A document longer than the row is split across rows
by default (``data.overflow='auto'``), so every token is trained on once. Batch (``batching.Packer``):
``inputs_BL``, ``targets_BL``, ``weights_BL`` (0 on padding and on each document's last token),
``segment_ids_BL``, ``positions_BL``.
"""

from __future__ import annotations

import numpy as np

from gptjax.data.formats import Format, batching, fields


def parse(rec: dict, f, where: str, render_chat, counts) -> dict:
    del render_chat, counts
    return {"text": fields.string(rec, f.text, where, "text")}


def tokenize(records: list[dict], vocab, seq_len: int, overflow: str, counts) -> list:
    items: list = []
    for rec in records:
        toks = [vocab.bos_id] + vocab.encode(rec["text"]) + [vocab.eos_id]
        if overflow != "split":
            toks = batching.cut(toks, seq_len, overflow, counts, "documents")
        items.append(None if toks is None else np.asarray(toks, np.int32))
    return items


def _doc(item: np.ndarray):
    return item, 0  # no prompt: every target is trained on


def batcher(items, *, batch_size, seq_len, pad_id, data_cfg, overflow, counts) -> batching.Packer:
    del counts
    return batching.Packer(
        items, _doc, batch_size, seq_len, pad_id, pack=data_cfg.pack, split_docs=overflow == "split"
    )


FORMAT = Format(
    name="pretrain",
    what="pretraining",
    record="text",
    parse=parse,
    tokenize=tokenize,
    batcher=batcher,
    shapes=batching.packed_shapes,
    overflow="split",
    overflows=("truncate", "drop", "split"),
)

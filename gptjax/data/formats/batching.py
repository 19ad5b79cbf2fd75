"""What the formats share to turn token items into fixed-shape batches: the overflow cut of one sequence, the
packer of the LM formats and the one-item-per-row batcher of the others.

Rows of a packed batch hold whole documents side by side; ``segment_ids`` (1.. per document, 0 = padding)
keep attention inside a document and ``positions`` restart at 0. A pretraining document longer than the room
left is split: the next piece starts again at the piece's last token, so every target is trained exactly
once and nothing crosses a row.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np


def cut(tokens: list[int], limit: int, overflow: str, counts: collections.Counter, what: str):
    """Apply the overflow policy to one over-long sequence: truncated list, or None when dropped."""
    if len(tokens) <= limit:
        return tokens
    if overflow == "drop":
        counts[f"{what}_dropped_too_long"] += 1
        return None
    counts[f"{what}_truncated"] += 1
    return tokens[:limit]


def packed_shapes(batch_size: int, seq_len: int, data_cfg=None) -> dict:
    """The keys and shapes of a ``Packer`` batch."""
    del data_cfg  # a packed batch's shape is the rows and their length, whatever the options
    BL = (batch_size, seq_len)
    return {
        "inputs_BL": (BL, np.int32),
        "targets_BL": (BL, np.int32),
        "weights_BL": (BL, np.float32),
        "segment_ids_BL": (BL, np.int32),
        "positions_BL": (BL, np.int32),
    }


class Packer:
    """Fills [B, L] rows from a stream of item ids; its resumable position is (consumed, offset).

    ``doc(item) -> (tokens, prompt_len)``: targets before ``prompt_len`` get no weight. ``consumed`` counts
    items finished; ``offset`` is how far into the next item (a pretraining document split across batches)
    the next row starts. ``pull()`` returns the next item id from the stream.
    """

    def __init__(
        self,
        items: list,
        doc: Callable,
        batch_size: int,
        seq_len: int,
        pad_id: int,
        pack: bool,
        split_docs: bool,
    ):
        self.items, self.doc, self.B, self.L = items, doc, batch_size, seq_len
        self.pad_id, self.pack, self.split_docs = pad_id, pack, split_docs
        self.consumed, self.offset = 0, 0
        self._pending: int | None = None  # item id pulled but not finished

    def reset(self, consumed: int, offset: int):
        self.consumed, self.offset, self._pending = consumed, offset, None

    def batch(self, pull: Callable[[], int]) -> dict[str, np.ndarray]:
        B, L = self.B, self.L
        inputs = np.full((B, L), self.pad_id, np.int32)
        targets = np.full((B, L), self.pad_id, np.int32)
        weights = np.zeros((B, L), np.float32)
        segs = np.zeros((B, L), np.int32)
        pos = np.zeros((B, L), np.int32)
        for b in range(B):
            col, seg = 0, 0
            while col < L:
                if self._pending is None:
                    self._pending = pull()
                toks, prompt_len = self.doc(self.items[self._pending])
                start = self.offset
                rest = len(toks) - start
                room = L - col
                if rest > room:
                    if not self.split_docs:
                        if col == 0:
                            raise ValueError(f"item of {len(toks)} tokens does not fit seq_len={L}")
                        break  # keep it whole for the next row
                    if room < 2:
                        break  # one slot cannot hold a (token, target) pair
                    n = room
                else:
                    n = rest
                seg += 1
                piece = toks[start : start + n]
                inputs[b, col : col + n] = piece
                targets[b, col : col + n - 1] = piece[1:]
                # Target j is token start+j+1: train on it when past the prompt (always for pretraining).
                j = np.arange(n - 1)
                weights[b, col : col + n - 1] = (start + j + 1 >= prompt_len).astype(np.float32)
                segs[b, col : col + n] = seg
                pos[b, col : col + n] = np.arange(n)
                col += n
                if n == rest:
                    self._pending, self.offset = None, 0
                    self.consumed += 1
                else:
                    self.offset = start + n - 1  # the next piece re-reads this piece's last token as input
                if not self.pack:
                    break
        return {
            "inputs_BL": inputs,
            "targets_BL": targets,
            "weights_BL": weights,
            "segment_ids_BL": segs,
            "positions_BL": pos,
        }


class Rows:
    """One item per row: each batch pulls ``batch_size`` item ids and ``make(ids)`` lays them out."""

    def __init__(self, make: Callable[[list[int]], dict[str, np.ndarray]], batch_size: int):
        self.make, self.batch_size = make, batch_size
        self.consumed, self.offset = 0, 0

    def reset(self, consumed: int, offset: int):
        self.consumed, self.offset = consumed, offset

    def batch(self, pull: Callable[[], int]) -> dict[str, np.ndarray]:
        uids = [pull() for _ in range(self.batch_size)]
        self.consumed += len(uids)
        return self.make(uids)

"""Feature conversion: records -> token items -> fixed-shape numpy batches (packing for pretrain / SFT).

Items (one per record, made once when the pipeline is built, so overflow counts are known up front):
    pretrain  int32[m]       BOS text EOS
    sft       (int32[m], p)  BOS prompt response EOS; p = BOS + prompt tokens (no loss on those targets)
    rm        [(int32[m], p), ...] one per response, best -> worst
    prompts   int32[m]       BOS prompt

Rows of a packed batch hold whole documents side by side; ``segment_ids`` (1.. per document, 0 = padding)
keep attention inside a document and ``positions`` restart at 0. A pretraining document longer than the room
left is split: the next piece starts again at the piece's last token, so every target is trained exactly
once and nothing crosses a row.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np


def _cut(tokens: list[int], limit: int, overflow: str, counts: collections.Counter, what: str):
    """Apply the overflow policy to one over-long sequence: truncated list, or None when dropped."""
    if len(tokens) <= limit:
        return tokens
    if overflow == "drop":
        counts[f"{what}_dropped_too_long"] += 1
        return None
    counts[f"{what}_truncated"] += 1
    return tokens[:limit]


def tokenize(
    stage: str, records: list[dict], vocab, seq_len: int, overflow: str, counts: collections.Counter
) -> list:
    """Token items for ``stage`` (see module doc); records the overflow policy drops come back as None."""
    bos, eos = vocab.bos_id, vocab.eos_id
    items: list = []
    for rec in records:
        if stage == "pretrain":
            toks = [bos] + vocab.encode(rec["text"]) + [eos]
            if overflow != "split":
                toks = _cut(toks, seq_len, overflow, counts, "documents")
            items.append(None if toks is None else np.asarray(toks, np.int32))
        elif stage == "sft":
            prompt = [bos] + vocab.encode(rec["prompt"])
            toks = _cut(
                prompt + vocab.encode(rec["response"]) + [eos], seq_len, overflow, counts, "demonstrations"
            )
            if toks is not None and len(prompt) >= len(toks):  # truncation left no response token to learn
                counts["demonstrations_dropped_prompt_fills_context"] += 1
                toks = None
            items.append(None if toks is None else (np.asarray(toks, np.int32), len(prompt)))
        elif stage == "rm":
            prompt = [bos] + vocab.encode(rec["prompt"])
            seqs = []
            for r in rec["responses"]:
                toks = _cut(prompt + vocab.encode(r) + [eos], seq_len, overflow, counts, "ranked_responses")
                if toks is not None and len(toks) > len(prompt):
                    seqs.append((np.asarray(toks, np.int32), len(prompt)))
                elif toks is not None:
                    counts["ranked_responses_dropped_prompt_fills_context"] += 1
            if len(seqs) < 2:
                counts["rankings_dropped_fewer_than_2_responses_fit"] += 1
                seqs = None
            items.append(seqs)
        elif stage == "prompts":
            toks = [bos] + vocab.encode(rec["prompt"])
            if len(toks) > seq_len:
                if overflow == "drop":
                    counts["prompts_dropped_too_long"] += 1
                    items.append(None)
                    continue
                counts["prompts_truncated_keep_end"] += 1  # the end holds the question / generation prompt
                toks = [bos] + toks[len(toks) - seq_len + 1 :]
            items.append(np.asarray(toks, np.int32))
        else:
            raise ValueError(f"unknown stage {stage!r}")
    return items


class Packer:
    """Fills [B, L] rows from a stream of item ids; its resumable position is (consumed, offset).

    ``consumed`` counts items finished; ``offset`` is how far into the next item (a pretraining document split
    across batches) the next row starts. ``pull()`` returns the next item id from the stream.
    """

    def __init__(
        self,
        items: list,
        stage: str,
        batch_size: int,
        seq_len: int,
        pad_id: int,
        pack: bool,
        split_docs: bool,
    ):
        self.items, self.stage, self.B, self.L = items, stage, batch_size, seq_len
        self.pad_id, self.pack, self.split_docs = pad_id, pack, split_docs
        self.consumed, self.offset = 0, 0
        self._pending: int | None = None  # item id pulled but not finished

    def reset(self, consumed: int, offset: int):
        self.consumed, self.offset, self._pending = consumed, offset, None

    def _doc(self, uid: int):
        item = self.items[uid]
        return (item, 0) if self.stage == "pretrain" else item

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
                toks, prompt_len = self._doc(self._pending)
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


def rm_batch(items: list, uids: list[int], num_responses: int, seq_len: int, pad_id: int):
    """[B, K, L] prompt+response tokens (right-padded), best -> worst along K, with a validity mask."""
    B, K, L = len(uids), num_responses, seq_len
    tokens = np.full((B, K, L), pad_id, np.int32)
    lengths = np.zeros((B, K), np.int32)
    prompt_lengths = np.zeros((B, K), np.int32)
    valid = np.zeros((B, K), bool)
    for b, uid in enumerate(uids):
        for k, (toks, p) in enumerate(items[uid][:K]):
            tokens[b, k, : len(toks)] = toks
            lengths[b, k], prompt_lengths[b, k], valid[b, k] = len(toks), p, True
    return {
        "tokens_BKL": tokens,
        "lengths_BK": lengths,
        "prompt_lengths_BK": prompt_lengths,
        "valid_BK": valid,
    }


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

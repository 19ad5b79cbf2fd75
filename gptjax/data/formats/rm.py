"""'rm': a prompt with K ranked responses per batch element, best -> worst (reward models, DPO, KTO).

Record ``{"prompt": str, "responses": [str, ...]}`` best -> worst, K >= 2, from ``responses`` with optional
``scores``, or from TRL's preference forms (``fields``): a prompt (string or chat messages) with ``chosen`` /
``rejected`` (strings, or one assistant message each), or an implicit prompt: ``chosen`` / ``rejected`` as
whole conversations, the prompt being the messages they share before their last (assistant) message, or as
strings, the prompt being their shared beginning up to a word break (a space there starts the responses, as
in TRL). A NaN or infinite score is an error naming the file and line; a record with fewer than 2 responses
is dropped and counted, and so are ties. Item: [(int32[m], p), ...], one BOS prompt response EOS per response
that fits; a response the length cut makes identical to a better one is dropped and counted (the pair would
teach nothing), and a source where that hits most rankings is refused; a ranking left with fewer than 2 is
dropped. K is ``data.num_responses`` (0: the most any record has); rankings with more are cut to their best K
(counted).
Batch: ``tokens_BKL`` (right-padded), ``lengths_BK``, ``prompt_lengths_BK``, ``valid_BK`` (False where a
prompt has fewer than K responses).
"""

from __future__ import annotations

import math
import os

import numpy as np

from gptjax.data.formats import Format, batching, fields


def _shared_messages(chosen: list[dict], rejected: list[dict]) -> int:
    """How many first messages two conversations share, leaving each at least its last one."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return n


def _text_prompt_end(chosen: str, rejected: str) -> int:
    """Where an implicit text prompt ends: after the last whitespace the two strings share from their start,
    less a single space there, which starts the responses (as text goes on: ' Yes' after 'Assistant:')."""
    n = len(os.path.commonprefix([chosen, rejected]))
    while n and not chosen[n - 1].isspace():
        n -= 1
    return n - 1 if n and chosen[n - 1] == " " else n


def _pair(rec: dict, f, where: str, render_chat) -> tuple[str, list[str], str]:
    """A chosen / rejected record as (prompt, [chosen, rejected], its form) (module doc)."""
    for key in (f.chosen, f.rejected):
        if key not in rec:
            fields.string(rec, key, where, "rank")  # names the missing field
    if fields.is_chat(rec[f.chosen]) != fields.is_chat(rec[f.rejected]):
        raise ValueError(
            f"{where}: fields {f.chosen!r} and {f.rejected!r} must both be strings or both lists of messages"
        )
    has_prompt = f.prompt in rec or f.messages in rec
    if fields.is_chat(rec[f.chosen]):
        chosen, rejected = fields.messages(rec, f.chosen, where), fields.messages(rec, f.rejected, where)
        n = _shared_messages(chosen, rejected)
        if n:  # whole conversations (TRL reads them so even beside a prompt field)
            for key, msgs in ((f.chosen, chosen), (f.rejected, rejected)):
                if len(msgs) != n + 1 or msgs[n]["role"] != "assistant":
                    raise ValueError(
                        f"{where}: fields {f.chosen!r} and {f.rejected!r} share their first {n} message(s) "
                        f"(the prompt), so each must end in one assistant message after them; {key!r} has "
                        f"roles {[m['role'] for m in msgs[n:]]} there"
                    )
            prompt = render_chat(chosen[:n], add_generation_prompt=True)
            return prompt, [chosen[n]["content"], rejected[n]["content"]], "conversational_implicit_prompt"
        if not has_prompt:
            raise ValueError(
                f"{where}: fields {f.chosen!r} and {f.rejected!r} share no first messages to be the prompt, "
                f"and there is no {f.prompt!r} field"
            )
    if has_prompt:
        prompt, prompt_form = fields.prompt_text(rec, f, where, "rank", render_chat)
        responses = [fields.reply(rec, key, where, "rank") for key in (f.chosen, f.rejected)]
        chat = prompt_form != "prompt" or fields.is_chat(rec[f.chosen])
        return prompt, responses, "conversational_explicit_prompt" if chat else "explicit_prompt"
    chosen, rejected = (fields.string(rec, key, where, "rank") for key in (f.chosen, f.rejected))
    cut = _text_prompt_end(chosen, rejected)
    return chosen[:cut], [chosen[cut:], rejected[cut:]], "implicit_prompt"


def parse(rec: dict, f, where: str, render_chat, counts) -> dict | None:
    if f.responses in rec:
        prompt = fields.prompt_text(rec, f, where, "rank", render_chat)[0]
        fields.form(counts, "rank", "ranked", where)
        responses = rec[f.responses]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise ValueError(f"{where}: field {f.responses!r} must be a list of strings (best -> worst)")
        if f.scores in rec:
            scores = rec[f.scores]
            if (
                not isinstance(scores, list)
                or len(scores) != len(responses)
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
            ):
                raise ValueError(f"{where}: field {f.scores!r} must be a list of {len(responses)} numbers")
            for i, s in enumerate(scores):
                if not math.isfinite(s):
                    raise ValueError(
                        f"{where}: field {f.scores!r}[{i}] is {s!r}; scores must be finite numbers "
                        "(fix or drop the record)"
                    )
            order = sorted(range(len(responses)), key=lambda i: -scores[i])
            responses, scores = [responses[i] for i in order], [scores[i] for i in order]
        else:
            scores = list(range(len(responses), 0, -1))
    elif f.chosen in rec or f.rejected in rec:
        prompt, responses, name = _pair(rec, f, where, render_chat)
        fields.form(counts, "rank", name, where)
        scores = [1, 0]
    else:
        raise ValueError(
            f"{where}: missing field {f.responses!r} (or {f.chosen!r}/{f.rejected!r}) for format "
            f"'rank'; fields present: {sorted(rec)}"
        )
    if len(responses) < 2:  # nothing to rank: not a tie, so counted under its own name
        counts["rank_records_dropped_fewer_than_2_responses"] += 1
        return None
    kept, kept_scores = [], []
    for r, s in zip(responses, scores, strict=True):
        if r in kept or (kept_scores and s == kept_scores[-1]):  # a tie with a better-ranked response
            counts["rank_tied_responses_dropped"] += 1
            continue
        kept.append(r)
        kept_scores.append(s)
    if len(kept) < 2:
        counts["rank_records_dropped_ties"] += 1
        return None
    return {"prompt": prompt, "responses": kept}


def tokenize(records: list[dict], vocab, seq_len: int, overflow: str, counts) -> list:
    items: list = []
    identical = 0  # rankings where the cut made a response identical to a better one
    for rec in records:
        prompt = [vocab.bos_id] + vocab.encode(rec["prompt"])
        seqs, seen, hit = [], set(), False
        for r in rec["responses"]:
            toks = batching.cut(
                prompt + vocab.encode(r) + [vocab.eos_id], seq_len, overflow, counts, "ranked_responses"
            )
            if toks is not None and tuple(toks) in seen:
                # The same tokens ranked better and worse: accuracy 0 and loss log 2 whatever the model.
                counts["ranked_responses_dropped_identical_after_cut"] += 1
                hit = True
            elif toks is not None and len(toks) > len(prompt):
                seen.add(tuple(toks))
                seqs.append((np.asarray(toks, np.int32), len(prompt)))
            elif toks is not None:
                counts["ranked_responses_dropped_prompt_fills_context"] += 1
        identical += hit
        if len(seqs) < 2:
            counts["rankings_dropped_fewer_than_2_responses_fit"] += 1
            seqs = None
        items.append(seqs)
    if identical:
        counts["rankings_with_responses_identical_after_cut"] += identical
    if identical * 2 > len(records):
        raise ValueError(
            f"{identical} of {len(records)} rankings have responses that are identical once cut to "
            f"seq_len={seq_len} tokens (they differ only after it): raise train.seq_len or shorten the "
            "prompts / responses"
        )
    return items


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


def batcher(items, *, batch_size, seq_len, pad_id, data_cfg, overflow, counts) -> batching.Rows:
    del overflow
    K = data_cfg.num_responses or max(len(it) for it in items)
    over = sum(len(it) > K for it in items)
    if over:
        counts["all"]["rankings_cut_to_num_responses"] += over
    return batching.Rows(lambda uids: rm_batch(items, uids, K, seq_len, pad_id), batch_size)


def shapes(batch_size: int, seq_len: int, data_cfg) -> dict:
    K = int(data_cfg.get("num_responses", 0) or 0)
    if K < 2:
        # A real iterator reads K off its records; shapes without records need it named.
        raise ValueError(
            "config.data.num_responses must name K (the responses per prompt) to plan an rm stage"
        )
    B, L = batch_size, seq_len
    return {
        "tokens_BKL": ((B, K, L), np.int32),
        "lengths_BK": ((B, K), np.int32),
        "prompt_lengths_BK": ((B, K), np.int32),
        "valid_BK": ((B, K), np.bool_),
    }


FORMAT = Format(
    name="rm",
    what="rankings",
    record="rank",
    parse=parse,
    tokenize=tokenize,
    batcher=batcher,
    shapes=shapes,
)

"""The input pipeline: sources -> cleaning / dedup / splits -> seqio Tasks and a Mixture -> numpy batches.

Records are read and cleaned in Python (so every drop is counted and dedup can compare sources), tokenized
once into a table, and each source becomes a seqio Task over a ``FunctionDataSource`` of row ids into that
table; a seqio Mixture blends the tasks at their rates, shuffles from the seed and shards across hosts, and
the stage's batch format (``gptjax.data.formats``: tokenizing, batching) turns the id stream into fixed-shape
batches; the pipeline itself names no format. The iterator's position is the number of ids it has finished
(plus the offset into a document split across batches): restoring rebuilds the same seeded dataset and skips
that many ids, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import numpy as np
from absl import logging

from gptjax.data import clean, formats, sources, tiny
from gptjax.data import config as config_lib
from gptjax.data.vocab import get_vocabulary

_SOURCE_KEYS = set(config_lib.source().keys())


def parse_shares(spec: str, what: str) -> dict[str, float]:
    """'a:0.5,b:0.5' -> {'a': 0.5, 'b': 0.5}."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, value = part.partition(":")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or out[name.strip()] < 0:
            raise ValueError(
                f"{what}={spec!r}: write 'name:share,name:share' with shares >= 0 (bad part {part!r})"
            )
    return out


def validate(data_cfg) -> None:
    """Fail early, naming the key, on options that are unknown or out of range."""
    for name, src in data_cfg.sources.items():
        where = f"data.sources.{name}"
        unknown = set(src.keys()) - _SOURCE_KEYS
        if unknown:
            raise KeyError(
                f"{where}: unknown key(s) {sorted(unknown)}; build sources with gptjax.data.source(...)"
            )
        missing = _SOURCE_KEYS - set(src.keys())
        if missing:
            raise KeyError(
                f"{where}: missing key(s) {sorted(missing)}; build sources with gptjax.data.source(...)"
            )
        if src.format not in config_lib.FORMATS:
            raise ValueError(f"{where}.format={src.format!r}; use one of {config_lib.FORMATS}")
        for stage in (s.strip() for s in src.stages.split(",") if s.strip()):
            if stage not in config_lib.STAGES:
                raise ValueError(f"{where}.stages: unknown stage {stage!r}; use {config_lib.STAGES}")
        shares = parse_shares(src.stage_split, f"{where}.stage_split")
        for stage in shares:
            if stage not in config_lib.STAGES:
                raise ValueError(f"{where}.stage_split: unknown stage {stage!r}; use {config_lib.STAGES}")
        if sum(shares.values()) > 1.0 + 1e-9:
            raise ValueError(f"{where}.stage_split={src.stage_split!r}: shares add up to more than 1")
        if src.builtin:
            sources.check_builtin(name, src)
        if src.clean.unicode not in ("", "NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(
                f"{where}.clean.unicode={src.clean.unicode!r}; use '', 'NFC', 'NFKC', 'NFD' or 'NFKD'"
            )
    if data_cfg.overflow not in config_lib.OVERFLOW:
        raise ValueError(f"data.overflow={data_cfg.overflow!r}; use one of {config_lib.OVERFLOW}")
    if data_cfg.pad_side not in ("right", "left"):
        raise ValueError(f"data.pad_side={data_cfg.pad_side!r}; use 'right' or 'left'")
    if not 0.0 <= data_cfg.validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction={data_cfg.validation_fraction} must be in [0, 1)")
    for name in parse_shares(data_cfg.mixture, "data.mixture"):
        if name not in data_cfg.sources:
            raise ValueError(
                f"data.mixture names source {name!r}, which is not in data.sources "
                f"({sorted(data_cfg.sources.keys())})"
            )


def _stage_sources(data_cfg, stage: str) -> dict[str, float]:
    """Sources feeding ``stage`` and their mixing rates."""
    mixture = parse_shares(data_cfg.mixture, "data.mixture")
    out = {}
    for name, src in data_cfg.sources.items():
        allowed = [s.strip() for s in src.stages.split(",") if s.strip()]
        if src.format not in config_lib.STAGE_FORMATS[stage] or (allowed and stage not in allowed):
            continue
        shares = parse_shares(src.stage_split, "stage_split")
        if shares and stage not in shares:
            continue
        rate = mixture.get(name, 0.0) if mixture else src.rate
        if rate > 0:
            out[name] = rate
    if not out:
        raise ValueError(
            f"no data source feeds stage {stage!r}: formats {config_lib.STAGE_FORMATS[stage]} can; "
            f"sources: { {n: s.format for n, s in data_cfg.sources.items()} }, "
            f"mixture={data_cfg.mixture!r}"
        )
    return out


def _prompt_of(rec: dict) -> str:
    return rec.get("prompt", rec.get("text", ""))


def _hash(text: str, salt: str) -> float:
    return tiny.stable_hash(salt + "\x00" + text)


def _stage_share(records: list[dict], shares: dict[str, float], stage: str) -> list[dict]:
    """The records whose prompt hashes into ``stage``'s slice of [0, 1): disjoint across stages."""
    lo = 0.0
    for name in sorted(shares):  # a fixed order, so every stage agrees on the slices
        if name == stage:
            break
        lo += shares[name]
    hi = lo + shares[stage]
    return [r for r in records if lo <= _hash(_prompt_of(r), "stage_split") < hi]


def load_records(data_cfg, stage: str, split: str, vocab, counts: dict[str, collections.Counter]):
    """Per source: the cleaned, deduplicated, split records for ``stage`` and ``split``."""
    fmt = formats.get(stage)
    names = _stage_sources(data_cfg, stage)
    per_source: dict[str, list[dict]] = {}
    for name in names:
        src = data_cfg.sources[name]
        c = counts[name]
        records = sources.read(name, src, "train", data_cfg, vocab.render_chat, c)
        held_out = None
        if split == "validation":
            held_out = sources.read(name, src, "validation", data_cfg, vocab.render_chat, c)
        if held_out is None and data_cfg.validation_fraction > 0 and not src.builtin:
            # No explicit held-out data: carve a fixed fraction by a stable hash (same on every host and run).
            is_val = [_hash(_prompt_of(r), "validation") < data_cfg.validation_fraction for r in records]
            held_out = [r for r, v in zip(records, is_val, strict=True) if v]
            records = [r for r, v in zip(records, is_val, strict=True) if not v]
            c["validation_carved"] += len(held_out)
        if split == "validation":
            if held_out is None:
                continue
            records = held_out
        records = clean.clean_records(records, src.clean, c)
        per_source[name] = records
    if split == "validation" and not per_source:
        raise ValueError(
            f"stage {stage!r}: no source has validation data; give validation_path / "
            "validation_split, or set data.validation_fraction"
        )
    clean.deduplicate(per_source, {n: data_cfg.sources[n].clean for n in per_source}, data_cfg, counts)
    out = {}
    for name, records in per_source.items():
        src = data_cfg.sources[name]
        shares = parse_shares(src.stage_split, "stage_split")
        if shares:
            kept = _stage_share(records, shares, stage)
            counts[name]["stage_split_other_stages_excluded"] += len(records) - len(kept)
            records = kept
        out[name] = [fmt.convert(r, src.format) for r in records]
    return out


class DataIterator:
    """Batches for one stage (keys in gptjax.data); ``get_state``/``set_state`` resume exactly."""

    def __init__(
        self,
        data_cfg,
        *,
        stage: str,
        batch_size: int,
        seq_len: int,
        seed: int,
        split: str,
        shard_index: int,
        num_shards: int,
    ):
        validate(data_cfg)
        if stage not in config_lib.STAGES:
            raise ValueError(f"stage={stage!r}; use one of {config_lib.STAGES}")
        if split not in ("train", "validation"):
            raise ValueError(f"split={split!r}; use 'train' or 'validation'")
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and seq_len={seq_len} >= 2")
        if data_cfg.num_responses == 1 or data_cfg.num_responses < 0:
            raise ValueError(
                f"data.num_responses={data_cfg.num_responses}: use 0 (the most any record has) or >= 2"
            )
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
        self.stage, self.split, self.seed = stage, split, int(seed)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.shard_index, self.num_shards = shard_index, num_shards
        self.vocab = get_vocabulary(data_cfg)
        self.pad_side = data_cfg.pad_side
        self.format = fmt = formats.get(stage)
        overflow = fmt.overflow_policy(data_cfg.overflow)
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        per_source = load_records(data_cfg, stage, split, self.vocab, counts)

        # One table of token items for all sources; each source owns a range of row ids.
        self.items: list = []
        self.texts: list[str] = []  # prompt (or text) of each row, for gold-reward evaluation
        self.fields: list[dict | None] = []  # each row's record's other fields (prompt records'), or None
        uids: dict[str, np.ndarray] = {}
        for name, records in per_source.items():
            try:
                items = fmt.tokenize(records, self.vocab, seq_len, overflow, counts[name])
            except ValueError as e:  # a format refusing a source's records as a whole: name the source
                raise ValueError(f"data source {name!r} ({stage}, {split}): {e}") from None
            keep = [i for i, it in enumerate(items) if it is not None]
            uids[name] = np.arange(len(self.items), len(self.items) + len(keep), dtype=np.int64)
            self.items.extend(items[i] for i in keep)
            self.texts.extend(_prompt_of(records[i]) for i in keep)
            self.fields.extend(records[i].get("fields") for i in keep)
            counts[name]["examples"] += len(keep)
            mine = len(range(shard_index, len(keep), num_shards))
            if mine == 0:
                raise ValueError(
                    f"data source {name!r} has no {split} examples for stage {stage!r} on shard "
                    f"{shard_index} of {num_shards} ({len(keep)} in all); add data or drop the source"
                )
        # The format's batcher lays items out in rows (and may count what its layout cuts, e.g. rankings
        # beyond K); its position (consumed, offset) is the iterator's.
        self._batcher = fmt.batcher(
            self.items,
            batch_size=batch_size,
            seq_len=seq_len,
            pad_id=self.vocab.pad_id,
            data_cfg=data_cfg,
            overflow=overflow,
            counts=counts,
        )
        self._stats = {f"{name}/{k}": int(v) for name, c in counts.items() for k, v in sorted(c.items())}
        for key, value in self._stats.items():
            logging.info("data %s/%s: %s = %d", stage, split, key, value)
        rates = _stage_sources(data_cfg, stage)
        self._mixture = _register(stage, split, uids, {n: rates[n] for n in uids}, data_cfg.shuffle_buffer)
        self.num_examples = sum(len(u) for u in uids.values())
        # every field any row has, in order of first appearance: prompt_fields' keys, the same every batch
        self.field_names = list(dict.fromkeys(k for f in self.fields if f for k in f))
        self.set_state({"consumed": 0, "offset": 0})

    def _dataset(self, skip: int):
        # seqio (and TensorFlow): heavy, imported when a dataset is built
        import seqio

        shard = seqio.ShardInfo(index=self.shard_index, num_shards=self.num_shards)
        if self.split == "train":
            ds = self._mixture.get_dataset(
                sequence_length=None,
                split="train",
                shuffle=True,
                seed=self.seed,
                shard_info=shard,
                num_epochs=None,
                log_mixing_proportions=False,
            )
        else:  # held-out data: every source in order, no shuffling, looping
            ds = None
            for task in self._mixture.tasks:
                t = task.get_dataset(
                    sequence_length=None, split="validation", shuffle=False, shard_info=shard, num_epochs=1
                )
                ds = t if ds is None else ds.concatenate(t)
            ds = ds.repeat()
        # No tf.data autotuning: its background thread made dropping a finished run's iterator wait up to
        # ~45 s (idle, not computing) at the end of every stage, and a uid stream needs no tuning.
        options = sources.import_tf().data.Options()
        options.autotune.enabled = False
        return ds.skip(skip).with_options(options).as_numpy_iterator()

    def _pull(self) -> int:
        return int(next(self._ids)["uid"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._batcher.batch(self._pull)
        self._consumed, self._offset = self._batcher.consumed, self._batcher.offset
        self._batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "split": self.split,
            "seed": self.seed,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "batches": self._batches,
            "consumed": self._consumed,
            "offset": self._offset,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        for key in ("stage", "split", "seed", "shard_index", "num_shards"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"data iterator state is for {key}={state[key]!r}, this iterator has "
                    f"{getattr(self, key)!r}; build the iterator with the run's own settings"
                )
        self._consumed, self._offset = int(state["consumed"]), int(state["offset"])
        self._batches = int(state.get("batches", 0))
        self._batcher.reset(self._consumed, self._offset)
        self._ids = self._dataset(self._consumed)

    def stats(self) -> dict[str, int]:
        """Records read and every drop / truncation / dedup count, as 'source/reason' -> count."""
        return dict(self._stats)

    def prompt_text(self, ids) -> list[str]:
        """Raw prompt strings for ``prompt_ids_B`` (e.g. to call a gold reward)."""
        return [self.texts[int(i)] for i in np.asarray(ids).reshape(-1)]

    def prompt_fields(self, ids) -> dict[str, list]:
        """The prompt records' other fields for ``prompt_ids_B`` (e.g. a reward function's ground truth):
        {field: values aligned with ids} for every field any record of this iterator has, None where a row's
        record lacks it (a JSONL record without it, or another source of a mixture); {} when none has any."""
        rows = [self.fields[int(i)] or {} for i in np.asarray(ids).reshape(-1)]
        return {k: [row.get(k) for row in rows] for k in self.field_names}


def _quiet_seqio_shuffle_warning(record) -> bool:
    # seqio warns that an uncached FunctionDataSource shuffles poorly on restarts; ours is a full seeded
    # permutation per epoch and restarts resume by position, so the warning does not apply.
    return "uncached FunctionDataset" not in record.getMessage()


def _register(
    stage: str, split: str, uids: dict[str, np.ndarray], rates: dict[str, float], shuffle_buffer: int
):
    """seqio Tasks (one per source) and their Mixture; re-registering the same names replaces them."""
    # seqio (and TensorFlow): heavy, imported when a dataset is built
    tf = sources.import_tf()
    import seqio

    if _quiet_seqio_shuffle_warning not in logging.get_absl_logger().filters:
        logging.get_absl_logger().addFilter(_quiet_seqio_shuffle_warning)

    tag = hashlib.blake2b(
        repr(sorted((n, len(u), int(u[0]) if len(u) else -1) for n, u in uids.items())).encode(),
        digest_size=4,
    ).hexdigest()
    feature = seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.int64, rank=0)
    tasks = []

    def make_fn(ids: np.ndarray):
        def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
            ds = tf.data.Dataset.from_tensor_slices({"uid": ids})  # ids, not a generator: shapes are kept
            # A full permutation per epoch (seqio repeats this source): every example once an epoch;
            # the same seed on every host gives each its own disjoint shard of the same permutation.
            return ds.shuffle(len(ids), seed=seed, reshuffle_each_iteration=True) if shuffle_files else ds

        return dataset_fn

    for name, ids in uids.items():
        task_name = f"gptjax_{stage}_{split}_{name}_{tag}"
        seqio.TaskRegistry.remove(task_name)
        seqio.TaskRegistry.add(
            task_name,
            source=seqio.FunctionDataSource(
                make_fn(ids), splits=[split]
            ),  # no size: seqio would cache epoch 1
            preprocessors=[],
            output_features={"uid": feature},
            shuffle_buffer_size=max(1, shuffle_buffer),
        )
        tasks.append((task_name, rates[name]))
    mix_name = f"gptjax_{stage}_{split}_{tag}"
    seqio.MixtureRegistry.remove(mix_name)
    return seqio.MixtureRegistry.add(mix_name, tasks)

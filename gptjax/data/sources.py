"""Reading records: local JSONL, text files, any TFDS dataset, or a built-in task (tiny, arith).

Every source yields records in one of four canonical shapes (field names in the input are remapped by the
source's ``fields`` section); each is parsed by the batch format it belongs to (``gptjax.data.formats``):

    text    {"text": str}                                    pretraining documents
    sft     {"prompt": str, "response": str}                 demonstrations (or chat ``messages``)
    rank    {"prompt": str, "responses": [str, ...]}         best -> worst, K >= 2 (chosen/rejected: K=2)
    prompt  {"prompt": str, "fields": {name: value}}         prompts for RL (or chat ``messages``); ``fields``
                                                             (optional): the raw record's other fields

Bad input fails with ``ValueError``/``TypeError``/``FileNotFoundError`` naming the file and line (or dataset
and example) and the field. Ties in rankings (equal ``scores`` or identical responses) are dropped and
counted, never silently.
"""

from __future__ import annotations

import collections
import glob
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from gptjax.data import arith, formats, readers, tiny
from gptjax.data import config as config_lib
from gptjax.data.formats.fields import RenderChat


def import_tf():
    """TensorFlow for the input pipeline only: keep it off every accelerator (JAX owns them)."""
    # heavy: only the input pipeline needs it
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised; devices were hidden by the first call
        pass
    return tf


def parse_record(rec: Any, fmt: str, f, where: str, render_chat: RenderChat, counts: collections.Counter):
    """One raw record -> the canonical record of ``fmt``, or None when it is dropped (and counted)."""
    if not isinstance(rec, dict):
        raise TypeError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    unit = formats.of_record(fmt)  # the batch format whose own records these are parses them
    if unit is not None:
        return unit.parse(rec, f, where, render_chat, counts)
    raise ValueError(f"{where}: unknown format {fmt!r}")


def _files(pattern: str, what: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise FileNotFoundError(f"{what}: no file matches {pattern!r}")
    return files


def _not_utf8(where: str, e: UnicodeDecodeError, column: int) -> ValueError:
    """``column``: 1-based byte offset of the bad byte in its line."""
    return ValueError(
        f"{where}: not UTF-8 (byte 0x{e.object[e.start]:02x}, byte {column} of the line); re-encode the file "
        "as UTF-8"
    )


def _jsonl(path: str) -> Iterable[tuple[str, Any]]:
    with open(path, "rb") as fh:  # bytes: a decoding error can then name its line
        n = 0
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")  # no newline: an error at its end keeps its column
            except UnicodeDecodeError as e:
                raise _not_utf8(f"{path}:{lineno}", e, e.start + 1) from None
            if not line.strip():
                continue
            n += 1
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})"
                ) from None
    if n == 0:
        raise ValueError(f"{path}: empty file (no records)")


def _text_file(path: str, separator: str) -> Iterable[tuple[str, Any]]:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        content = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise _not_utf8(f"{path}:{lineno}", e, e.start - raw.rfind(b"\n", 0, e.start)) from None
    if not content.strip():
        raise ValueError(f"{path}: empty file (no text)")
    docs = content.split(separator) if separator else [content]
    for i, doc in enumerate(d for d in docs if d.strip()):
        yield f"{path} document {i}", {"text": doc.strip("\n")}


def _to_python(value: Any) -> Any:
    """TFDS numpy values -> str / list / dict / numbers, so records look like parsed JSON."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()] if value.ndim else _to_python(value.item())
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tfds(name: str, data_dir: str, split: str) -> Iterable[tuple[str, Any]]:
    import_tf()
    # heavy and optional: only TFDS sources need it
    import tensorflow_datasets as tfds

    what = f"TFDS dataset {name!r} (data_dir={data_dir or 'default'!r})"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except ValueError as e:  # DatasetNotFoundError (a ValueError) and bad names: name the dataset
        raise ValueError(f"{what} does not exist: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if split not in builder.info.splits:
        raise ValueError(
            f"{what} has no split {split!r} (it has {sorted(builder.info.splits)}); "
            "prepare it with `tfds build` or set the source's split"
        )
    ds = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    n = 0
    for i, ex in enumerate(ds):
        n += 1
        yield f"{what}[{split}] example {i}", _to_python(ex)
    if n == 0:
        raise ValueError(f"{what}[{split}] is empty")


# Each built-in task's module: records(fmt, split, section) from its section data.<builtin>.
_BUILTIN_MODULES = {"tiny": tiny, "arith": arith}


def check_builtin(name: str, src) -> None:
    """A clear error for an unknown built-in task name."""
    if src.builtin not in config_lib.BUILTINS:
        raise ValueError(
            f"data.sources.{name}.builtin={src.builtin!r}: unknown built-in task; choose one of "
            f"{config_lib.BUILTINS}"
        )


def builtin_records(name: str, src, split: str, data_cfg) -> list[dict]:
    """All records of a built-in task's source for 'train' or 'validation'."""
    check_builtin(name, src)
    if src.builtin not in data_cfg:
        raise KeyError(
            f"data.sources.{name}.builtin={src.builtin!r} needs the section data.{src.builtin}; build the "
            "data section with gptjax.data.default_config()"
        )
    return _BUILTIN_MODULES[src.builtin].records(src.format, split, data_cfg[src.builtin])


def read(
    name: str, src, split: str, data_cfg, render_chat: RenderChat, counts: collections.Counter
) -> list[dict] | None:
    """All records of source ``name`` for 'train' or 'validation' (None: the source has no such data)."""
    fmt = src.format
    if src.builtin:
        records = builtin_records(name, src, split, data_cfg)
        counts["records_read"] += len(records)
        return records
    if split == "train":
        path, tfds_split = src.path, src.split
    else:
        path, tfds_split = src.validation_path, src.validation_split
        if not path and not (src.tfds and tfds_split):
            return None
    if src.tfds:
        raw = _tfds(src.tfds, src.data_dir, tfds_split)
    elif path:
        files = _files(path, f"data.sources.{name}.{'path' if split == 'train' else 'validation_path'}")
        raw = (
            item
            for p in files
            for item in (
                readers.rows(p, tfds_split or split)  # a Parquet file or a saved `datasets` folder
                if readers.handles(p)
                else _text_file(p, src.doc_separator)
                if p.endswith(".txt")
                else _jsonl(p)
            )
        )
        if any(p.endswith(".txt") for p in files) and fmt != "text":
            raise ValueError(f"data.sources.{name}: text files hold format 'text' only, not {fmt!r}")
    else:
        raise ValueError(f"data.sources.{name}: set one of path, tfds or builtin")
    records = []
    for where, rec in raw:
        counts["records_read"] += 1
        out = parse_record(rec, fmt, src.fields, where, render_chat, counts)
        if out is not None:
            records.append(out)
    return records

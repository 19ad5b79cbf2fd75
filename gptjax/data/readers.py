"""Table sources beside JSONL and text: Parquet files and local Hugging Face ``datasets`` directories (what
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write), read with pyarrow alone.

    if readers.handles(path):
        for where, record in readers.rows(path, split): ...   # where: 'x.parquet row 3', 'dir[train] row 3'

A record is one row as Python values (strings, numbers, lists, dicts), like a parsed JSON line, so every
format reads it the same way; ``where`` gives the row's 0-based index (``dataset[i]``) for errors. A
``DatasetDict`` directory is read at ``split`` (the source's ``split``, or ``validation_split`` for held-out
data); a single ``Dataset`` directory ignores it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

PARQUET = (".parquet", ".pq")
DATASET_STATE = "state.json"  # in a saved Dataset: its arrow files, in order
DATASET_DICT = "dataset_dict.json"  # in a saved DatasetDict: its splits, each a Dataset directory


def _pyarrow():
    # pyarrow (installed with tensorflow-datasets): imported here, as only these sources need it
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "Parquet files and datasets directories need pyarrow (pip install pyarrow)"
        ) from None
    return pa, pq


def handles(path: str) -> bool:
    """Whether ``path`` is a Parquet file or a saved ``datasets`` directory."""
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, n)) for n in (DATASET_STATE, DATASET_DICT))
    return path.endswith(PARQUET)


def rows(path: str, split: str = "train") -> Iterable[tuple[str, Any]]:
    """(where, record) for every row of a Parquet file or a saved ``datasets`` directory, in order."""
    n = 0
    source = _parquet(path) if not os.path.isdir(path) else _dataset_dir(path, split)
    for where, batch in source:
        for record in batch.to_pylist():
            yield f"{where} row {n}", record
            n += 1
    if n == 0:
        raise ValueError(f"{path}: no rows (an empty table)")


def _parquet(path: str):
    _, pq = _pyarrow()
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends: say which file
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    for batch in f.iter_batches(batch_size=1024):
        yield path, batch


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _dataset_dir(path: str, split: str):
    if os.path.isfile(os.path.join(path, DATASET_DICT)):
        splits = _read_json(os.path.join(path, DATASET_DICT)).get("splits") or []
        if split not in splits:
            raise ValueError(
                f"{path}: a datasets DatasetDict with splits {splits} and no {split!r}; set the source's "
                "split / validation_split, or point path at one split's directory"
            )
        path = os.path.join(path, split)
        if not os.path.isfile(os.path.join(path, DATASET_STATE)):
            raise FileNotFoundError(f"{path}: split {split!r} has no {DATASET_STATE}")
        where = f"{os.path.dirname(path)}[{split}]"
    else:
        where = path
    files = [d.get("filename") for d in _read_json(os.path.join(path, DATASET_STATE)).get("_data_files", [])]
    if not files or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{path}/{DATASET_STATE}: no '_data_files' list; is this a save_to_disk directory?")
    pa, _ = _pyarrow()
    for name in files:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{path}/{DATASET_STATE} lists {name}, which is missing")
        try:
            with pa.memory_map(full) as mm:
                reader = pa.ipc.open_stream(mm)  # datasets writes Arrow streams
                for batch in reader:
                    yield where, batch
        except pa.ArrowInvalid as e:
            raise ValueError(f"{full}: not an Arrow stream file ({e})") from None

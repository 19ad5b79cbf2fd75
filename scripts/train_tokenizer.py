"""Train a SentencePiece vocabulary on local text, then point a config at it.

    python scripts/train_tokenizer.py --input 'corpus/*.jsonl' --field text --vocab_size 8000 --out runs/spm/x
    python scripts/train_tokenizer.py --config configs/tiny.py:stage=pretrain --vocab_size 512 \
        --out runs/spm/tiny
    ... --config.data.vocab.kind=sentencepiece --config.data.vocab.path=runs/spm/tiny.model

Inputs are text files (``.txt``, whole files) and JSONL files (the string ``--field`` of each line, or every
string field when it is empty), or every source of a config's ``data`` section (all their text: documents,
prompts and responses). PAD/UNK/BOS/EOS are ids 0-3; byte fallback means nothing encodes to UNK.
"""

import collections
import glob
import json

from absl import app, flags, logging
from ml_collections import config_flags

from gptjax.data import clean, sources
from gptjax.data import config as config_lib
from gptjax.data import vocab as vocab_lib

config_flags.DEFINE_config_file("config", None, "Python config file (with :arg) whose data sources to read.")
flags.DEFINE_list("input", [], "Text (.txt) or JSONL files or globs to train on.")
flags.DEFINE_string("field", "", "JSONL: the field to read ('' = every string field).")
flags.DEFINE_integer("vocab_size", 1024, "Vocabulary size (PAD/UNK/BOS/EOS and 256 byte pieces included).")
flags.DEFINE_string("model_type", "bpe", "'bpe' or 'unigram'.")
flags.DEFINE_string("out", None, "Output prefix: writes PREFIX.model and PREFIX.vocab.")
flags.mark_flag_as_required("out")


def texts_from_files(patterns: list[str], field: str) -> list[str]:
    out = []
    for pattern in patterns:
        files = sorted(glob.glob(pattern))
        if not files:
            raise FileNotFoundError(f"--input: no file matches {pattern!r}")
        for path in files:
            with open(path, encoding="utf-8") as fh:
                if not path.endswith((".jsonl", ".json")):
                    out.append(fh.read())
                    continue
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                    if field and not isinstance(rec.get(field), str):
                        raise ValueError(f"{path}:{lineno}: field {field!r} is missing or not a string")
                    out += [rec[field]] if field else [v for v in rec.values() if isinstance(v, str)]
    return out


def texts_from_config(data_cfg) -> list[str]:
    out = []
    for name, src in data_cfg.sources.items():
        counts: collections.Counter = collections.Counter()
        records = sources.read(name, src, "train", data_cfg, vocab_lib.render_plain_chat, counts) or []
        out += [t for r in records for t in clean.record_text(r).split("\x1f")]
        logging.info("source %s: %d records", name, len(records))
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = flags.FLAGS.config
    if not flags.FLAGS.input and cfg is None:
        raise app.UsageError("give --input files or a --config whose data sources to read")
    texts = texts_from_files(flags.FLAGS.input, flags.FLAGS.field)
    if cfg is not None:
        texts += texts_from_config(cfg.data if "data" in cfg else config_lib.default_config())
    path = vocab_lib.train_sentencepiece(
        texts, flags.FLAGS.out, flags.FLAGS.vocab_size, flags.FLAGS.model_type
    )
    vocab = vocab_lib.SentencePieceVocabulary(path)
    print(
        f"wrote {path}: vocab_size={vocab.vocab_size} "
        f"pad={vocab.pad_id} bos={vocab.bos_id} eos={vocab.eos_id}"
    )
    print(f"use it with --config.data.vocab.kind=sentencepiece --config.data.vocab.path={path}")


if __name__ == "__main__":
    app.run(main)

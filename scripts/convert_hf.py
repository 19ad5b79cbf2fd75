"""Convert between Hugging Face checkpoints and gptjax workdirs.

    # HF directory (config.json + safetensors) -> a workdir that --config.train.init_from=WORKDIR starts from
    python scripts/convert_hf.py --from-hf path/to/llama --to runs/llama_base

    # a training workdir (latest step or --step) -> HF directory; LoRA adapters are merged into the base
    python scripts/convert_hf.py --to-hf out/hf_model --from runs/sft [--base runs/llama_base]
    # one role of a run with several (PPO's policy, its EMA), a LoRA policy's adapters merged the same way
    python scripts/convert_hf.py --to-hf out/hf_policy --from runs/ppo --role policy [--ema]

The tokenizer travels along: copied into WORKDIR/tokenizer on import (with its chat template) and back out on
export (``--tokenizer`` overrides); a run on the byte vocabulary (or on an HF tokenizer named in its
``data.vocab``) exports that vocabulary as an HF tokenizer. Exports carry bos / eos / pad ids and a
generation_config.json, so transformers' AutoTokenizer + AutoModelForCausalLM + generate work on them as they
are. A LoRA run stores only its adapters; its base comes from ``--base`` (a workdir or an HF directory) or, by
default, from the run's own ``train.init_from`` (the role's ``roles.<role>.init_from``); a base the run
held quantised comes back as the quantised weights it trained on.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from gptjax import checkpoint, model
from gptjax.data import vocab as vocab_lib
from gptjax.interop import hf, hf_tokenizer, lora
from gptjax.model import sharding
from gptjax.train.state import TrainState


def from_hf(src: str, workdir: str, dtype: str | None, shard: bool) -> None:

    mesh = sharding.make_mesh({"fsdp": -1}) if shard else None
    cfg, params = hf.load(src, mesh=mesh, dtype=dtype)
    mngr = checkpoint.manager(workdir)
    if mngr.latest_step() is not None:
        raise FileExistsError(f"{workdir} already holds checkpoints; pick a new --to directory")
    # A step-0 checkpoint in the training layout, so train.init_from and checkpoint.load_model read it.
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state={})
    meta = checkpoint.meta_for(cfg, "hf", source=os.path.abspath(src))
    checkpoint.save(mngr, state, data_state=None, meta=meta)
    mngr.wait_until_finished()
    copied = _copy_tokenizer(src, os.path.join(workdir, "tokenizer"))
    print(
        f"{src} -> {workdir}: {model.num_params(cfg):,} params ({cfg.family}, {cfg.param_dtype}); "
        f"tokenizer: {', '.join(copied) or 'none found'}"
    )


def _copy_tokenizer(src: str, dst: str) -> list[str]:
    if not any(os.path.isfile(os.path.join(src, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return []
    os.makedirs(dst, exist_ok=True)
    return hf.copy_tokenizer(src, dst)


def to_hf(
    workdir: str,
    dst: str,
    step: int | None,
    base: str | None,
    tokenizer: str | None,
    max_shard_gb: float,
    role: str | None = None,
    ema: bool = False,
) -> None:
    step, meta = checkpoint.load_meta(workdir, step)
    # a LoRA run comes back with its adapters on the base it was trained on; hf.save merges them
    cfg, params = checkpoint.load_model(workdir, step, base=base, role=role, ema=ema)
    tok_src = [os.path.join(workdir, "tokenizer")]
    if cfg.lora_rank:
        base_path = base or checkpoint.lora_base_path(workdir, meta, role)
        tok_src += [os.path.join(base_path, "tokenizer"), base_path]
    tok = tokenizer or next(
        (
            d
            for d in tok_src
            if any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer.model"))
        ),
        None,
    )
    tok = tok or _run_vocabulary(workdir, step, cfg)
    hf.save(cfg, params, dst, tokenizer=tok, max_shard_bytes=int(max_shard_gb * 2**30))
    merged = (
        f", {len(jax.tree.leaves(lora.split(params)[0]))} adapter tensors merged" if cfg.lora_rank else ""
    )
    said = "the byte vocabulary" if hf_tokenizer.is_byte(tok) else getattr(tok, "path", tok)
    print(f"{workdir} step {step} -> {dst}{merged}; tokenizer: {said or 'none found (pass --tokenizer)'}")


def _run_vocabulary(workdir: str, step: int, cfg: model.ModelConfig):
    """The vocabulary the run trained with (its data.vocab), when an HF export can carry it: the byte
    vocabulary or an HF tokenizer; None for a SentencePiece model (pass --tokenizer)."""
    try:
        vocab = checkpoint.load_vocabulary(workdir, step)
    except (OSError, ValueError) as e:  # its files moved since the run: the export goes without
        print(f"the run's vocabulary is not readable ({e}); pass --tokenizer to export one")
        return None
    if isinstance(vocab, vocab_lib.ByteVocabulary) and cfg.vocab_size >= vocab.vocab_size:
        return vocab
    return vocab if isinstance(vocab, vocab_lib.HuggingFaceVocabulary) else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="import this HF checkpoint directory")
    way.add_argument("--to-hf", metavar="HF_DIR", help="export to this HF checkpoint directory")
    p.add_argument("--to", metavar="WORKDIR", help="with --from-hf: the workdir to write")
    p.add_argument("--from", dest="src", metavar="WORKDIR", help="with --to-hf: the workdir to read")
    p.add_argument("--step", type=int, default=None, help="with --to-hf: checkpoint step (default: latest)")
    p.add_argument("--base", default=None, help="with --to-hf of a LoRA run: base workdir or HF directory")
    p.add_argument("--role", default=None, help="with --to-hf: the role of a run with several (e.g. policy)")
    p.add_argument("--ema", action="store_true", help="with --to-hf: the role's EMA weights")
    p.add_argument(
        "--tokenizer", default=None, help="with --to-hf: tokenizer dir or tokenizer.json to copy, or 'byte'"
    )
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="param dtype on import")
    p.add_argument("--shard", action="store_true", help="load sharded over all local devices (fsdp)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors file size on export")
    args = p.parse_args(argv)
    if args.from_hf:
        if not args.to:
            p.error("--from-hf needs --to WORKDIR")
        from_hf(args.from_hf, args.to, args.dtype, args.shard)
    else:
        if not args.src:
            p.error("--to-hf needs --from WORKDIR")
        to_hf(
            args.src, args.to_hf, args.step, args.base, args.tokenizer, args.max_shard_gb, args.role, args.ema
        )


if __name__ == "__main__":
    main(sys.argv[1:])

"""gptjax against Hugging Face transformers (torch CPU) on the same weights: training and greedy generation.

    python scripts/bench_vs_hf.py                      # the tiny LLaMA, torch on 2 threads, CPU
    python scripts/bench_vs_hf.py --repeats 5 --torch-threads 4

A random ``LlamaForCausalLM`` (vocab 512, d_model 256, 4 layers, 8 heads, 4 KV heads, d_ff 688) is saved by
transformers to a temporary directory and loaded into gptjax with ``gptjax.interop.hf.load``, so both run the
same function. Training: B8 x L256, AdamW, tokens/s over all B*L tokens (no padding here), through
``step.make_train_step(losses.lm.loss_fn, ...)``. Generation: greedy, B16, prompt 32, 128 new tokens, through
``sample.generate(..., temperature=0)`` and ``model.generate(do_sample=False)`` with EOS disabled, so both
produce exactly B * 128 tokens. Both frameworks are timed turn about in each repeat (the machine is shared
and noisy) and the table reports the medians and their ratio. The targets are >= 1.0x (train) and >= 2.0x
(generate); on the 2-core development CPU (five runs, 2026-11-27) this measured 0.69-0.85x and
1.70-1.91x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from gptjax.interop import hf
from gptjax.losses import lm
from gptjax.model import sample
from gptjax.train import state as state_lib
from gptjax.train import step

TINY_LLAMA = dict(
    vocab_size=512,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=688,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def save_hf_model(path: str, seed: int) -> None:
    # torch and transformers: the test extras, heavy
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(path, safe_serialization=True)


# ----------------------------------------------------------------------------------------------------
# Hugging Face side


def hf_train(path: str, tokens_BL: np.ndarray, lr: float):
    # torch and transformers: the test extras, heavy
    """A closure that runs one AdamW step of transformers' model and returns the loss."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    inputs = torch.from_numpy(tokens_BL[:, :-1].astype(np.int64)).contiguous()
    labels = torch.from_numpy(tokens_BL[:, 1:].astype(np.int64)).contiguous()

    def run():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


# torch and transformers: the test extras, heavy


def hf_generate(path: str, prompts_BP: np.ndarray, new_tokens: int):
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompts = torch.from_numpy(prompts_BP.astype(np.int64))
    mask = torch.ones_like(prompts)

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids=prompts,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        return out[:, prompts_BP.shape[1] :].numpy()

    return run


# ----------------------------------------------------------------------------------------------------
# gptjax side


def jax_train(path: str, tokens_BL: np.ndarray, lr: float):
    import optax

    cfg, params = hf.load(path)
    optimizer = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.0)
    train_step = step.make_train_step(lm.loss_fn, optimizer)
    ctx = step.Ctx(model_cfg=cfg)
    batch = {
        "inputs_BL": jax.numpy.asarray(tokens_BL[:, :-1]),
        "targets_BL": jax.numpy.asarray(tokens_BL[:, 1:]),
        "weights_BL": jax.numpy.ones(tokens_BL[:, 1:].shape, jax.numpy.float32),
    }
    holder = {"state": state_lib.create(params, optimizer, ema=False)}
    rng = jax.random.key(0)

    def run():
        holder["state"], metrics = train_step(holder["state"], batch, rng, ctx)
        return float(metrics["loss"])

    return run, cfg


def jax_generate(path: str, prompts_BP: np.ndarray, new_tokens: int):
    cfg, params = hf.load(path)
    prompts = jax.numpy.asarray(prompts_BP, jax.numpy.int32)
    rng = jax.random.key(0)

    def run():
        out = sample.generate(cfg, params, prompts, rng, max_new_tokens=new_tokens, temperature=0.0)
        return np.asarray(out)

    return run


# ----------------------------------------------------------------------------------------------------


def time_calls(fn, calls: int) -> float:
    """Wall seconds per call of ``fn`` (which returns host values, so each call is complete)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="turns of (HF, gptjax) timing per benchmark")
    parser.add_argument("--train-steps", type=int, default=10, help="train steps per timed turn")
    parser.add_argument("--generate-calls", type=int, default=2, help="generate calls per timed turn")
    # torch and transformers: the test extras, heavy
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.torch_threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    rng = np.random.default_rng(args.seed)
    B, L = 8, 256
    GB, GP, GT = 16, 32, 128
    tokens_BL = rng.integers(0, TINY_LLAMA["vocab_size"], (B, L + 1)).astype(np.int32)
    prompts_BP = rng.integers(1, TINY_LLAMA["vocab_size"], (GB, GP)).astype(np.int32)

    with tempfile.TemporaryDirectory() as path:
        save_hf_model(path, args.seed)
        runs = {
            "train": (hf_train(path, tokens_BL, 1e-3), jax_train(path, tokens_BL, 1e-3)[0]),
            "generate": (hf_generate(path, prompts_BP, GT), jax_generate(path, prompts_BP, GT)),
        }
        # Same weights, same batch: the first step's loss and the greedy tokens must agree.
        hf_loss, jax_loss = runs["train"][0](), runs["train"][1]()
        hf_tokens, jax_tokens = runs["generate"][0](), runs["generate"][1]()
        agree = float(np.mean(hf_tokens == jax_tokens))
        print(f"first-step loss: HF {hf_loss:.5f}  gptjax {jax_loss:.5f}")
        print(
            f"greedy tokens equal to HF's: {100 * agree:.1f}%  (first 8 new tokens of row 0 equal: "
            f"{bool(np.all(hf_tokens[0, :8] == jax_tokens[0, :8]))})"
        )
        for fn in (runs["train"][0], runs["train"][1]):  # warm up (compile, allocator)
            fn()
        calls = {"train": args.train_steps, "generate": args.generate_calls}
        tokens = {"train": B * L, "generate": GB * GT}
        rates: dict[str, tuple[list, list]] = {k: ([], []) for k in runs}
        for _ in range(args.repeats):
            for name, (hf_fn, jax_fn) in runs.items():
                for side, fn in zip(rates[name], (hf_fn, jax_fn), strict=True):
                    side.append(tokens[name] / time_calls(fn, calls[name]))

    rows = {
        "train": f"train, B{B} x L{L}, AdamW, tokens/s",
        "generate": f"greedy generation, B{GB}, prompt {GP}, {GT} new, tokens/s",
    }
    print(
        f"\ntorch {torch.__version__} on {args.torch_threads} threads; jax {jax.__version__} on "
        f"{jax.default_backend()} ({os.cpu_count()} CPUs); median of {args.repeats} turns\n"
    )
    print("| | HF transformers | gptjax | ratio |")
    print("|---|---|---|---|")
    for name, (hf_rates, jax_rates) in rates.items():
        h, j = statistics.median(hf_rates), statistics.median(jax_rates)
        print(f"| {rows[name]} | {h:,.0f} | {j:,.0f} | {j / h:.2f}x |")


if __name__ == "__main__":
    main()

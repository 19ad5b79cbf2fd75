"""Benchmark attention implementations: xla / cudnn / pallas, forward and forward+backward, and decode.

    python scripts/bench_attention.py                 # GPU: seq 1k-16k, head dim 64/128, bf16
    python scripts/bench_attention.py --quick         # tiny sizes, any backend (CPU: Pallas interpreter)

On packed batches cuDNN gets the equivalent dense mask, built outside the timed step (its best case).
FLOPs count only visible (query, key) pairs, so causal attention is about half of non-causal and packed
batches count only pairs inside a document: forward = 4 * pairs * D per head (QK^T and PV), backward =
2.5x forward (five matmuls to two), as in the FlashAttention papers. Every implementation is timed on the
same work, so TFLOP/s compare directly. Decode reports ms and the GB/s of reading the valid part of the
KV cache against the HBM bound (--hbm-gbps, H100 SXM: 3350).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.kernels import decode_attention as da
from gptjax.kernels import flash_attention as fa
from gptjax.model import attention as attn_lib


def _time(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median wall time in ms of fn(*args) (jitted, results blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _packed_segments(rng: np.random.Generator, B: int, L: int, mean_doc: int) -> np.ndarray:
    """Documents of random lengths (exponential, mean ``mean_doc``) packed back to back, ids 1, 2, ..."""
    seg = np.zeros((B, L), np.int32)
    for b in range(B):
        pos, doc = 0, 1
        while pos < L:
            n = max(16, int(rng.exponential(mean_doc)))
            seg[b, pos : pos + n] = doc
            pos, doc = pos + n, doc + 1
    return seg


def _visible_pairs(seg: np.ndarray | None, B: int, L: int, causal: bool) -> float:
    if seg is None:
        return B * (L * (L + 1) / 2 if causal else L * L)
    total = 0.0
    for row in seg:
        _, counts = np.unique(row[row > 0], return_counts=True)
        total += float(np.sum(counts * (counts + 1) / 2 if causal else counts * counts))
    return total


def bench_attention(impl, B, L, H, K, D, causal, seg, iters, dtype, block_sizes=None):
    key = jax.random.PRNGKey(0)
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B, L, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, L, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, L, K, D), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (B, L, H, D), jnp.float32).astype(dtype)
    seg_j = None if seg is None else jnp.asarray(seg)
    attn = functools.partial(attn_lib.attention, impl=impl, causal=causal)
    if block_sizes is not None:  # tile tuning: the kernel itself, one device, these tiles
        attn = functools.partial(fa.flash_attention, causal=causal, block_sizes=block_sizes)
    if impl == "cudnn" and seg is not None:
        # cuDNN's best case on packed batches: the dense [B, 1, L, S] mask is built once, outside the timing.
        seg_j = attn_lib.attention_mask(L, L, causal, seg_j)[:, None]

        def attn(q, k, v, segment_ids_BL):
            return jax.nn.dot_product_attention(q, k, v, mask=segment_ids_BL, implementation="cudnn")

    fwd = jax.jit(lambda q, k, v, s: attn(q, k, v, segment_ids_BL=s))
    fwd_bwd = jax.jit(
        lambda q, k, v, s, do: jax.vjp(lambda q, k, v: attn(q, k, v, segment_ids_BL=s), q, k, v)[1](do)
    )
    t_f = _time(fwd, q, k, v, seg_j, iters=iters)
    t_fb = _time(fwd_bwd, q, k, v, seg_j, do, iters=iters)
    flops_f = 4.0 * _visible_pairs(seg, B, L, causal) * H * D
    return t_f, flops_f / t_f / 1e9, t_fb, 3.5 * flops_f / t_fb / 1e9


def check_pallas(L, H, K, D, causal, seg, dtype, block_sizes=None) -> float:
    """Max relative error of the pallas output and q/k/v grads vs the fp32 reference (batch row 0)."""
    ks = jax.random.split(jax.random.PRNGKey(2), 4)
    q = jax.random.normal(ks[0], (1, L, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (1, L, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (1, L, K, D), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (1, L, H, D), jnp.float32).astype(dtype)
    s = None if seg is None else jnp.asarray(seg[:1])
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    @jax.jit
    def both(q, k, v, do):
        out, vjp = jax.vjp(
            lambda q, k, v: fa.flash_attention(q, k, v, causal, s, block_sizes=block_sizes), q, k, v
        )
        ref = lambda q, k, v: fa.flash_attention_reference(q, k, v, causal, s)  # noqa: E731
        out_r, vjp_r = jax.vjp(ref, f32(q), f32(k), f32(v))
        return (out, *vjp(do)), (out_r, *vjp_r(f32(do)))

    got, want = both(q, k, v, do)
    errs = [jnp.linalg.norm(f32(a) - b) / jnp.linalg.norm(b) for a, b in zip(got, want, strict=True)]
    return float(max(errs))


# Candidate tiles (block_q, block_k, block_q_dkv, block_k_dkv, block_q_dq, block_k_dq, warps, stages[, fused])
# The forward kernel wants wide q tiles and several pipeline stages, the dk/dv kernel wide kv tiles; 'fused'
# runs the backward as one kernel (dq by atomic adds). The first two are the measured two-kernel defaults.
TUNE_CANDIDATES = (
    (64, 64, 64, 64, 64, 64, 4, 3),
    (128, 64, 64, 128, 128, 64, 8, 2),
    (128, 128, 64, 128, 128, 64, 8, 2),
    (64, 64, 64, 64, 64, 64, 4, 3, True),
    (128, 64, 64, 64, 64, 64, 8, 2, True),
    (128, 64, 64, 128, 128, 64, 8, 2, True),
    (128, 64, 32, 128, 128, 64, 8, 2, True),
    (128, 128, 64, 128, 128, 64, 8, 2, True),
)


def tune(L, D, tokens, model_dim, gqa, iters, dtype):
    """fwd and fwd+bwd ms of each candidate tiling (causal, unpacked); returns the rows and the best one."""
    H = max(1, model_dim // D)
    K, B = max(1, H // gqa), max(1, tokens // L)
    rows = []
    for cand in TUNE_CANDIDATES:
        bs = fa.BlockSizes(*cand)
        try:
            t_f, _, t_fb, fbtf = bench_attention("pallas", B, L, H, K, D, True, None, iters, dtype, bs)
        except Exception as e:  # noqa: BLE001 - a tiling can exceed shared memory; report it and go on
            print(f"  tune L={L} D={D} {cand}: {type(e).__name__}: {str(e)[:160]}")
            continue
        rows.append((cand, t_f, t_fb, fbtf))
    best = min(rows, key=lambda r: r[2])[0] if rows else None
    return rows, best


def bench_decode(B, S, H, K, D, iters, dtype, hbm_gbps, **tiles):
    """ms per decode step (inside a jitted loop), GB/s, the HBM-bound ms and the max error; ``tiles`` go to
    the kernel (block_k, num_splits, num_warps, num_stages)."""
    key = jax.random.PRNGKey(1)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, H, D), jnp.float32).astype(dtype)
    kc = jax.random.normal(kk, (B, K, D, S), jnp.float32).astype(dtype)  # init_cache's layouts
    vc = jax.random.normal(kv, (B, K, S, D), jnp.float32).astype(dtype)
    lengths = jnp.full((B,), S, jnp.int32)
    fn = jax.jit(functools.partial(da.decode_attention, **tiles))
    ref = jax.jit(da.decode_attention_reference)
    steps = 50

    @jax.jit
    def decode_loop(q, kc, vc, lengths):
        # Decoding runs inside one jitted loop, each step needing the last: time it so, without per-call
        # dispatch (which alone costs more than a small cache read).
        return jax.lax.fori_loop(0, steps, lambda i, q: fn(q, kc, vc, lengths), q)

    err = float(
        jnp.max(
            jnp.abs(fn(q, kc, vc, lengths).astype(jnp.float32) - ref(q, kc, vc, lengths).astype(jnp.float32))
        )
    )
    ms = _time(decode_loop, q, kc, vc, lengths, iters=iters) / steps
    nbytes = 2 * B * S * K * D * jnp.dtype(dtype).itemsize
    bound_ms = nbytes / (hbm_gbps * 1e9) * 1e3
    return ms, nbytes / ms / 1e6, bound_ms, err


DECODE_SWEEP = {"block_k": (64, 128), "split_factor": (1, 2, 4), "num_stages": (2, 3, 4)}


def tune_decode(shapes: str, H: int, K: int, D: int, iters: int, dtype, hbm_gbps: float) -> None:
    """x bound of each (block_k, splits, stages) on the decode shapes (splits: split_factor x the default)."""
    print(f"\nDecode tile sweep, hd {D}, H/K {H}/{K} (x HBM bound, lower is better; default splits x factor)")
    print(f"{'B':>3} {'cache':>7} {'block_k':>7} {'factor':>6} {'stages':>6} {'ms':>9} {'x bound':>8}")
    for shape in shapes.split(","):
        B, S = map(int, shape.split("x"))
        results = []
        for bk in DECODE_SWEEP["block_k"]:
            for f in DECODE_SWEEP["split_factor"]:
                for st in DECODE_SWEEP["num_stages"]:
                    splits = f * -(-264 // (B * K))
                    ms, _, bound, _ = bench_decode(
                        B, S, H, K, D, iters, dtype, hbm_gbps, block_k=bk, num_splits=splits, num_stages=st
                    )
                    results.append((ms / bound, ms, bk, f, st))
        best = min(results)
        for row in results:
            mark = " <- best" if row == best else ""
            print(f"{B:3d} {S:7d} {row[2]:7d} {row[3]:6d} {row[4]:6d} {row[1]:9.4f} {row[0]:8.2f}{mark}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU-friendly smoke run)")
    p.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--impls", default="xla,cudnn,pallas")
    p.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seq")
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // head_dim")
    p.add_argument("--gqa", type=int, default=1, help="query heads per kv head")
    p.add_argument("--mean-doc", type=int, default=0, help="packed mean document length (0: seq // 4)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--xla-max-seq", type=int, default=8192, help="skip xla above this (scores in memory)")
    p.add_argument("--check-max-seq", type=int, default=4096, help="check pallas vs reference up to here")
    p.add_argument("--hbm-gbps", type=float, default=3350.0)
    p.add_argument("--max-err", type=float, default=0.0, help="exit 1 if a checked rel err exceeds this")
    p.add_argument("--tune", action="store_true", help="sweep pallas tiles at --tune-seq, then rerun pallas")
    p.add_argument("--tune-seq", type=int, default=4096)
    p.add_argument("--decode-tune", default="", help="BxS decode shapes to sweep tiles on (head dim 128)")
    p.add_argument("--decode", default="8x4096,8x16384,32x2048,1x65536", help="BxS cache shapes")
    args = p.parse_args()
    if args.quick:
        args.seqs, args.head_dims, args.tokens, args.model_dim = "64", "64", 64, 128
        args.iters, args.decode = 2, "2x128"
    dtype = jnp.bfloat16
    backend = jax.default_backend()
    impls = [i for i in args.impls.split(",") if i != "cudnn" or backend == "gpu"]
    print(
        f"jax {jax.__version__}, device: {jax.devices()[0].device_kind} ({backend}); bf16; "
        f"impls {impls}{'' if 'cudnn' in impls else ' (cudnn needs a GPU)'}"
    )
    best_by_dim = {}
    if args.tune:  # first, so the tuned tiles join the table below as impl 'tuned'
        print(f"\nTile sweep: pallas, causal, seq {args.tune_seq}, bf16 (fwd+bwd ms, lower is better)")
        print(
            f"{'hd':>4} {'(bq, bk, bq_dkv, bk_dkv, bq_dq, bk_dq, warps, stages)':52} "
            f"{'fwd ms':>8} {'f+b ms':>8}"
        )
        for D in map(int, args.head_dims.split(",")):
            tune_rows, best = tune(args.tune_seq, D, args.tokens, args.model_dim, args.gqa, args.iters, dtype)
            for cand, t_f, t_fb, _ in tune_rows:
                mark = " <- best" if cand == best else ""
                print(f"{D:4d} {str(cand):52} {t_f:8.3f} {t_fb:8.3f}{mark}")
            if best is not None:
                best_by_dim[D] = best
    rng = np.random.default_rng(0)
    rows = []
    for D in map(int, args.head_dims.split(",")):
        H = max(1, args.model_dim // D)
        K = max(1, H // args.gqa)
        for L in map(int, filter(None, args.seqs.split(","))):
            B = max(1, args.tokens // L)
            for case in ("causal", "packed"):
                seg = _packed_segments(rng, B, L, args.mean_doc or L // 4) if case == "packed" else None
                for impl in impls + (["tuned"] if D in best_by_dim else []):
                    if impl == "xla" and L > args.xla_max_seq:
                        continue
                    tiles = fa.BlockSizes(*best_by_dim[D]) if impl == "tuned" else None
                    try:
                        res = bench_attention(
                            "pallas" if tiles else impl, B, L, H, K, D, True, seg, args.iters, dtype, tiles
                        )
                    except Exception as e:  # noqa: BLE001 - report and go on (OOM, unsupported shape)
                        print(f"  {impl} {case} L={L} D={D}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    err = float("nan")
                    if impl in ("pallas", "tuned") and L <= args.check_max_seq:
                        err = check_pallas(L, H, K, D, True, seg, dtype, tiles)
                    rows.append((case, L, D, B, H, K, impl, *res, err))
    print("\nAttention, bf16 (TFLOP/s over visible pairs; fwd+bwd counts 3.5x the forward FLOPs;")
    print("rel err: pallas output and q/k/v grads vs the fp32 reference, batch row 0)")
    hdr = (
        f"{'case':7} {'seq':>6} {'hd':>4} {'B':>3} {'H/K':>6} {'impl':7} {'fwd ms':>9} {'fwd TF/s':>9} "
        f"{'f+b ms':>9} {'f+b TF/s':>9} {'f+b vs cudnn':>12} {'rel err':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    cudnn_fb = {(r[0], r[1], r[2]): r[9] for r in rows if r[6] == "cudnn"}
    for case, L, D, B, H, K, impl, tf, ftf, tfb, fbtf, err in rows:
        ref = cudnn_fb.get((case, L, D))
        ratio = f"{ref / tfb:11.2f}x" if ref else f"{'':12}"
        hk = f"{H}/{K}"
        err_s = f"{err:8.1e}" if err == err else f"{'-':>8}"  # nan: not checked
        head = f"{case:7} {L:6d} {D:4d} {B:3d} {hk:>6} {impl:7}"
        print(f"{head} {tf:9.3f} {ftf:9.1f} {tfb:9.3f} {fbtf:9.1f} {ratio} {err_s}")
    decode_errs = []
    print(f"\nDecode attention (pallas), bf16, full caches; HBM bound at {args.hbm_gbps:.0f} GB/s")
    hdr = f"{'B':>3} {'cache':>7} {'hd':>4} {'H/K':>6} {'ms':>9} {'GB/s':>8} {'bound ms':>9} {'x bound':>8} "
    hdr += f"{'max err':>8}"
    print(hdr)
    print("-" * len(hdr))
    for D in map(int, args.head_dims.split(",")):
        H = max(1, args.model_dim // D)
        K = max(1, H // max(args.gqa, 4))  # decode is benchmarked with GQA (4 query heads per kv head)
        for shape in args.decode.split(","):
            B, S = map(int, shape.split("x"))
            ms, gbs, bound, err = bench_decode(B, S, H, K, D, args.iters, dtype, args.hbm_gbps)
            hk = f"{H}/{K}"
            print(
                f"{B:3d} {S:7d} {D:4d} {hk:>6} {ms:9.4f} {gbs:8.0f} {bound:9.4f} {ms / bound:8.2f} {err:8.1e}"
            )
            decode_errs.append(err)
    if args.decode_tune:
        H = max(1, args.model_dim // 128)
        tune_decode(args.decode_tune, H, max(1, H // 4), 128, args.iters, dtype, args.hbm_gbps)
    if args.max_err:
        worst = max([r[-1] for r in rows if r[-1] == r[-1]] + decode_errs, default=0.0)
        if worst > args.max_err:
            raise SystemExit(f"FAILED: pallas error {worst:.2e} exceeds --max-err {args.max_err:.1e}")
        print(f"correctness: worst pallas error {worst:.2e} <= {args.max_err:.1e}")


if __name__ == "__main__":
    main()

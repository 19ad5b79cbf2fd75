#!/usr/bin/env bash
# GPU checks in one go (about 8 minutes on one H100): kernel tests compiled (not interpreted), attention
# against cuDNN (TUNE=1: with a tile sweep first), decode attention against the HBM bound, and a ~1.2B LLaMA train step's MFU.
#
#   bash scripts/gpu_checks.sh            # prints one table per item; exits 1 on a correctness failure
#   SECTIONS="5 4" bash scripts/gpu_checks.sh   # some items only: 1 kernels, 2 attention + decode,
#                                               # d decode tile sweep, 4 MFU, 5 PPO tokens/s
#   TUNE=1 ATTN_IMPLS=cudnn SECTIONS=2 ...      # tile sweep (two-kernel and fused backward), then cuDNN vs
#                                               # the default ('pallas') and the sweep's best ('tuned')
#
# Runs from the repo root with whatever python has jax[cuda], flax and optax. The package is used in place
# (no install needed); ml_collections is taken from .whl/ when python lacks it (pip download it there).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# gptjax in place: the package plus kernels/ as gptjax.kernels (what pyproject's package-dir does).
SITE=$(mktemp -d)
mkdir -p "$SITE/gptjax" && cp -r gptjax/. "$SITE/gptjax/" && cp -r kernels "$SITE/gptjax/kernels"
if ! $PY -c "import ml_collections" 2>/dev/null && ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target "$SITE" .whl/ml_collections-*.whl
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fail=0
section() { echo; echo "=== $1 ($(date +%T))"; }
want() { [[ " ${SECTIONS:-1 2 4 5} " == *" $1 "* ]]; }

section "0. device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

if want 1; then
section "1. tests/test_kernels.py compiled on the GPU (fp32 compared at full fp32 precision, and bf16)"
# fp32 references must not silently use TF32 on the GPU, or they, not the kernels, would be off.
# KERNEL_TESTS_K: a pytest -k filter (a subset when time is short).
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 $PY -P -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  ${KERNEL_TESTS_K:+-k "$KERNEL_TESTS_K"} \
  || { echo "FAILED: kernel tests"; fail=1; }
fi

if want 5; then
section "5. PPO tokens/s: OPT-1.3B policy + 350M critic / reward (configs/ppo_1b.py), one GPU"
# DeepSpeed-Chat's count: prompts x (prompt + answer length) per second, generation + scoring + training.
for rb in ${PPO_ROLLOUTS:-128}; do
  timeout "${PPO_TIMEOUT:-240}" $PY scripts/bench_ppo.py --config configs/ppo_1b.py --config.rollout.batch_size="$rb" \
    --rollouts "${PPO_ROLLOUTS_TIMED:-4}" --warmup 1 2>&1 | grep -v "libtpu\|^I1\|^W1" || echo "bench_ppo rollout $rb did not finish"
done
fi

if want 2; then
section "2-3. attention vs cuDNN (causal, GQA 4, packed), tile sweep at 4k, decode vs the HBM bound"
timeout "${ATTN_TIMEOUT:-330}" $PY scripts/bench_attention.py --seqs 2048,4096,8192 --head-dims 64,128 \
  --impls "${ATTN_IMPLS:-cudnn,pallas}" \
  --gqa 4 --iters 5 ${TUNE:+--tune} --check-max-seq 2048 --max-err 3e-2 --hbm-gbps "${HBM_GBPS:-3350}" \
  || { echo "FAILED: attention bench"; fail=1; }
fi

if want d; then
section "3b. decode tile sweep (block_k x splits x pipeline stages) against the HBM bound"
timeout 150 $PY scripts/bench_attention.py --impls pallas --seqs "" --decode 8x4096 --head-dims 128 --gqa 4 \
  --iters 5 --decode-tune 8x4096,8x16384,1x65536 --hbm-gbps "${HBM_GBPS:-3350}" || echo "decode sweep did not finish"
fi

if want 4; then
section "4. MFU: ~1.2B LLaMA (configs/llama_1b.py) pretraining step, one GPU, batch 4 x 4096"
# variant = attention:remat:micro_batches:scan_layers[:fused] (fused: one-kernel attention backward);
# MFU_PROFILE=N also traces N steps and prints where the device time goes.
for variant in ${MFU_VARIANTS:-pallas:dots_no_batch:1:1 pallas:dots_no_batch:1:1:fused}; do
  IFS=: read -r impl remat micro scan fused <<<"$variant"
  GPTJAX_FLASH_FUSED_BWD=$([ "${fused:-}" = fused ] && echo 1 || echo 0) \
  timeout 120 $PY scripts/bench_train.py --profile "${MFU_PROFILE:-0}" --config configs/llama_1b.py --config.train.batch_size=4 \
    --config.train.seq_len=4096 --config.model.attention_impl="$impl" --config.model.remat="$remat" \
    --config.train.micro_batches="$micro" --config.model.scan_layers="$([ "$scan" = 0 ] && echo False || echo True)" \
    --steps 5 --warmup 2 2>&1 | grep -v "libtpu" | grep -v "^I1\|^W1" || echo "bench_train $variant did not finish"
done
fi
echo; echo "gpu_checks: $([ $fail = 0 ] && echo ALL CORRECTNESS CHECKS PASSED || echo CORRECTNESS FAILURES)"
exit $fail

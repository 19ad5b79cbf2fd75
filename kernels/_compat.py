"""Version and backend shims shared by the Pallas kernels.

The Pallas Triton backend is deprecated from jax 0.11 and is only chosen when Triton compiler params are
passed explicitly; their class moved between releases, so it is looked up here once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def backend() -> str:
    """'gpu' | 'tpu' | 'cpu': the default backend kernels are lowered for."""
    return jax.default_backend()


def use_interpret(interpret: bool) -> bool:
    """Kernels run in the Pallas interpreter when asked to, or on CPU where no lowering exists."""
    return bool(interpret) or backend() == "cpu"


def triton_params(num_warps: int, num_stages: int):
    """Triton compiler params under whichever name this jax release exports them."""
    try:
        from jax.experimental.pallas import triton as pltriton

        cls = getattr(pltriton, "CompilerParams", None)
    except ImportError:  # pragma: no cover - depends on the installed jax
        cls = None
    if cls is None:  # pragma: no cover - older/newer spellings
        from jax.experimental.pallas import gpu as plgpu

        cls = getattr(plgpu, "TritonCompilerParams", None) or plgpu.CompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def compiler_params(interpret: bool, num_warps: int, num_stages: int):
    # Passing Triton params explicitly is what selects the Triton lowering on jax 0.10 and 0.11 alike.
    """Explicit Triton params on GPU; none when interpreting."""
    if interpret:
        return None
    return triton_params(num_warps, num_stages)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, d] @ b[n, d]^T in fp32; fp32 inputs use full precision (no tf32)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a[k, m]^T @ b [k, n] in fp32."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def atomic_add(ref, idx, val) -> None:
    """ref[idx] += val atomically (Triton's atomic add; the interpreter applies it in grid order)."""
    from jax.experimental.pallas import triton as pltriton

    pltriton.atomic_add(ref, idx, val)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] @ b [k, n] in fp32."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)

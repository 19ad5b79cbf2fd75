"""What makes a checkpoint trustworthy: no non-finite array is written (``first_nonfinite``), every array's
checksum is recorded with it and compared when it is read back (``checksums`` / ``verify_checksums``), and
a step that fails either way is ``DamagedCheckpoint`` (``store.restore_latest`` then falls back to an older
one).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp


def _name(path) -> str:
    """'blocks/attn/wq': a param's key path as one string (the names errors and logs use)."""
    return "/".join(str(getattr(p, "key", p)) for p in path)


class DamagedCheckpoint(RuntimeError):
    """A checkpoint step that cannot be read: one of its files is missing, cut short or unreadable."""

    def __init__(self, step: int, path: str, detail: str):
        super().__init__(f"checkpoint step {step} is damaged: {path}: {detail}")
        self.step, self.path = step, path


@jax.jit
def _finite_flags(leaves: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def first_nonfinite(tree: Any) -> str | None:
    """The path of ``tree``'s first floating-point leaf holding a NaN or an infinity, or None."""
    leaves = [
        (path, x)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not leaves:
        return None
    flags = jax.device_get(_finite_flags([x for _, x in leaves]))
    bad = [jax.tree_util.keystr(path) for (path, _), ok in zip(leaves, flags, strict=True) if not ok]
    return (bad[0] or "(the root)") if bad else None


CHECKSUMS = "checksums"  # meta's key: {item: {array name: hex digest}}


def _words(x: jax.Array) -> jax.Array:
    """``x``'s bits as flat uint32 words (one per element of up to 4 bytes, two per 8-byte element)."""
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_ or size not in (1, 2, 4, 8):
        x = x.astype(jnp.uint8)
        size = 1
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: every input bit changes about half the output bits."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def _digests(leaves: list) -> jax.Array:
    """Two 32-bit sums per array of its words mixed with their positions (uint32 sums wrap exactly, so the
    result does not depend on the reduction order, the sharding or the number of processes)."""
    out = []
    for x in leaves:
        w = _words(x)
        i = jnp.arange(w.shape[0], dtype=jnp.uint32)
        out.append(
            jnp.stack(
                [
                    jnp.sum(_mix(w ^ (i * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32),
                    jnp.sum(
                        _mix((w + jnp.uint32(0x7F4A7C15)) ^ (i * jnp.uint32(0x85EBCA77))), dtype=jnp.uint32
                    ),
                ]
            )
        )
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def tree_checksums(tree: Any) -> dict[str, str]:
    """{array name: 16 hex digits} of each array of ``tree``, computed where the arrays are (one jitted
    call, only the digests come to the host). The arrays are global: every process computes the same
    digests of the whole array, whichever shards it holds, so several processes record and compare alike."""
    flat = [(_name(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    flat = [(n, x) for n, x in flat if hasattr(x, "dtype") and hasattr(x, "shape")]
    if not flat:
        return {}
    digests = jax.device_get(_digests([jnp.asarray(x) for _, x in flat]))
    return {n: f"{int(a):08x}{int(b):08x}" for (n, _), (a, b) in zip(flat, digests, strict=True)}


def checksums(state: Any) -> dict[str, dict[str, str]]:
    """The checksums ``save`` records in the step's meta: per array of params, EMA and optimizer state."""
    out = {
        "params": tree_checksums(state.params),
        "opt": tree_checksums({"step": state.step, "opt_state": state.opt_state}),
    }
    if state.ema_params is not None:
        out["ema"] = tree_checksums(state.ema_params)
    return out


def verify_checksums(step: int, step_dir: str, recorded: dict | None, trees: dict[str, Any]) -> None:
    """Raise ``DamagedCheckpoint`` naming the first array of ``trees`` ({item: restored tree}) whose checksum
    differs from the one its save recorded (a bit flipped on disk). Steps written before checksums were
    recorded (no ``recorded``) pass."""
    if not recorded:
        return
    for item, tree in trees.items():
        want = recorded.get(item)
        if want is None:
            continue
        got = tree_checksums(tree)
        for name, digest in got.items():
            if name in want and want[name] != digest:
                raise DamagedCheckpoint(
                    step,
                    os.path.join(step_dir, item),
                    f"array {item}/{name} does not match its checksum (saved {want[name]}, read {digest}): "
                    "its file changed after it was written",
                )

"""Helpers shared by the kernel files: power-of-two sizes and launch parameters.

Triton-backed Pallas needs every in-kernel array size to be a power of two, so the wrappers round
block sizes up with `pow2_ceil` and mask the loads and stores that run past the real extent.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# A row-block program that owns fewer entries than this is not worth launching; the wrappers aim
# for several programs per SM (132 SMs on an H100) so that enough loads are in flight.
TARGET_PROGRAMS = 264


def pow2_ceil(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def pow2_floor(n: int) -> int:
    """Largest power of two <= n (n >= 1)."""
    return 1 << (max(int(n), 1).bit_length() - 1)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Triton launch parameters; None lets Pallas pick."""

    num_warps: int | None = 4
    num_stages: int | None = None


def check_pow2(**sizes: int) -> None:
    for name, n in sizes.items():
        if n < 1 or n & (n - 1):
            raise ValueError(f"{name}={n} must be a power of two")


def check_block_keys(blocks: dict, allowed: tuple[str, ...], op: str) -> None:
    unknown = sorted(set(blocks) - set(allowed))
    if unknown:
        raise TypeError(f"{op}: unknown block arguments {unknown}; valid ones are {list(allowed)}")


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


NORMS = ("layernorm", "rmsnorm")


def apply_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None = None, *, kind: str,
               eps: float) -> jax.Array:
    """The models' LayerNorm / RMSNorm over the last axis: fp32 statistics, the result in x.dtype.

    The one definition that `dejavu_jax.model.norm` and the references of the kernels that normalise
    their input themselves share. LayerNorm takes its two statistics in one pass,
    var = E[x^2] - E[x]^2: both sums read x once, so XLA computes them in one reduction kernel (the
    two-pass form is two dependent kernels on the decode step's critical path); in fp32 over one row
    the cancellation error is ~1e-7 of E[x^2]. The kernels use the same formula.
    """
    x32 = x.astype(jnp.float32)
    if kind == "layernorm":
        mean = x32.mean(-1, keepdims=True)
        var = jnp.maximum(jnp.square(x32).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
        y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    elif kind == "rmsnorm":
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps) * scale.astype(jnp.float32)
    else:
        raise ValueError(f"norm kind must be one of {NORMS}, got {kind!r}")
    return y.astype(x.dtype)

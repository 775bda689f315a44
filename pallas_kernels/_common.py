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


def full_index(like: jax.Array, value) -> jax.Array:
    """An int32 index array of `like`'s shape filled with `value` (a scalar row/batch index), to pair
    with a vector of column indices in a kernel's ref indexing."""
    return jnp.full(like.shape, value, jnp.int32)


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
    if kind not in NORMS:
        raise ValueError(f"norm kind must be one of {NORMS}, got {kind!r}")
    x32 = x.astype(jnp.float32)
    mean, rstd = norm_mean_rstd(x32.sum(-1, keepdims=True), jnp.square(x32).sum(-1, keepdims=True),
                                x.shape[-1], kind=kind, eps=eps)
    y = (x32 - mean) * rstd * scale.astype(jnp.float32)
    if kind == "layernorm":
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def norm_mean_rstd(total, squares, d_model: int, *, kind: str, eps: float):
    """(mean, 1 / std) of a norm from a row's fp32 sum and sum of squares: the one-pass formula that
    apply_norm and the kernels that normalise in place share (mean 0 for RMSNorm)."""
    if kind == "layernorm":
        mean = total / d_model
        return mean, jax.lax.rsqrt(jnp.maximum(squares / d_model - mean * mean, 0.0) + eps)
    return jnp.zeros_like(total), jax.lax.rsqrt(squares / d_model + eps)

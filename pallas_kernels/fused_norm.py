"""Residual add + LayerNorm/RMSNorm in one kernel, for the decode step's per-layer glue.

At batch 1 a decoder layer's matvecs stream the weights near the copy bandwidth, and what is left
is a dozen small kernels per layer, each costing a launch and a memory round trip more than its
bytes. XLA lowers `h + delta` and a norm of the sum to separate kernels (the add, the statistics,
the normalisation); `add_norm` does all three for a row in one program:

    s = round(h + delta)             (the new residual, in h.dtype, as the unfused model rounds it)
    y = norm(s) * scale (+ shift)    (statistics in fp32 from the rounded s)

One program per row of [N, D]; the whole row sits in registers (D <= 16384 at 16 warps).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import pow2_ceil

NORMS = ("layernorm", "rmsnorm")
MAX_ROW = 1 << 14  # registers: 16384 fp32 values over 16 warps is 32 per thread


def _add_norm_kernel(*refs, d_model, block_d, eps, rms, has_delta, has_shift):
    # h_ref, [delta_ref], scale_ref, [shift_ref] -> [s_ref], y_ref; rows [N, D], vectors [D]
    refs = list(refs)
    h_ref = refs.pop(0)
    delta_ref = refs.pop(0) if has_delta else None
    scale_ref = refs.pop(0)
    shift_ref = refs.pop(0) if has_shift else None
    s_ref = refs.pop(0) if has_delta else None
    (y_ref,) = refs
    i = pl.program_id(0)
    col = jnp.arange(block_d, dtype=jnp.int32)
    ok = col < d_model
    x = plgpu.load(h_ref.at[i, col], mask=ok, other=0.0).astype(jnp.float32)
    if has_delta:
        x = x + plgpu.load(delta_ref.at[i, col], mask=ok, other=0.0).astype(jnp.float32)
        s = x.astype(s_ref.dtype)
        plgpu.store(s_ref.at[i, col], s, mask=ok)
        x = s.astype(jnp.float32)  # the statistics see the rounded residual, as the unfused model's do
    if rms:
        y = x * jax.lax.rsqrt(jnp.sum(x * x) / d_model + eps)
    else:
        centred = jnp.where(ok, x - jnp.sum(x) / d_model, 0.0)
        y = centred * jax.lax.rsqrt(jnp.sum(centred * centred) / d_model + eps)
    y = y * plgpu.load(scale_ref.at[col], mask=ok, other=0.0).astype(jnp.float32)
    if has_shift:
        y = y + plgpu.load(shift_ref.at[col], mask=ok, other=0.0).astype(jnp.float32)
    plgpu.store(y_ref.at[i, col], y.astype(y_ref.dtype), mask=ok)


@functools.partial(jax.jit, static_argnames=("eps", "norm", "num_warps", "interpret"))
def _add_norm(h, delta, scale, shift, *, eps: float, norm: str, num_warps: int, interpret: bool):
    rows, d_model = h.shape
    block_d = pow2_ceil(d_model)
    has_delta, has_shift = delta is not None, shift is not None
    kernel = functools.partial(_add_norm_kernel, d_model=d_model, block_d=block_d, eps=eps,
                               rms=norm == "rmsnorm", has_delta=has_delta, has_shift=has_shift)
    row = jax.ShapeDtypeStruct((rows, d_model), h.dtype)
    operands = [h] + ([delta] if has_delta else []) + [scale] + ([shift] if has_shift else [])
    out = pl.pallas_call(
        kernel,
        grid=(rows,),
        out_shape=(row, row) if has_delta else row,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="add_norm",
    )(*operands)
    return out if has_delta else (h, out)


def add_norm(h, delta, scale, shift=None, *, eps: float, norm: str = "layernorm", interpret: bool = False,
             num_warps: int | None = None):
    """(h + delta, norm(h + delta) * scale + shift) over the last axis, in h.dtype.

    h, delta [..., D] (delta None: just the norm of h, returned beside h unchanged); scale, shift [D]
    (shift None for RMSNorm or a bias-free LayerNorm); norm "layernorm" (mean and variance) or
    "rmsnorm". The sum is rounded to h.dtype before its statistics, as `h + delta` then a norm is.
    Returns (s, y), both shaped like h.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    d_model = h.shape[-1]
    if delta is not None and delta.shape != h.shape:
        raise ValueError(f"delta {delta.shape} must have the residual's shape {h.shape}")
    if scale.shape != (d_model,) or (shift is not None and shift.shape != (d_model,)):
        raise ValueError(f"scale/shift must be [{d_model}], got {scale.shape} / "
                         f"{None if shift is None else shift.shape}")
    if d_model > MAX_ROW:
        raise ValueError(f"rows of {d_model} > {MAX_ROW} do not fit one program's registers")
    lead = h.shape[:-1]
    flat = lambda a: None if a is None else a.reshape(-1, d_model)  # noqa: E731
    num_warps = num_warps or max(4, min(16, pow2_ceil(d_model) // 1024))
    s, y = _add_norm(flat(h), flat(None if delta is None else delta.astype(h.dtype)), scale, shift,
                     eps=float(eps), norm=norm, num_warps=num_warps, interpret=interpret)
    return s.reshape(lead + (d_model,)), y.reshape(lead + (d_model,))


@functools.partial(jax.jit, static_argnames=("eps", "norm"))
def add_norm_reference(h, delta, scale, shift=None, *, eps: float, norm: str = "layernorm"):
    """XLA reference: the model's unfused `h + delta` and norm (fp32 statistics of the rounded sum)."""
    s = h if delta is None else h + delta.astype(h.dtype)
    x = s.astype(jnp.float32)
    if norm == "rmsnorm":
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    else:
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    y = y * scale.astype(jnp.float32)
    if shift is not None:
        y = y + shift.astype(jnp.float32)
    return s, y.astype(h.dtype)

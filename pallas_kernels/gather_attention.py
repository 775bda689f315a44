"""Head-gathered attention for sparse decode: Q / out projections and attention over selected heads.

The projections reuse the row-gather kernels of gather_mlp.py: a head-major weight [H, Dh, D] is a
row-major [H * Dh, D] matrix in which head h owns the Dh contiguous rows h*Dh .. h*Dh + Dh - 1, so a
selected head is R = Dh rows (rows_per_idx = Dh).

Decode attention is split over the sequence (flash-decoding): program (b, i, s) attends query head
head_idx[i] of batch row b to one slice of the cache and writes its unnormalised output with its
running max and sum; a small XLA epilogue merges the slices. With batch 1 and a few selected heads,
the sequence split is what keeps the GPU's SMs busy.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import TARGET_PROGRAMS, cdiv, check_block_keys, check_pow2, pow2_ceil
from pallas_kernels.gather_mlp import (
    DOWN_BLOCK_KEYS,
    UP_BLOCK_KEYS,
    default_down_blocks,
    default_up_blocks,
    gather_rows_matvec,
    gather_rows_reduce,
)

ATTN_BLOCK_KEYS = ("block_s", "seq_splits", "num_warps", "num_stages")
# Finite "minus infinity" for masked scores: keeps exp(m_old - m_new) finite when a whole block is
# masked, where -inf would give exp(-inf + inf) = nan.
_NEG = -1e30


# --------------------------------------------------------------------------------------------------
# Q (or K / V) projection of selected heads, and the out projection.
# --------------------------------------------------------------------------------------------------


def gathered_head_proj(x, w, idx, b=None, *, interpret=False, **blocks):
    """Project x onto the selected heads only.

    x [B, D]; w [H, Dh, D] head-major; idx [Kh] int32 distinct; b [H, Dh] or None.
    Returns [B, Kh, Dh] in x.dtype: out[b, k] = w[idx[k]] @ x[b] (+ b[idx[k]]), fp32 sums.
    """
    check_block_keys(blocks, UP_BLOCK_KEYS, "gathered_head_proj")
    _, head_dim, d_model = w.shape
    n_sel = idx.shape[0]
    cfg = dataclasses.replace(default_up_blocks(n_sel * head_dim, d_model, 1, x.shape[0]),
                              **blocks)
    return _gathered_head_proj(x, w, idx, b, blocks=cfg, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def _gathered_head_proj(x, w, idx, b, *, blocks, interpret):
    n_heads, head_dim, d_model = w.shape
    h = gather_rows_matvec(
        x, w.reshape(n_heads * head_dim, d_model), idx,
        None if b is None else b.reshape(n_heads * head_dim),
        rows_per_idx=head_dim, n_parts=1, activation="none", blocks=blocks, interpret=interpret)
    return h.reshape(x.shape[0], idx.shape[0], head_dim)  # [B, Kh*Dh] -> [B, Kh, Dh]


@jax.jit
def gathered_head_proj_reference(x, w, idx, b=None):
    w_sel = jnp.take(w, idx, axis=0)  # [Kh, Dh, D]
    out = jnp.einsum("BD,KHD->BKH", x, w_sel, preferred_element_type=jnp.float32)
    if b is not None:
        out = out + jnp.take(b, idx, axis=0).astype(jnp.float32)[None]
    return out.astype(x.dtype)


def gathered_out_proj(o, w_out, idx, *, interpret=False, **blocks):
    """Mix the selected heads' attention outputs back to the model width.

    o [B, Kh, Dh]; w_out [H, Dh, D] (out = sum_h o_h @ w_out[h]); idx [Kh].
    Returns [B, D] in o.dtype, fp32 sums.
    """
    check_block_keys(blocks, DOWN_BLOCK_KEYS, "gathered_out_proj")
    _, head_dim, d_model = w_out.shape
    batch, n_sel, _ = o.shape
    cfg = dataclasses.replace(default_down_blocks(n_sel * head_dim, d_model, batch), **blocks)
    return _gathered_out_proj(o, w_out, idx, blocks=cfg, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def _gathered_out_proj(o, w_out, idx, *, blocks, interpret):
    n_heads, head_dim, d_model = w_out.shape
    batch, n_sel, _ = o.shape
    return gather_rows_reduce(
        o.reshape(batch, n_sel * head_dim), w_out.reshape(n_heads * head_dim, d_model), idx,
        rows_per_idx=head_dim, blocks=blocks, interpret=interpret)


@jax.jit
def gathered_out_proj_reference(o, w_out, idx):
    w_sel = jnp.take(w_out, idx, axis=0)  # [Kh, Dh, D]
    out = jnp.einsum("BKH,KHD->BD", o, w_sel, preferred_element_type=jnp.float32)
    return out.astype(o.dtype)


# --------------------------------------------------------------------------------------------------
# Decode attention over selected heads.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttnBlocks:
    block_s: int  # cache slots per loop step
    seq_splits: int  # programs per (batch row, head) along the sequence
    num_warps: int = 4
    num_stages: int | None = None


def default_attn_blocks(batch: int, n_sel: int, seq_len: int, head_dim: int) -> AttnBlocks:
    """[block_s, Dh] K/V tiles of ~8K elements; enough sequence splits to fill the SMs."""
    block_s = max(min(8192 // pow2_ceil(head_dim), pow2_ceil(seq_len)), 16)
    steps = cdiv(seq_len, block_s)
    seq_splits = max(min(steps, cdiv(TARGET_PROGRAMS, batch * n_sel)), 1)
    return AttnBlocks(block_s=block_s, seq_splits=seq_splits)


def _attn_kernel(q_ref, idx_ref, k_ref, v_ref, valid_ref, o_ref, ml_ref, *, scale, group, seq_len,
                 head_dim, block_s, block_dh, steps_per_split):
    # q_ref [B, Kh, Dh]; idx_ref [Kh]; k_ref, v_ref [B, KV, S, Dh]; valid_ref [B, S] int8
    # o_ref [B, Kh, NS, Dhp] fp32 unnormalised output; ml_ref [B, Kh, NS, 2] fp32 (max, sum)
    b, i, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_head = idx_ref[i] // group  # GQA: query head h reads kv head h // (H // KV)
    d = jnp.arange(block_dh, dtype=jnp.int32)
    d_ok = d < head_dim
    q = plgpu.load(q_ref.at[b, i, d], mask=d_ok, other=0.0).astype(jnp.float32) * scale  # [Dhp]
    first = split * steps_per_split * block_s

    def step(t, carry):
        o, m, l = carry  # [Dhp], [], []
        s = first + t * block_s + jnp.arange(block_s, dtype=jnp.int32)  # [BS]
        ok = plgpu.load(valid_ref.at[b, s], mask=s < seq_len, other=0) != 0
        tile_ok = ok[:, None] & d_ok[None, :]
        k = plgpu.load(k_ref.at[b, kv_head, s[:, None], d[None, :]], mask=tile_ok,
                       other=0.0).astype(jnp.float32)  # [BS, Dhp]
        scores = jnp.where(ok, jnp.sum(k * q[None, :], axis=1), _NEG)  # [BS]
        m_new = jnp.maximum(m, jnp.max(scores))
        correction = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(scores - m_new), 0.0)  # [BS]
        v = plgpu.load(v_ref.at[b, kv_head, s[:, None], d[None, :]], mask=tile_ok,
                       other=0.0).astype(jnp.float32)  # [BS, Dhp]
        o = o * correction + jnp.sum(p[:, None] * v, axis=0)
        return o, m_new, l * correction + jnp.sum(p)

    init = (jnp.zeros((block_dh,), jnp.float32), jnp.float32(_NEG), jnp.float32(0.0))
    o, m, l = jax.lax.fori_loop(0, steps_per_split, step, init)
    plgpu.store(o_ref.at[b, i, split, d], o)
    two = jnp.arange(2, dtype=jnp.int32)
    plgpu.store(ml_ref.at[b, i, split, two], jnp.where(two == 0, m, l))


@functools.partial(jax.jit, static_argnames=("scale", "group", "blocks", "interpret"))
def _sparse_decode_attention(q, k, v, valid, head_idx, *, scale: float, group: int,
                             blocks: AttnBlocks, interpret: bool):
    batch, n_sel, head_dim = q.shape
    seq_len = k.shape[2]
    check_pow2(block_s=blocks.block_s)
    block_dh = pow2_ceil(head_dim)
    steps = cdiv(seq_len, blocks.block_s)
    steps_per_split = cdiv(steps, max(min(blocks.seq_splits, steps), 1))
    n_splits = cdiv(steps, steps_per_split)
    kernel = functools.partial(
        _attn_kernel, scale=scale, group=group, seq_len=seq_len, head_dim=head_dim,
        block_s=blocks.block_s, block_dh=block_dh, steps_per_split=steps_per_split)
    o, ml = pl.pallas_call(
        kernel,
        grid=(batch, n_sel, n_splits),
        out_shape=(jax.ShapeDtypeStruct((batch, n_sel, n_splits, block_dh), jnp.float32),
                   jax.ShapeDtypeStruct((batch, n_sel, n_splits, 2), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="sparse_decode_attention",
    )(q, head_idx.astype(jnp.int32), k, v, valid.astype(jnp.int8))
    # Merge the sequence splits: weights exp(m_s - M), normalised by the merged sum.
    m, l = ml[..., 0], ml[..., 1]  # [B, Kh, NS]
    w = jnp.exp(m - jnp.max(m, axis=-1, keepdims=True))
    total = jnp.sum(w * l, axis=-1)  # [B, Kh]
    out = jnp.einsum("BKS,BKSH->BKH", w, o[..., :head_dim])
    # A row with no valid slot has total 0: return zeros rather than 0/0.
    out = jnp.where(total[..., None] > 0, out / jnp.maximum(total, 1e-30)[..., None], 0.0)
    return out.astype(q.dtype)


def _group(num_heads: int | None, n_kv: int) -> int:
    if num_heads is None:
        return 1
    if num_heads % n_kv:
        raise ValueError(f"num_heads={num_heads} is not a multiple of the {n_kv} kv heads")
    return num_heads // n_kv


def sparse_decode_attention(q, k, v, valid, head_idx, *, scale, num_heads=None, interpret=False,
                            **blocks):
    """One decode step of attention for the selected query heads.

    q [B, Kh, Dh] (selected heads' queries); k, v [B, KV, S, Dh] cache; valid [B, S] bool marks the
    slots holding real tokens; head_idx [Kh] query-head ids. num_heads is the model's H for GQA
    (query head h reads kv head h // (H // KV)); None means MHA (H == KV).
    Returns [B, Kh, Dh] in q.dtype (zeros for a row with no valid slot).
    """
    check_block_keys(blocks, ATTN_BLOCK_KEYS, "sparse_decode_attention")
    batch, n_sel, head_dim = q.shape
    cfg = dataclasses.replace(default_attn_blocks(batch, n_sel, k.shape[2], head_dim), **blocks)
    return _sparse_decode_attention(q, k, v, valid, head_idx, scale=float(scale),
                                    group=_group(num_heads, k.shape[1]), blocks=cfg,
                                    interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "num_heads"))
def sparse_decode_attention_reference(q, k, v, valid, head_idx, *, scale, num_heads=None):
    """XLA reference: gather the kv heads, masked softmax in fp32."""
    kv_idx = head_idx // _group(num_heads, k.shape[1])
    k_sel = jnp.take(k, kv_idx, axis=1)  # [B, Kh, S, Dh]
    v_sel = jnp.take(v, kv_idx, axis=1)
    scores = jnp.einsum("BKH,BKSH->BKS", q, k_sel, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(valid[:, None, :], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))  # exp(-inf) = 0 for masked slots
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("BKS,BKSH->BKH", p, v_sel.astype(jnp.float32))
    out = jnp.where(total > 0, out / jnp.maximum(total, 1e-30), 0.0)
    return out.astype(q.dtype)

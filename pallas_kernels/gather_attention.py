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

from pallas_kernels._common import (
    TARGET_PROGRAMS,
    apply_norm,
    cdiv,
    check_block_keys,
    check_pow2,
    full_index,
    norm_mean_rstd,
    pow2_ceil,
)
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


def _normalised(out, total):
    """Attention output out / total (softmax sum, broadcast against out), zeros where no slot was valid
    (total 0): the one rule for the kernel's single split, the split merge and the reference."""
    return jnp.where(total > 0, out / jnp.maximum(total, 1e-30), 0.0)


def _attend(q, k_ref, v_ref, valid_ref, b, kv_head, d, d_ok, v_cols, v_ok, *, first, steps, block_s, seq_len):
    """Online-softmax attention of one query (q [Dhp], scaled, fp32; d / d_ok its columns) over cache slots
    first .. first + steps * block_s - 1 of kv_head in batch row b, masked by valid_ref. Returns the
    unnormalised output at V's columns v_cols (v_ok marks real ones), the running max and the softmax sum."""

    def step(t, carry):
        o, m, l = carry  # [len(v_cols)], [], []
        s = first + t * block_s + jnp.arange(block_s, dtype=jnp.int32)  # [BS]
        ok = plgpu.load(valid_ref.at[b, s], mask=s < seq_len, other=0) != 0
        k = plgpu.load(k_ref.at[b, kv_head, s[:, None], d[None, :]], mask=ok[:, None] & d_ok[None, :],
                       other=0.0).astype(jnp.float32)  # [BS, Dhp]: scores need every column
        scores = jnp.where(ok, jnp.sum(k * q[None, :], axis=1), _NEG)  # [BS]
        m_new = jnp.maximum(m, jnp.max(scores))
        correction = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(scores - m_new), 0.0)  # [BS]
        v = plgpu.load(v_ref.at[b, kv_head, s[:, None], v_cols[None, :]], mask=ok[:, None] & v_ok[None, :],
                       other=0.0).astype(jnp.float32)  # [BS, len(v_cols)]
        return o * correction + jnp.sum(p[:, None] * v, axis=0), m_new, l * correction + jnp.sum(p)

    init = (jnp.zeros(v_cols.shape, jnp.float32), jnp.float32(_NEG), jnp.float32(0.0))
    return jax.lax.fori_loop(0, steps, step, init)


def _attn_kernel(q_ref, idx_ref, k_ref, v_ref, valid_ref, *out_refs, scale, group, seq_len,
                 head_dim, block_s, block_dh, steps_per_split, normalise):
    # q_ref [B, Kh, Dh]; idx_ref [Kh]; k_ref, v_ref [B, KV, S, Dh]; valid_ref [B, S] int8
    # out_refs: o_ref [B, Kh, NS, Dhp] fp32 unnormalised output and ml_ref [B, Kh, NS, 2] fp32
    # (max, sum); or with normalise (one split) o_ref [B, Kh, Dhp] in q's dtype, the final output.
    b, i, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_head = idx_ref[i] // group  # GQA: query head h reads kv head h // (H // KV)
    d = jnp.arange(block_dh, dtype=jnp.int32)
    d_ok = d < head_dim
    q = plgpu.load(q_ref.at[b, i, d], mask=d_ok, other=0.0).astype(jnp.float32) * scale  # [Dhp]
    o, m, l = _attend(q, k_ref, v_ref, valid_ref, b, kv_head, d, d_ok, d, d_ok,
                      first=split * steps_per_split * block_s, steps=steps_per_split, block_s=block_s,
                      seq_len=seq_len)
    if normalise:  # what the merge below does with one split: o / l, zeros for a row with no valid slot
        (o_ref,) = out_refs
        plgpu.store(o_ref.at[b, i, d], _normalised(o, l).astype(o_ref.dtype))
        return
    o_ref, ml_ref = out_refs
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
    normalise = n_splits == 1  # nothing to merge: the kernel writes the output (one launch fewer)
    kernel = functools.partial(
        _attn_kernel, scale=scale, group=group, seq_len=seq_len, head_dim=head_dim,
        block_s=blocks.block_s, block_dh=block_dh, steps_per_split=steps_per_split, normalise=normalise)
    out_shape = (jax.ShapeDtypeStruct((batch, n_sel, block_dh), q.dtype),) if normalise else (
        jax.ShapeDtypeStruct((batch, n_sel, n_splits, block_dh), jnp.float32),
        jax.ShapeDtypeStruct((batch, n_sel, n_splits, 2), jnp.float32))
    outs = pl.pallas_call(
        kernel,
        grid=(batch, n_sel, n_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="sparse_decode_attention",
    )(q, head_idx.astype(jnp.int32), k, v, valid.astype(jnp.int8))
    if normalise:
        return outs[0][..., :head_dim]
    o, ml = outs
    # Merge the sequence splits: weights exp(m_s - M), normalised by the merged sum.
    m, l = ml[..., 0], ml[..., 1]  # [B, Kh, NS]
    w = jnp.exp(m - jnp.max(m, axis=-1, keepdims=True))
    total = jnp.sum(w * l, axis=-1)  # [B, Kh]
    out = jnp.einsum("BKS,BKSH->BKH", w, o[..., :head_dim])
    # A row with no valid slot has total 0: return zeros rather than 0/0.
    out = _normalised(out, total[..., None])
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
    out = _normalised(out, total)
    return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# K/V of selected heads over a window of tokens (the lazy KV mode's recompute).
# --------------------------------------------------------------------------------------------------

WINDOW_KV_BLOCK_KEYS = ("block_m", "block_n", "block_d", "num_warps", "num_stages")
# Triton's tensor-core dot needs every dimension of both operands to be at least 16.
MIN_DOT = 16
# Programs the window K/V kernel aims for: about one per SM of an H100 (132). Each program streams
# block_n x D weight rows; more, thinner programs would re-read the [B*W, D] window from L2 more often.
WINDOW_KV_PROGRAMS = 128


@dataclasses.dataclass(frozen=True)
class WindowKVBlocks:
    block_m: int  # window rows (batch row x window token) per program
    block_n: int  # rows of one head's Dh per program
    block_d: int  # model-width columns per loop step
    num_warps: int = 4
    num_stages: int | None = None


def check_window_kv_blocks(blocks: WindowKVBlocks) -> None:
    """Raise ValueError unless every block size is a power of two and at least the dot minimum."""
    check_pow2(block_m=blocks.block_m, block_n=blocks.block_n, block_d=blocks.block_d,
               num_warps=blocks.num_warps)
    for name in ("block_m", "block_n", "block_d"):
        if getattr(blocks, name) < MIN_DOT:
            raise ValueError(f"{name}={getattr(blocks, name)} must be >= {MIN_DOT} (tensor-core dot)")


def default_window_kv_blocks(rows: int, n_sel: int, head_dim: int, d_model: int) -> WindowKVBlocks:
    """Split each head's Dh rows so that 2 * Ka * (Dh / block_n) >= WINDOW_KV_PROGRAMS.

    OPT-6.7B at head density 0.5 (Ka = 16 active + 2 refreshed, Dh = 128): block_n = 32, 144
    programs, each looping over D = 4096 in [16, 256] x [32, 256] tiles. Session 4's H100 sweep
    (pallas_kernels/NOTES.md) had 13 tile shapes within 17.2-18.3 us of this kernel, session 8's
    H200 sweep 8 within 14.8-15.4 us; the fused gathered_window_qkv_update has its own tiles
    (`default_window_qkv_blocks`).
    """
    splits = pow2_ceil(cdiv(WINDOW_KV_PROGRAMS, 2 * max(n_sel, 1)))
    dh = max(pow2_ceil(head_dim), MIN_DOT)
    block_n = min(max(dh // splits, MIN_DOT), dh)
    block_m = min(max(pow2_ceil(rows), MIN_DOT), 64)
    block_d = min(max(pow2_ceil(d_model), MIN_DOT), 256)
    return WindowKVBlocks(block_m=block_m, block_n=block_n, block_d=block_d)


def default_window_qkv_blocks(rows: int, n_sel: int, head_dim: int, d_model: int, *,
                              normalise: bool = True) -> WindowKVBlocks:
    """The fused attention-input kernel's tiles: the window K/V kernel's tiles with twice the head rows
    per program up to D = 5120; past D = 4096 with the ring already normed (normalise False), the
    window K/V kernel's with block_d 128 over 4 stages instead.

    Without the norm (session 10 sweeps on the H200, results/qkv-normed-h200/): at OPT-13B the
    [32, 128] tile over 4 stages took 29.4 us against 39.2 at [32, 256] and 39.7 at [64, 256], at
    OPT-30B 46.9 against 54.9 and 55.9; at OPT-6.7B [64, 256] 21.3, [32, 256] 21.6, [32, 128] x 4
    21.6; at OPT-2.7B [32, 256] 14.5, [64, 256] 14.6.

    With the norm inside:

    Every program of the fused kernel computes this token's norm statistics itself, so fewer, larger
    programs pay: at OPT-6.7B with Ka = 18 on the H200 (session 8 sweep, results/kernels-h200-session8/)
    block_n 64 took 23.6 us against 32.2 at the window kernel's block_n 32 (block_d 256, 4 warps both);
    every other swept tile was slower still, or asked more shared memory than the H200 has. At
    OPT-13B's D = 5120 it builds too (the step 4.547 ms/token against 4.969 at block_n 32); at
    OPT-30B's D = 7168 it asks 324 KiB of shared memory (the H200 has 227) while block_n 32 builds,
    so wider models keep the window kernel's tiles.
    """
    kv = default_window_kv_blocks(rows, n_sel, head_dim, d_model)
    if not normalise:
        if d_model > 4096:
            return dataclasses.replace(kv, block_n=min(kv.block_n, 32), block_d=128, num_stages=4)
    if d_model > 5120:
        return kv
    return dataclasses.replace(kv, block_n=min(2 * kv.block_n, max(pow2_ceil(head_dim), MIN_DOT)))


def _head_tiles(load_x, sources, head_ok, m, *, head_dim, parts, d_model, block_n, block_d):
    """Sums x @ w^T over D for one program: window rows m [BM] of `load_x` times BN rows of one head.

    load_x(cols [BD], ok [BM, BD]) -> the [BM, BD] input tile. sources: one or two (w_ref [rows, D],
    b_ref or None, first, active), `first` the head's first row in w_ref; with two (weights that
    share a launch), `active` is a traced scalar saying which one this program reads (exactly one
    is). The branch is taken once, around the whole loop over D: a branch inside the loop would
    keep Triton from pipelining the loop's loads.
    The head's Dh rows are split into `parts` equal slices; program axis 2 picks rows
    n = j*BN .. j*BN + BN - 1 of each slice. head_ok False reads nothing (the sums are zeros).
    Returns (accs: parts x [BM, BN] fp32 (+ bias), n, n_ok); n counts within a slice.
    """
    part = head_dim // parts
    n = pl.program_id(2) * block_n + jnp.arange(block_n, dtype=jnp.int32)  # [BN]
    n_ok = n < part
    row_ok = n_ok & head_ok
    # Column masks only where the last block runs past D (then every step carries them).
    ragged_d = d_model % block_d != 0

    def accumulate(w_ref, b_ref, first):
        rows = [first + p * part + n for p in range(parts)]  # [BN] weight rows of each slice

        def step(i, accs):  # accs: parts x [BM, BN] fp32
            cols = i * block_d + jnp.arange(block_d, dtype=jnp.int32)  # [BD]
            x_ok = jnp.ones((m.shape[0], block_d), jnp.bool_) if not ragged_d else jnp.broadcast_to(
                (cols < d_model)[None, :], (m.shape[0], block_d))
            w_ok = row_ok[:, None] if not ragged_d else row_ok[:, None] & (cols < d_model)[None, :]
            x = load_x(cols, x_ok)  # [BM, BD]
            out = []
            for r, acc in zip(rows, accs):
                w = plgpu.load(w_ref.at[r[:, None], cols[None, :]], mask=w_ok, other=0.0)  # [BN, BD]
                # [BM, BD] x [BN, BD]^T on the tensor cores, fp32 accumulation.
                out.append(acc + jax.lax.dot_general(x.astype(w.dtype), w, (((1,), (1,)), ((), ())),
                                                     preferred_element_type=jnp.float32))
            return tuple(out)

        zeros = jnp.zeros((m.shape[0], block_n), jnp.float32)
        accs = jax.lax.fori_loop(0, cdiv(d_model, block_d), step, (zeros,) * parts)
        if b_ref is not None:
            accs = tuple(acc + plgpu.load(b_ref.at[r], mask=row_ok, other=0.0).astype(jnp.float32)[None]
                         for r, acc in zip(rows, accs))
        return accs

    if len(sources) == 1:
        accs = accumulate(*sources[0][:3])
    else:
        (w0, b0, first0, active0), (w1, b1, first1, _) = sources
        accs = jax.lax.cond(active0, lambda: accumulate(w0, b0, first0), lambda: accumulate(w1, b1, first1))
    return accs, n, n_ok


def _window_kv_tiles(x_ref, w_ref, b_ref, head, *, rows, n_kv, head_dim, parts, d_model, block_m,
                     block_n, block_d):
    """The tile sums of window K/V program (c, a, j, i), shared by both window kernels.

    x_ref [B*W, D] window rows m = b*W + t; w_ref [2*KV*Dh, D] (row (c*KV + h)*Dh + n is weight c's
    row n of head h); b_ref [2*KV*Dh] or None; head: KV-head id heads[a] (outside [0, KV): reads
    nothing, the sums are zeros). Head `head`'s Dh rows of weight c are split into `parts` equal
    slices; the program computes rows n = j*BN .. j*BN + BN - 1 of each slice for window rows
    m = i*BM .. i*BM + BM - 1. Returns (accs: parts x [BM, BN] fp32 (+ bias), m, m_ok, n, n_ok,
    head_ok); n counts within a slice.
    """
    head_ok = (head >= 0) & (head < n_kv)
    first = (pl.program_id(0) * n_kv + jnp.where(head_ok, head, 0)) * head_dim
    m = pl.program_id(3) * block_m + jnp.arange(block_m, dtype=jnp.int32)  # [BM]
    m_ok = m < rows

    def load_x(cols, ok):
        return plgpu.load(x_ref.at[m[:, None], cols[None, :]], mask=ok & m_ok[:, None], other=0.0)

    accs, n, n_ok = _head_tiles(load_x, [(w_ref, b_ref, first, True)], head_ok, m, head_dim=head_dim,
                                parts=parts, d_model=d_model, block_n=block_n, block_d=block_d)
    return accs, m, m_ok, n, n_ok, head_ok


def _window_kv_kernel(x_ref, heads_ref, w_ref, *refs, batch, window, n_sel, has_bias, **tile):
    # x_ref, w_ref, b_ref (optional): as _window_kv_tiles; heads_ref [Ka]; o_ref [2*B*Ka*W, Dh]
    b_ref, o_ref = refs if has_bias else (None, *refs)
    c, a = pl.program_id(0), pl.program_id(1)
    (acc,), m, m_ok, n, n_ok, _ = _window_kv_tiles(x_ref, w_ref, b_ref, heads_ref[a],
                                                   rows=batch * window, parts=1, **tile)
    # Window row m = b*W + t goes to output row ((c*B + b)*Ka + a)*W + t.
    out_row = ((c * batch + m // window) * n_sel + a) * window + m % window  # [BM]
    plgpu.store(o_ref.at[out_row[:, None], n[None, :]], acc.astype(o_ref.dtype),
                mask=m_ok[:, None] & n_ok[None, :])


def _window_tile_args(w_kv, blocks: WindowKVBlocks) -> dict:
    """The static keywords of _window_kv_tiles for this weight and these blocks (parts aside)."""
    _, n_kv, head_dim, d_model = w_kv.shape
    return dict(n_kv=n_kv, head_dim=head_dim, d_model=d_model, block_m=blocks.block_m,
                block_n=blocks.block_n, block_d=blocks.block_d)


def _window_operands(x_win, w_kv, b) -> list:
    """x_win [B, W, D] -> [B*W, D], w_kv [2, KV, Dh, D] -> [2*KV*Dh, D] (and b): free reshapes, the
    window rows and the head-major weight rows are already contiguous."""
    batch, window, d_model = x_win.shape
    rows = w_kv.shape[0] * w_kv.shape[1] * w_kv.shape[2]
    return [x_win.reshape(batch * window, d_model), w_kv.reshape(rows, d_model)] + (
        [] if b is None else [b.reshape(rows)])


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def _gathered_window_kv(x_win, w_kv, heads, b, *, blocks: WindowKVBlocks, interpret: bool):
    batch, window, _ = x_win.shape
    head_dim = w_kv.shape[2]
    n_sel = heads.shape[0]
    check_window_kv_blocks(blocks)
    kernel = functools.partial(_window_kv_kernel, batch=batch, window=window, n_sel=n_sel,
                               has_bias=b is not None, **_window_tile_args(w_kv, blocks))
    x, w, *bias = _window_operands(x_win, w_kv, b)
    out = pl.pallas_call(
        kernel,
        grid=(2, n_sel, cdiv(head_dim, blocks.block_n), cdiv(batch * window, blocks.block_m)),
        out_shape=jax.ShapeDtypeStruct((2 * batch * n_sel * window, head_dim), x_win.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="gathered_window_kv",
    )(x, heads.astype(jnp.int32), w, *bias)
    return out.reshape(2, batch, n_sel, window, head_dim)


def gathered_window_kv(x_win, w_kv, heads, b=None, *, interpret=False, **blocks):
    """Keys and values of the selected KV heads for every token of a window.

    x_win [B, W, D] (the window's normed attention inputs); w_kv [2, KV, Dh, D] head-major K (0)
    and V (1) weights; heads [Ka] int32 KV-head ids, duplicates allowed (computed twice, equal); an
    entry outside [0, KV) reads no weights and gives zeros (the caller's "skip" marker);
    b [2, KV, Dh] or None. Returns [2, B, Ka, W, Dh] in x_win.dtype with fp32 sums:
    out[c, b, a, t] = w_kv[c, heads[a]] @ x_win[b, t] (+ b[c, heads[a]]).

    Each selected head's rows are read once, straight from w_kv: program (c, a, n, m) multiplies
    window rows m-block [BM, D] by rows n-block of head heads[a] of weight c [BN, D] on the tensor
    cores, looping over D. Windows shorter than 16 tokens are padded to 16 rows by masked loads.
    """
    check_block_keys(blocks, WINDOW_KV_BLOCK_KEYS, "gathered_window_kv")
    batch, window, d_model = x_win.shape
    cfg = dataclasses.replace(
        default_window_kv_blocks(batch * window, heads.shape[0], w_kv.shape[2], d_model), **blocks)
    return _gathered_window_kv(x_win, w_kv, heads, b, blocks=cfg, interpret=interpret)


@jax.jit
def gathered_window_kv_reference(x_win, w_kv, heads, b=None):
    """XLA reference: jnp.take of the selected heads (zeros outside [0, KV)), then an einsum."""
    n_kv = w_kv.shape[1]
    heads = jnp.where(heads < 0, n_kv, heads)  # take's "fill" would wrap negative ids
    w_sel = jnp.take(w_kv, heads, axis=1, mode="fill", fill_value=0)  # [2, Ka, Dh, D]
    out = jnp.einsum("BTD,CKHD->CBKTH", x_win, w_sel, preferred_element_type=jnp.float32)
    if b is not None:
        b_sel = jnp.take(b, heads, axis=1, mode="fill", fill_value=0)  # [2, Ka, Dh]
        out = out + b_sel.astype(jnp.float32)[:, None, :, None, :]
    return out.astype(x_win.dtype)


# --------------------------------------------------------------------------------------------------
# The lazy KV mode's window recompute written straight into the cache.
# --------------------------------------------------------------------------------------------------


def rotate_half_split(x, cos, sin):
    """RoPE's rotation, half-split convention (as Hugging Face Llama), in fp32.

    x [..., Dh]; cos, sin [..., Dh/2] float32, broadcasting against x's leading axes (the angles of
    each token's position). Returns x.dtype: (x1*cos - x2*sin, x2*cos + x1*sin) for halves x1, x2.
    """
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _rotate_tiles(vals, cos_ref, sin_ref, m, m_ok, n, n_ok, rotate):
    """RoPE on a program's two column halves (vals: [lo, hi], each [BM, BN] in the window's dtype) where
    `rotate` (a traced bool: keys and queries, not values); the same expression as rotate_half_split.
    cos_ref, sin_ref [B*W, Dh/2] fp32: the angles of window row m."""
    tile_ok = m_ok[:, None] & n_ok[None, :]
    cos = plgpu.load(cos_ref.at[m[:, None], n[None, :]], mask=tile_ok, other=0.0)  # [BM, BN]
    sin = plgpu.load(sin_ref.at[m[:, None], n[None, :]], mask=tile_ok, other=0.0)
    lo, hi = vals[0].astype(jnp.float32), vals[1].astype(jnp.float32)
    dtype = vals[0].dtype
    rotated = ((lo * cos - hi * sin).astype(dtype), (hi * cos + lo * sin).astype(dtype))
    return [jnp.where(rotate, r, v) for r, v in zip(rotated, vals)]


def _store_window_kv(vals, k_ref, v_ref, slots_ref, head, head_ok, m, m_ok, n, n_ok, *, window, n_kv,
                     head_dim, seq_len, n_rows):
    """Store program (c, ...)'s tiles (vals: parts x [BM, BN]) at cache c's rows (b, head, slots[t])
    for window rows m = b*W + t; caches [B*KV*S, Dh] with row (b*KV + h)*S + s."""
    c = pl.program_id(0)
    parts = len(vals)
    slot = plgpu.load(slots_ref.at[m % window])  # [BM]
    live = m_ok & head_ok & (slot >= 0) & (slot < seq_len)  # [BM] rows this program writes
    # A row that writes nothing aims at its own scratch row past the cache. The CPU interpreter's
    # masked store writes the old value back at every masked-off lane, so such a lane must not share
    # an address with a live lane of the same store (a skipped or not-yet-written slot's clamped
    # address could); interpreted, the caches get BM scratch rows, and enough columns for the
    # masked-off columns n >= Dh/parts of the last block. On the GPU masked lanes touch no memory.
    row = jnp.where(live, ((m // window) * n_kv + jnp.where(head_ok, head, 0)) * seq_len + slot,
                    n_rows + jnp.arange(m.shape[0], dtype=jnp.int32))  # [BM]
    mask = live[:, None] & n_ok[None, :]
    for p, val in enumerate(vals):
        col = p * (head_dim // parts) + n  # [BN]
        for which, o_ref in enumerate((k_ref, v_ref)):  # program c writes cache c only
            plgpu.store(o_ref.at[row[:, None], col[None, :]], val.astype(o_ref.dtype),
                        mask=mask & (c == which))


def _window_kv_update_kernel(x_ref, heads_ref, slots_ref, w_ref, *refs, batch, window, seq_len,
                             n_rows, has_bias, rotary, **tile):
    # x_ref, w_ref, b_ref (optional): as _window_kv_tiles; heads_ref [Ka]; slots_ref [W] cache slot
    # of window token t; cos_ref, sin_ref [B*W, Dh/2] fp32 (rotary only); then the caches
    # [B*KV*S, Dh], row (b*KV + h)*S + s: inputs k_in, v_in (aliased to the outputs, never read)
    # and outputs k_ref, v_ref, which start as the caches (interpreted: with scratch rows/columns).
    refs = list(refs)
    b_ref = refs.pop(0) if has_bias else None
    cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if rotary else (None, None)
    _, _, k_ref, v_ref = refs
    head = heads_ref[pl.program_id(1)]
    parts = 2 if rotary else 1  # RoPE pairs column n with n + Dh/2: one program computes both
    accs, m, m_ok, n, n_ok, head_ok = _window_kv_tiles(x_ref, w_ref, b_ref, head, rows=batch * window,
                                                       parts=parts, **tile)
    # gathered_window_kv's rounding to the window's dtype first, so values equal the reference's.
    vals = [acc.astype(x_ref.dtype) for acc in accs]  # parts x [BM, BN]
    if rotary:  # keys only (c == 0)
        vals = _rotate_tiles(vals, cos_ref, sin_ref, m, m_ok, n, n_ok, pl.program_id(0) == 0)
    _store_window_kv(vals, k_ref, v_ref, slots_ref, head, head_ok, m, m_ok, n, n_ok, window=window,
                     n_kv=tile["n_kv"], head_dim=tile["head_dim"], seq_len=seq_len, n_rows=n_rows)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def _gathered_window_kv_update(x_win, w_kv, heads, slots, k_cache, v_cache, b, rotary, *,
                               blocks: WindowKVBlocks, interpret: bool):
    batch, window, _ = x_win.shape
    _, n_kv, head_dim, _ = w_kv.shape
    seq_len = k_cache.shape[2]
    n_sel = heads.shape[0]
    parts = 1 if rotary is None else 2
    check_window_kv_blocks(blocks)
    n_rows = batch * n_kv * seq_len
    n_blocks = cdiv(head_dim // parts, blocks.block_n)
    kernel = functools.partial(
        _window_kv_update_kernel, batch=batch, window=window, seq_len=seq_len, n_rows=n_rows,
        has_bias=b is not None, rotary=rotary is not None, **_window_tile_args(w_kv, blocks))
    x, w, *bias = _window_operands(x_win, w_kv, b)
    operands = [x, heads.astype(jnp.int32), slots.astype(jnp.int32), w, *bias]
    if rotary is not None:
        operands += [r.astype(jnp.float32).reshape(batch * window, head_dim // 2) for r in rotary]
    caches = [cache.reshape(n_rows, head_dim) for cache in (k_cache, v_cache)]  # free reshapes
    if interpret:  # the kernel's scratch rows and columns (see the kernel)
        width = (parts - 1) * (head_dim // parts) + n_blocks * blocks.block_n
        caches = [jnp.pad(cache, ((0, blocks.block_m), (0, width - head_dim))) for cache in caches]
    k_out, v_out = pl.pallas_call(
        kernel,
        grid=(2, n_sel, n_blocks, cdiv(batch * window, blocks.block_m)),
        out_shape=tuple(jax.ShapeDtypeStruct(cache.shape, cache.dtype) for cache in caches),
        # In place: XLA writes the outputs into the cache buffers (a copy first unless the caller's
        # jit donates them). The interpreter starts each output as its aliased input.
        input_output_aliases={len(operands): 0, len(operands) + 1: 1},
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="gathered_window_kv_update",
    )(*operands, *caches)
    if interpret:
        k_out, v_out = k_out[:n_rows, :head_dim], v_out[:n_rows, :head_dim]
    return k_out.reshape(k_cache.shape), v_out.reshape(v_cache.shape)


def _check_window_update(x_win, w_kv, slots, k_cache, v_cache, rotary) -> None:
    batch, window, _ = x_win.shape
    _, n_kv, head_dim, _ = w_kv.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (batch, n_kv) or k_cache.shape[3] != head_dim:
        raise ValueError(f"caches must be [B, KV, S, Dh] = [{batch}, {n_kv}, S, {head_dim}], got "
                         f"{k_cache.shape} and {v_cache.shape}")
    if slots.shape != (window,):
        raise ValueError(f"slots must be [W] = [{window}], got {slots.shape}")
    if rotary is not None and head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")


def gathered_window_kv_update(x_win, w_kv, heads, slots, k_cache, v_cache, b=None, rotary=None, *,
                              k_norm=None, norm_eps: float = 1e-6, interpret=False, **blocks):
    """`gathered_window_kv`'s K/V written straight into the caches: the lazy KV mode's update.

    x_win [B, W, D]; w_kv [2, KV, Dh, D]; heads [Ka] int32 KV-head ids (repeats allowed: equal
    values written twice; an id outside [0, KV) is skipped: no weight reads, nothing written);
    slots [W] int32, the cache slot of each window token (an entry outside [0, S) is dropped; live
    entries distinct); k_cache, v_cache [B, KV, S, Dh]; b [2, KV, Dh] or None; rotary None or
    (cos, sin), each [B, W, Dh/2] float32: RoPE's angles at the window tokens' positions, applied to
    the keys after the window's rounding (`rotate_half_split`); k_norm None or [Dh]: the scale of an
    RMSNorm (eps norm_eps) over every key head, before the rotation (Qwen3). Returns (k_cache,
    v_cache) with cache[b, heads[a], slots[t]] = the window K/V of `gathered_window_kv` (keys
    normed, then rotated), cast to the cache dtype, and every other entry unchanged.

    Program (c, a, n, m) computes gathered_window_kv's [BM, BN] tile (with RoPE: rows n and
    n + Dh/2, which the rotation pairs) and stores it at the cache rows (b, heads[a], slots[t]) of
    cache c. The caches are aliased to the outputs: in place under a jit that donates them (as the
    decode step does), no intermediate [2, B, Ka, W, Dh] array, no XLA scatter.
    With k_norm, a program would need all Dh rows of its head for the norm's statistics: 2 * Ka
    programs (18 for a GQA model with 8 KV heads) streaming a whole head each. Instead
    `gathered_window_kv` computes the window K/V over its usual ~128 programs and XLA normalises,
    rotates and scatters them (the `*_reference`'s last steps); the weight rows are still read once.
    """
    check_block_keys(blocks, WINDOW_KV_BLOCK_KEYS, "gathered_window_kv_update")
    _check_window_update(x_win, w_kv, slots, k_cache, v_cache, rotary)
    if k_norm is not None:
        kv_w = gathered_window_kv(x_win, w_kv, heads, b, interpret=interpret, **blocks)  # [2, B, Ka, W, Dh]
        return scatter_window_kv(kv_w[0], kv_w[1], heads, slots, k_cache, v_cache, rotary, k_norm, norm_eps)
    batch, window, d_model = x_win.shape
    parts = 1 if rotary is None else 2
    cfg = dataclasses.replace(
        default_window_kv_blocks(batch * window, heads.shape[0], w_kv.shape[2] // parts, d_model),
        **blocks)
    return _gathered_window_kv_update(x_win, w_kv, heads, slots, k_cache, v_cache, b, rotary,
                                      blocks=cfg, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("norm_eps",))
def gathered_window_kv_update_reference(x_win, w_kv, heads, slots, k_cache, v_cache, b=None,
                                        rotary=None, *, k_norm=None, norm_eps: float = 1e-6):
    """XLA reference: gathered_window_kv_reference, the key norm and RoPE on the keys, two scatters
    into the caches."""
    kv_w = gathered_window_kv_reference(x_win, w_kv, heads, b)  # [2, B, Ka, W, Dh]
    return scatter_window_kv(kv_w[0], kv_w[1], heads, slots, k_cache, v_cache, rotary, k_norm, norm_eps)


@functools.partial(jax.jit, static_argnames=("norm_eps",))
def scatter_window_kv(k_w, v_w, heads, slots, k_cache, v_cache, rotary=None, k_norm=None, norm_eps=1e-6):
    """Window K/V of some KV heads, k_w / v_w [B, Ka, W, Dh] (keys not yet normed or rotated), written
    into the caches [B, KV, S, Dh] at (heads [Ka], slots [W]); ids outside the caches are dropped.
    k_norm None or [Dh]: an RMSNorm over every key head first (Qwen3)."""
    n_kv, seq_len = k_cache.shape[1], k_cache.shape[2]
    if k_norm is not None:
        k_w = apply_norm(k_w, k_norm, kind="rmsnorm", eps=norm_eps)
    if rotary is not None:
        cos, sin = rotary  # [B, W, Dh/2]
        k_w = rotate_half_split(k_w, cos[:, None], sin[:, None])
    # The scatter would wrap negative ids: move them past the end, where mode="drop" drops them.
    heads = jnp.where(heads < 0, n_kv, heads)
    slots = jnp.where(slots < 0, seq_len, slots)
    at = (slice(None), heads[:, None], slots[None, :])
    return (k_cache.at[at].set(k_w.astype(k_cache.dtype), mode="drop"),
            v_cache.at[at].set(v_w.astype(v_cache.dtype), mode="drop"))


def first_occurrences(groups, n_kv: int):
    """KV-head ids with every repeat (and every id outside [0, KV)) replaced by the skip id KV.

    groups [Ka] int32 (GQA heads of one group, a refreshed group that is also active): repeats would
    be harmless in the window update (equal values written twice) but cost their weight reads. A
    [Ka, Ka] compare instead of a sort-based jnp.unique.
    """
    n = groups.shape[0]
    earlier = jnp.arange(n)[:, None] > jnp.arange(n)[None, :]
    repeat = jnp.any((groups[:, None] == groups[None, :]) & earlier, axis=1)
    return jnp.where(repeat | (groups < 0) | (groups >= n_kv), n_kv, groups).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# The lazy KV decode step's attention inputs in one kernel: norm, window ring, Q and window K/V.
# --------------------------------------------------------------------------------------------------


def _row_norm_stats(h_ref, b_row, *, batch, d_model, norm_kind, norm_eps):
    """fp32 (mean, rstd) [BM] of residual rows h_ref[b_row]: apply_norm's one-pass statistics (mean 0
    for RMSNorm). Each batch row is read whole, in static chunks: independent loads that are all in
    flight at once (a loop over D would wait on each load in turn, before the main loop starts)."""
    width = min(pow2_ceil(d_model), 4096)
    mean = rstd = jnp.zeros(b_row.shape, jnp.float32)
    for b in range(batch):
        total = squares = jnp.zeros((), jnp.float32)
        for d0 in range(0, d_model, width):
            cols = d0 + jnp.arange(width, dtype=jnp.int32)
            v = plgpu.load(h_ref.at[full_index(cols, b), cols], mask=cols < d_model, other=0.0).astype(jnp.float32)
            total, squares = total + jnp.sum(v), squares + jnp.sum(v * v)
        mean_b, rstd_b = norm_mean_rstd(total, squares, d_model, kind=norm_kind, eps=norm_eps)
        mean, rstd = jnp.where(b_row == b, mean_b, mean), jnp.where(b_row == b, rstd_b, rstd)
    return mean, rstd


def _window_qkv_kernel(*refs, batch, window, seq_len, n_rows, n_q, n_refresh, group, n_heads, normalise,
                       norm_kind, norm_eps, has_norm_bias, has_bias, rotary, **tile):
    # normalise: h_ref [B, D] residual; scale_ref (and nb_ref) [D] norm weights. Then win_ref
    # [B*W(+pad), D(+pad)] window ring (normalise: aliased to win_out; else holding this token's
    # normed row already); qidx_ref [Kq]; refresh_ref [r]; cur_ref [1] ring row of this token;
    # slots_ref [W]; wq_ref [H*Dh, D]; wkv_ref [2*KV*Dh, D]; bq_ref [H*Dh], bkv_ref [2*KV*Dh]
    # (has_bias); cos_ref, sin_ref [B*W, Dh/2] (rotary); caches k_in, v_in [B*KV*S(+pad), Dh(+pad)]
    # (aliased, never read); outputs q_ref [B*Kq(+pad), Dh(+pad)], win_out (normalise), k_ref, v_ref.
    refs = list(refs)
    h_ref, scale_ref = (refs.pop(0), refs.pop(0)) if normalise else (None, None)
    nb_ref = refs.pop(0) if has_norm_bias else None
    win_ref, qidx_ref, refresh_ref, cur_ref, slots_ref, wq_ref, wkv_ref = (refs.pop(0) for _ in range(7))
    bq_ref, bkv_ref = (refs.pop(0), refs.pop(0)) if has_bias else (None, None)
    cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if rotary else (None, None)
    if normalise:
        _, _, q_ref, win_out, k_ref, v_ref = refs
    else:
        _, _, q_ref, k_ref, v_ref = refs
    n_kv, head_dim, d_model, block_d = tile["n_kv"], tile["head_dim"], tile["d_model"], tile["block_d"]
    c, a = pl.program_id(0), pl.program_id(1)  # c: 0 keys, 1 values, 2 queries; a: selection entry

    # Entry a < Kq is query head qidx[a] (its Q, and the K/V of its group qidx[a] // G); entry
    # Kq + i is refreshed group refresh[i] (K/V only). A group named before (GQA heads of one group,
    # a refreshed group that is also active) or outside [0, KV) is skipped.
    lanes = jnp.arange(pow2_ceil(n_q + n_refresh), dtype=jnp.int32)
    from_q = lanes < n_q
    named = plgpu.load(qidx_ref.at[jnp.minimum(lanes, n_q - 1)], mask=from_q, other=0)
    refreshed = plgpu.load(refresh_ref.at[jnp.clip(lanes - n_q, 0, n_refresh - 1)],
                           mask=~from_q & (lanes < n_q + n_refresh), other=n_kv)
    groups = jnp.where(from_q, named // group, refreshed)  # [A]
    mine = lanes == a
    q_head = jnp.sum(jnp.where(mine & from_q, named, 0))
    g = jnp.sum(jnp.where(mine, groups, 0))
    repeat = jnp.sum(((groups == g) & (lanes < a)).astype(jnp.int32)) > 0
    kv_ok = (a < n_q + n_refresh) & (g >= 0) & (g < n_kv) & ~repeat
    q_ok = (a < n_q) & (q_head >= 0) & (q_head < n_heads)
    is_q = c == 2
    head_ok = jnp.where(is_q, q_ok, kv_ok)
    sources = [(wkv_ref, bkv_ref, (jnp.minimum(c, 1) * n_kv + jnp.where(kv_ok, g, 0)) * head_dim, ~is_q),
               (wq_ref, bq_ref, jnp.where(q_ok, q_head, 0) * head_dim, is_q)]

    # Window rows m = b*W + t; row `cur` of each batch row is this token: normalised here from the
    # residual (the ring holds the earlier tokens' normed inputs) and stored into the ring.
    m = pl.program_id(3) * tile["block_m"] + jnp.arange(tile["block_m"], dtype=jnp.int32)  # [BM]
    m_ok = m < batch * window
    b_row = m // window
    is_cur = m_ok & (m % window == cur_ref[0])

    def load_ring(cols, ok):
        return plgpu.load(win_ref.at[m[:, None], cols[None, :]], mask=ok & m_ok[:, None], other=0.0)

    if normalise:
        mean, rstd = _row_norm_stats(h_ref, b_row, batch=batch, d_model=d_model, norm_kind=norm_kind,
                                     norm_eps=norm_eps)
    writer = (c == 0) & (a == 0) & (pl.program_id(2) == 0)  # one program per row block writes the ring

    def load_x(cols, ok):
        ok = ok & m_ok[:, None]
        ring = load_ring(cols, ok & ~is_cur[:, None])
        mine = ok & is_cur[:, None]
        h = plgpu.load(h_ref.at[b_row[:, None], cols[None, :]], mask=mine, other=0.0).astype(jnp.float32)
        col_ok = cols < d_model
        y = (h - mean[:, None]) * rstd[:, None] * plgpu.load(
            scale_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
        if nb_ref is not None:
            y = y + plgpu.load(nb_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
        x = jnp.where(is_cur[:, None], y.astype(ring.dtype), ring)
        plgpu.store(win_out.at[m[:, None], cols[None, :]], x, mask=mine & writer)
        return x

    parts = 2 if rotary else 1
    accs, n, n_ok = _head_tiles(load_x if normalise else load_ring, sources, head_ok, m, head_dim=head_dim,
                                parts=parts, d_model=d_model, block_n=tile["block_n"], block_d=block_d)
    vals = [acc.astype(q_ref.dtype) for acc in accs]  # rounded like the projections' outputs
    if rotary:  # keys and queries
        vals = _rotate_tiles(vals, cos_ref, sin_ref, m, m_ok, n, n_ok, c != 1)
    _store_window_kv(vals, k_ref, v_ref, slots_ref, g, kv_ok & ~is_q, m, m_ok, n, n_ok, window=window,
                     n_kv=n_kv, head_dim=head_dim, seq_len=seq_len, n_rows=n_rows)
    # Queries: this token's row of each batch row, at q row b*Kq + a. Other lanes aim at their own
    # scratch rows past the output (see _store_window_kv).
    live = is_cur & q_ok & is_q
    row = jnp.where(live, b_row * n_q + a, batch * n_q + jnp.arange(m.shape[0], dtype=jnp.int32))
    for p, val in enumerate(vals):
        col = p * (head_dim // parts) + n
        plgpu.store(q_ref.at[row[:, None], col[None, :]], val.astype(q_ref.dtype),
                    mask=live[:, None] & n_ok[None, :])


@functools.partial(jax.jit, static_argnames=("norm_kind", "norm_eps", "blocks", "interpret"))
def _gathered_window_qkv_update(h, norm_scale, norm_bias, x_win, w_q, w_kv, q_idx, refresh, cur, slots,
                                k_cache, v_cache, b_q, b_kv, rotary, *, norm_kind, norm_eps,
                                blocks: WindowKVBlocks, interpret: bool):
    batch, window, d_model = x_win.shape
    n_heads, head_dim, _ = w_q.shape
    _, n_kv, _, _ = w_kv.shape
    seq_len = k_cache.shape[2]
    n_q, n_refresh = q_idx.shape[0], refresh.shape[0]
    parts = 1 if rotary is None else 2
    normalise = h is not None
    check_window_kv_blocks(blocks)
    n_rows = batch * n_kv * seq_len
    n_blocks = cdiv(head_dim // parts, blocks.block_n)
    m_blocks = cdiv(batch * window, blocks.block_m)
    has_bias = b_q is not None
    kernel = functools.partial(
        _window_qkv_kernel, batch=batch, window=window, seq_len=seq_len, n_rows=n_rows, n_q=n_q,
        n_refresh=n_refresh, group=n_heads // n_kv, n_heads=n_heads, normalise=normalise, norm_kind=norm_kind,
        norm_eps=norm_eps, has_norm_bias=norm_bias is not None, has_bias=has_bias,
        rotary=rotary is not None, **_window_tile_args(w_kv, blocks))
    win = x_win.reshape(batch * window, d_model)
    caches = [cache.reshape(n_rows, head_dim) for cache in (k_cache, v_cache)]  # free reshapes
    q_rows, q_cols = batch * n_q, head_dim
    if interpret:  # scratch rows and columns for the masked-off lanes (see _store_window_kv)
        width = (parts - 1) * (head_dim // parts) + n_blocks * blocks.block_n
        caches = [jnp.pad(cache, ((0, blocks.block_m), (0, width - head_dim))) for cache in caches]
        win = jnp.pad(win, ((0, m_blocks * blocks.block_m - batch * window),
                            (0, cdiv(d_model, blocks.block_d) * blocks.block_d - d_model)))
        q_rows, q_cols = q_rows + blocks.block_m, width
    operands = ([h, norm_scale] if normalise else []) + ([] if norm_bias is None else [norm_bias]) + [
        win, q_idx.astype(jnp.int32), refresh.astype(jnp.int32), jnp.reshape(cur, (1,)).astype(jnp.int32),
        slots.astype(jnp.int32), w_q.reshape(n_heads * head_dim, d_model),
        w_kv.reshape(2 * n_kv * head_dim, d_model)]
    if has_bias:
        operands += [b_q.reshape(n_heads * head_dim), b_kv.reshape(2 * n_kv * head_dim)]
    if rotary is not None:
        operands += [r.astype(jnp.float32).reshape(batch * window, head_dim // 2) for r in rotary]
    # In place: the caches (and, normalising, the ring) are the outputs' buffers (the decode step
    # donates them).
    win_out = [jax.ShapeDtypeStruct(win.shape, win.dtype)] if normalise else []
    aliases = {len(operands) + i: len(win_out) + 1 + i for i in range(2)}
    if normalise:
        aliases[2 + (norm_bias is not None)] = 1  # the ring's place among the operands
    q, *outs = pl.pallas_call(
        kernel,
        grid=(3, n_q + n_refresh, n_blocks, m_blocks),
        out_shape=(jax.ShapeDtypeStruct((q_rows, q_cols), x_win.dtype), *win_out,
                   *(jax.ShapeDtypeStruct(cache.shape, cache.dtype) for cache in caches)),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="gathered_window_qkv_update" if normalise else "gathered_window_qkv",
    )(*operands, *caches)
    win, k_out, v_out = outs if normalise else (win, *outs)
    if interpret:
        q, win = q[:batch * n_q, :head_dim], win[:batch * window, :d_model]
        k_out, v_out = k_out[:n_rows, :head_dim], v_out[:n_rows, :head_dim]
    return (q.reshape(batch, n_q, head_dim), win.reshape(x_win.shape), k_out.reshape(k_cache.shape),
            v_out.reshape(v_cache.shape))


def gathered_window_qkv_update(h, norm_scale, norm_bias, x_win, w_q, w_kv, q_idx, refresh, cur, slots,
                               k_cache, v_cache, b_q=None, b_kv=None, rotary=None, *, norm_kind: str,
                               norm_eps: float, interpret=False, **blocks):
    """The lazy KV decode step's attention inputs, from the residual, in one kernel.

    h [B, D] the residual entering the layer; norm_scale [D], norm_bias [D] or None: its pre-attention
    norm (`apply_norm` of kind norm_kind); x_win [B, W, D] the ring of the window tokens' normed
    inputs; w_q [H, Dh, D]; w_kv [2, KV, Dh, D]; q_idx [Kq] int32 selected query heads (distinct);
    refresh [r] int32 KV groups refreshed this step (ids outside [0, KV) skipped); cur [] int32 this
    token's ring row; slots [W] the cache slot of each ring row (outside [0, S): dropped);
    k_cache, v_cache [B, KV, S, Dh]; b_q [H, Dh] and b_kv [2, KV, Dh], both or neither; rotary None
    or (cos, sin) [B, W, Dh/2] float32 at the ring rows' positions (this token's at cur).

    Returns (q [B, Kq, Dh], x_win, k_cache, v_cache): x = norm(h) is stored at ring row cur; q the
    selected heads' queries of x (RoPE'd); the K/V of groups q_idx // (H / KV) and `refresh` over
    the window, written at cache rows slots (`gathered_window_kv_update`, each group once).
    What the step ran as five launches (norm statistics, normalise, ring write, Q projection,
    window K/V) is one: program (c, a, n, m) is `gathered_window_kv_update`'s for c = K, V, and for
    c = Q reads entry a's query rows instead; every program normalises this token's row itself
    (it reads x's whole row anyway), and one program per row block writes it into the ring.

    h None (norm_scale, norm_bias None too): ring row cur already holds this token's normed input
    (the caller normalised and wrote it, in XLA) and the kernel only reads the ring: Q and the window
    K/V in one launch, with no norm or ring store inside the loop over D. x_win is returned as given.
    """
    check_block_keys(blocks, WINDOW_KV_BLOCK_KEYS, "gathered_window_qkv_update")
    _check_window_update(x_win, w_kv, slots, k_cache, v_cache, rotary)
    batch, window, d_model = x_win.shape
    h_shape = (batch, d_model) if h is None else h.shape
    if h_shape != (batch, d_model) or w_q.shape[1:] != w_kv.shape[2:] or w_q.shape[0] % w_kv.shape[1]:
        raise ValueError(f"h must be [B, D] = [{batch}, {d_model}] and w_q [H, Dh, D] with H a multiple of "
                         f"KV = {w_kv.shape[1]}, got {h_shape} and {w_q.shape}")
    if (b_q is None) != (b_kv is None):
        raise ValueError("give both projection biases (b_q, b_kv) or neither")
    if h is None:
        if norm_scale is not None or norm_bias is not None:
            raise ValueError("without h (ring row cur already normed) give no norm weights")
    elif (norm_bias is None) != (norm_kind == "rmsnorm"):
        raise ValueError(f"{norm_kind} takes {'no ' if norm_kind == 'rmsnorm' else ''}norm bias")
    parts = 1 if rotary is None else 2
    cfg = dataclasses.replace(default_window_qkv_blocks(batch * window, q_idx.shape[0] + refresh.shape[0],
                                                        w_kv.shape[2] // parts, d_model, normalise=h is not None),
                              **blocks)
    return _gathered_window_qkv_update(h, norm_scale, norm_bias, x_win, w_q, w_kv, q_idx, refresh, cur,
                                       slots, k_cache, v_cache, b_q, b_kv, rotary, norm_kind=norm_kind,
                                       norm_eps=float(norm_eps), blocks=cfg, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("norm_kind", "norm_eps"))
def gathered_window_qkv_update_reference(h, norm_scale, norm_bias, x_win, w_q, w_kv, q_idx, refresh, cur,
                                         slots, k_cache, v_cache, b_q=None, b_kv=None, rotary=None, *,
                                         norm_kind: str, norm_eps: float):
    """XLA reference: the five steps as separate ops (apply_norm, a ring write, the Q projection's
    reference and RoPE, the window update's reference over the deduplicated groups); h None: the
    last two, on ring row cur."""
    if h is None:
        x = jax.lax.dynamic_index_in_dim(x_win, cur, axis=1, keepdims=False)  # [B, D]
    else:
        x = apply_norm(h, norm_scale, norm_bias, kind=norm_kind, eps=norm_eps)  # [B, D]
        x_win = jax.lax.dynamic_update_slice(x_win, x[:, None].astype(x_win.dtype), (0, cur, 0))
    q = gathered_head_proj_reference(x, w_q, q_idx, b_q)  # [B, Kq, Dh]
    if rotary is not None:
        cos, sin = (jax.lax.dynamic_index_in_dim(r, cur, axis=1) for r in rotary)  # [B, 1, Dh/2]
        q = rotate_half_split(q, cos, sin)
    n_kv = w_kv.shape[1]
    heads = first_occurrences(jnp.concatenate([q_idx // (w_q.shape[0] // n_kv), refresh]), n_kv)
    k, v = gathered_window_kv_update_reference(x_win, w_kv, heads, slots, k_cache, v_cache, b_kv, rotary)
    return q, x_win, k, v

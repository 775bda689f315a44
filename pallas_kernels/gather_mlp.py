"""Gathered MLP projections for sparse decode: read only the selected neurons' weight rows.

Two row-gather kernels live here; the attention projections (gather_attention.py) reuse them with a
head's Dh rows standing in for one neuron:

* `gather_rows_matvec`  h[b, e] = x[b] . W[row(e)]          (up / gate / Q projections)
* `gather_rows_reduce`  y[b, :] = sum_e a[b, e] * W[row(e)]  (down / out projections)

where entry e = k * R + r of the selection maps to row(e) = idx[k] * R + r of a row-major weight
W [F * R, ...]. R = 1 for MLP neurons, R = Dh for attention heads.

Batch-1 decode is memory-bound: each kernel streams K * R contiguous weight rows once, with fp32
accumulation. All indexing uses integer arrays (not `pl.ds`) because Triton blocks must have power-of-
two sizes and the tail blocks run past the real extent; masked loads keep those lanes from reading
memory, and integer-array indexing is also what the CPU interpreter supports with masks.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    NORMS,
    TARGET_PROGRAMS,
    apply_norm,
    cdiv,
    check_block_keys,
    check_pow2,
    full_index,
    norm_mean_rstd,
    pow2_ceil,
    pow2_floor,
)

ACTIVATIONS = ("relu", "swiglu", "none")
UP_BLOCK_KEYS = ("block_e", "block_d", "num_warps", "num_stages")
DOWN_BLOCK_KEYS = ("block_e", "block_d", "k_splits", "combine", "num_warps", "num_stages")
COMBINES = ("atomic", "partials", "atomic_last")


def _load_cols(ref_at, c_ok: jax.Array | None) -> jax.Array:
    """Load a column block, masked (zeros past D) only when c_ok is given: Triton's lowering (jax
    0.11) refuses a fill value without a mask."""
    return plgpu.load(ref_at) if c_ok is None else plgpu.load(ref_at, mask=c_ok, other=0.0)


def _selected_rows(idx_ref, e: jax.Array, e_ok: jax.Array, rows_per_idx: int) -> jax.Array:
    """Weight row of each selection entry e = k * R + r: idx[k] * R + r. e, e_ok: [BE]."""
    if rows_per_idx == 1:
        # Padded entries (e >= K) get row 0; their weight loads are masked off anyway.
        return plgpu.load(idx_ref.at[e], mask=e_ok, other=0)
    k = e // rows_per_idx
    sel = plgpu.load(idx_ref.at[k], mask=e_ok, other=0)
    return sel * rows_per_idx + e % rows_per_idx


# --------------------------------------------------------------------------------------------------
# Up projection: h[b, e, u] = x[b] . W[row(e), u*D:(u+1)*D], then bias and activation.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UpBlocks:
    block_e: int  # selection entries (weight rows) per program
    block_d: int  # columns of D loaded per step; block_d >= D loads a whole row block at once
    num_warps: int = 4
    num_stages: int | None = None


def default_up_blocks(n_entries: int, d_model: int, n_parts: int, batch: int) -> UpBlocks:
    """One whole row (up to 4096 columns) per program, ~4K weight elements per program.

    Measured on the H100 (NOTES.md, run 2): at D=4096 one row per program (block_e=1,
    block_d=4096, 4 warps) was the fastest of the sweep at density 0.1 (7.0 us for 6.7 MB) and tied
    at 0.5; larger tiles or more warps were 10-60% slower at low density. Narrower models put
    several rows in a program so that each still loads ~4K elements at once.
    """
    block_d = min(pow2_ceil(d_model), max(pow2_floor(4096 // max(batch, 1)), 256))
    block_e = max(min(4096 // (block_d * n_parts), pow2_ceil(n_entries)), 1)
    return UpBlocks(block_e=block_e, block_d=block_d, num_warps=4)


def _up_kernel(x_ref, idx_ref, w_ref, *refs, n_entries, rows_per_idx, n_parts, d_model, batch,
               activation, has_bias, norm_kind, norm_eps, has_norm_bias, block_e, block_d):
    # x_ref [B, D] (norm_kind: the residual, normalised here); idx_ref [K]; w_ref [F*R, U*D];
    # b_ref [F*R*U] (optional); ns_ref, nb_ref [D] (norm_kind; nb_ref only with has_norm_bias);
    # o_ref [B, K*R]
    refs = list(refs)
    b_ref = refs.pop(0) if has_bias else None
    ns_ref = refs.pop(0) if norm_kind else None
    nb_ref = refs.pop(0) if has_norm_bias else None
    (o_ref,) = refs
    e = pl.program_id(0) * block_e + jnp.arange(block_e, dtype=jnp.int32)  # [BE]
    e_ok = e < n_entries
    row = _selected_rows(idx_ref, e, e_ok, rows_per_idx)  # [BE]

    chunks = []  # (cols, column mask or None) of each static step over D
    for d0 in range(0, d_model, block_d):  # static: the whole row block is straight-line code
        cols = d0 + jnp.arange(block_d, dtype=jnp.int32)  # [BD]
        # Column masks only where the block runs past D (simpler, fully vectorised loads).
        chunks.append((cols, cols < d_model if d0 + block_d > d_model else None))

    def load_w(i, u):  # [BE, BD] tile of step i, part u
        cols, c_ok = chunks[i]
        return plgpu.load(w_ref.at[row[:, None], (u * d_model + cols)[None, :]],
                          mask=e_ok[:, None] if c_ok is None else e_ok[:, None] & c_ok[None, :], other=0.0)

    # With the norm inside, the weight tiles are loaded first so that their reads are in flight
    # while the row is normalised (its reductions would otherwise hold them back).
    ws = [[load_w(i, u) for u in range(n_parts)] for i in range(len(chunks))] if norm_kind else None
    xs = [[_load_cols(x_ref.at[full_index(cols, b), cols], c_ok).astype(jnp.float32) for cols, c_ok in chunks]
          for b in range(batch)]  # B x steps x [BD]
    if norm_kind:  # every program normalises the row itself: it reads the whole row anyway
        for b in range(batch):
            mean, rstd = norm_mean_rstd(sum(jnp.sum(x) for x in xs[b]), sum(jnp.sum(x * x) for x in xs[b]),
                                        d_model, kind=norm_kind, eps=norm_eps)
            for i, (cols, c_ok) in enumerate(chunks):
                y = (xs[b][i] - mean) * rstd * _load_cols(ns_ref.at[cols], c_ok).astype(jnp.float32)
                if nb_ref is not None:
                    y = y + _load_cols(nb_ref.at[cols], c_ok).astype(jnp.float32)
                xs[b][i] = y.astype(x_ref.dtype).astype(jnp.float32)  # apply_norm's rounding

    acc = [[jnp.zeros((block_e,), jnp.float32) for _ in range(n_parts)] for _ in range(batch)]
    for i in range(len(chunks)):
        for u in range(n_parts):
            w = (ws[i][u] if ws else load_w(i, u)).astype(jnp.float32)
            for b in range(batch):  # [BE, BD] * [1, BD] summed over D
                acc[b][u] = acc[b][u] + jnp.sum(w * xs[b][i][None, :], axis=1)

    if has_bias:
        bias = [plgpu.load(b_ref.at[row * n_parts + u], mask=e_ok, other=0.0).astype(jnp.float32)
                for u in range(n_parts)]
    for b in range(batch):
        h = [acc[b][u] + bias[u] if has_bias else acc[b][u] for u in range(n_parts)]
        if activation == "relu":
            out = jnp.maximum(h[0], 0.0)
        elif activation == "swiglu":
            out = h[0] * jax.nn.sigmoid(h[0]) * h[1]
        else:
            out = h[0]
        plgpu.store(o_ref.at[full_index(e, b), e], out.astype(o_ref.dtype), mask=e_ok)


@functools.partial(jax.jit, static_argnames=("rows_per_idx", "n_parts", "activation", "blocks",
                                             "interpret", "norm_kind", "norm_eps"))
def gather_rows_matvec(x, w, idx, b=None, norm_scale=None, norm_bias=None, *, rows_per_idx: int, n_parts: int,
                       activation: str, blocks: UpBlocks, interpret: bool, norm_kind: str | None = None,
                       norm_eps: float = 0.0):
    """h[b, k*R + r] = act(x[b] . w[idx[k]*R + r]) for w [F*R, U*D], x [B, D] -> [B, K*R].

    A row holds U parts of D columns side by side (U=2: gate, up); the kernel reads the first
    n_parts of them. b is [F*R*n_parts] or None. With norm_kind, x is first normalised as
    `apply_norm(x, norm_scale, norm_bias, kind=norm_kind, eps=norm_eps)` inside the kernel.
    """
    batch, d_model = x.shape
    n_entries = idx.shape[0] * rows_per_idx
    check_pow2(block_e=blocks.block_e, block_d=blocks.block_d)
    kernel = functools.partial(
        _up_kernel, n_entries=n_entries, rows_per_idx=rows_per_idx, n_parts=n_parts,
        d_model=d_model, batch=batch, activation=activation, has_bias=b is not None,
        norm_kind=norm_kind, norm_eps=norm_eps, has_norm_bias=norm_bias is not None,
        block_e=blocks.block_e, block_d=min(blocks.block_d, pow2_ceil(d_model)))
    operands = (x, idx.astype(jnp.int32), w) + tuple(v for v in (b, norm_scale, norm_bias) if v is not None)
    return pl.pallas_call(
        kernel,
        grid=(cdiv(n_entries, blocks.block_e),),
        out_shape=jax.ShapeDtypeStruct((batch, n_entries), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="gather_rows_matvec",
    )(*operands)


def gathered_up(x, w_up, idx, b_up=None, *, activation="relu", norm=None, interpret=False, **blocks):
    """Selected neurons' MLP up projection with bias and activation fused.

    x [B, D]; w_up [F, U, D] (U=2: index 0 gate, 1 up); idx [K] int32 distinct; b_up [F, U] or None.
    Returns act(h) [B, K] in x.dtype with h[b, k, u] = x[b] . w_up[idx[k], u] (+ b_up[idx[k], u]).
    norm: None, or (kind, eps, scale [D], bias [D] or None): x is the residual and the MLP's norm
    (`apply_norm`) is applied to it inside the kernel, which saves the step the norm's launches.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_block_keys(blocks, UP_BLOCK_KEYS, "gathered_up")
    _, n_u, d_model = w_up.shape
    if activation == "swiglu" and n_u != 2:
        raise ValueError(f"swiglu needs w_up [F, 2, D], got {w_up.shape}")
    n_parts = 2 if activation == "swiglu" else 1  # relu / none read only part 0
    cfg = dataclasses.replace(default_up_blocks(idx.shape[0], d_model, n_parts, x.shape[0]),
                              **blocks)
    kind, eps, scale, bias = _check_norm(norm, d_model)
    return _gathered_up(x, w_up, idx, b_up, scale, bias, n_parts=n_parts, activation=activation, blocks=cfg,
                        norm_kind=kind, norm_eps=eps, interpret=interpret)


def _check_norm(norm, d_model: int):
    """gathered_up's norm argument as (kind, eps, scale, bias), (None, 0.0, None, None) without one."""
    if norm is None:
        return None, 0.0, None, None
    kind, eps, scale, bias = norm
    if kind not in NORMS or scale.shape != (d_model,) or (bias is None) != (kind == "rmsnorm") or (
            bias is not None and bias.shape != (d_model,)):
        raise ValueError(f"norm must be (kind in {NORMS}, eps, scale [{d_model}], bias [{d_model}] for "
                         f"layernorm / None for rmsnorm)")
    return kind, float(eps), scale, bias


@functools.partial(jax.jit, static_argnames=("n_parts", "activation", "blocks", "norm_kind", "norm_eps",
                                             "interpret"))
def _gathered_up(x, w_up, idx, b_up, norm_scale, norm_bias, *, n_parts, activation, blocks, norm_kind,
                 norm_eps, interpret):
    n_feat, n_u, d_model = w_up.shape
    w2 = w_up.reshape(n_feat, n_u * d_model)  # [F, U*D], free: rows are contiguous
    b2 = None
    if b_up is not None:
        # The kernel reads bias at row * n_parts + u, so keep only the parts it uses.
        b2 = b_up[:, :n_parts].reshape(n_feat * n_parts)
    return gather_rows_matvec(x, w2, idx, b2, norm_scale, norm_bias, rows_per_idx=1, n_parts=n_parts,
                              activation=activation, blocks=blocks, interpret=interpret, norm_kind=norm_kind,
                              norm_eps=norm_eps)


def gathered_up_reference(x, w_up, idx, b_up=None, *, activation="relu", norm=None):
    """XLA reference: apply_norm (given norm), jnp.take of the selected rows, an fp32-accumulated dot."""
    kind, eps, scale, bias = _check_norm(norm, w_up.shape[2])
    if kind is not None:
        x = apply_norm(x, scale, bias, kind=kind, eps=eps)
    return _gathered_up_reference(x, w_up, idx, b_up, activation=activation)


@functools.partial(jax.jit, static_argnames=("activation",))
def _gathered_up_reference(x, w_up, idx, b_up, *, activation):
    w_sel = jnp.take(w_up, idx, axis=0)  # [K, U, D]
    h = jnp.einsum("BD,KUD->BKU", x, w_sel, preferred_element_type=jnp.float32)
    if b_up is not None:
        h = h + jnp.take(b_up, idx, axis=0).astype(jnp.float32)[None]
    if activation == "relu":
        out = jax.nn.relu(h[..., 0])
    elif activation == "swiglu":
        out = jax.nn.silu(h[..., 0]) * h[..., 1]
    elif activation == "none":
        out = h[..., 0]
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return out.astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# Down projection: y[b, :] = sum_e a[b, e] * W[row(e), :].
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DownBlocks:
    block_e: int  # selected rows loaded per loop step
    block_d: int  # output columns per program
    k_splits: int = 1  # >1: split the selected rows over programs; their sums are combined by
    # "atomic": fp32 atomic_add into a zeroed output (memset + kernel + cast), or
    # "partials": each split stores its own fp32 row, XLA sums them (kernel + one reduction)
    # "atomic_last": atomics as above, and the last split to finish a column block (an atomic
    #     counter per block) writes that block in the output dtype (memsets + kernel, no cast)
    combine: str = "atomic"
    num_warps: int = 4
    num_stages: int | None = None


def default_down_blocks(n_entries: int, d_model: int, batch: int) -> DownBlocks:
    """Split-K over the selected rows: [32, 512] tiles, ~2 x TARGET_PROGRAMS programs.

    Measured on the H100 (NOTES.md, run 2) at D=4096: block_e=32, block_d=512 (1 KiB contiguous
    per row) with per-split fp32 partials summed by XLA was the fastest combination at densities
    0.1 and 0.5 (8.8 us at 0.1 including the 1.6 us reduction, 28.6 us at 0.5); one program per
    column block looping over all rows (k_splits=1) was 2-3x slower at every density.
    """
    block_d = min(pow2_ceil(d_model), 512)
    n_dblocks = cdiv(d_model, block_d)
    block_e = pow2_floor(max(min(16384 // block_d // max(batch, 1), n_entries), 1))
    steps = cdiv(n_entries, block_e)
    k_splits = max(min(steps, 2 * TARGET_PROGRAMS // n_dblocks), 1)
    return DownBlocks(block_e=block_e, block_d=block_d, k_splits=k_splits, combine="partials",
                      num_warps=4)


def _down_kernel(a_ref, idx_ref, w_ref, *refs, n_entries, rows_per_idx, d_model, batch,
                 steps_per_split, combine, block_e, block_d, interpret):
    # a_ref [B, K*R]; idx_ref [K]; w_ref [F*R, D]; o_ref: [B, D] in a's dtype (combine None),
    # [B, Dp] fp32 ("atomic": the zeroed input buffer aliased to it comes first in refs) or
    # [splits, B, Dp] fp32 ("partials"); Dp pads D to whole column blocks, so no store mask.
    o_ref = refs[-1]
    cols = pl.program_id(0) * block_d + jnp.arange(block_d, dtype=jnp.int32)  # [BD]
    c_ok = cols < d_model
    full_cols = d_model % block_d == 0  # no column mask needed on the weight loads
    first = pl.program_id(1) * steps_per_split * block_e

    def step(t, acc):
        e = first + t * block_e + jnp.arange(block_e, dtype=jnp.int32)  # [BE]
        e_ok = e < n_entries
        row = _selected_rows(idx_ref, e, e_ok, rows_per_idx)
        w_ok = e_ok[:, None] if full_cols else e_ok[:, None] & c_ok[None, :]
        w = plgpu.load(w_ref.at[row[:, None], cols[None, :]], mask=w_ok,
                       other=0.0).astype(jnp.float32)
        out = []
        for b in range(batch):  # [BE, 1] * [BE, BD] summed over the selected rows
            a_b = plgpu.load(a_ref.at[full_index(e, b), e], mask=e_ok, other=0.0).astype(jnp.float32)
            out.append(acc[b] + jnp.sum(a_b[:, None] * w, axis=0))
        return tuple(out)

    zeros = tuple(jnp.zeros((block_d,), jnp.float32) for _ in range(batch))
    if steps_per_split == 1:
        acc = step(0, zeros)
    else:
        acc = jax.lax.fori_loop(0, steps_per_split, step, zeros)
    if combine == "atomic_last":
        acc_ref, count_ref, y_ref = refs[-3:]
        for b in range(batch):
            plgpu.atomic_add(acc_ref, (full_index(cols, b), cols), acc[b])
        if not interpret:  # (the interpreter runs programs one at a time and has no barrier)
            # Every thread's adds are issued before the counter's acq_rel atomic releases them.
            plgpu.debug_barrier()
        done = plgpu.atomic_add(count_ref, (pl.program_id(0),), jnp.int32(1))

        @pl.when(done == pl.num_programs(1) - 1)
        def _():  # the last split of this column block: all partial sums are in acc_ref
            for b in range(batch):
                # Read through an atomic (+0) so the values come from L2, never a stale L1 line.
                total = plgpu.atomic_add(acc_ref, (full_index(cols, b), cols),
                                         jnp.zeros((block_d,), jnp.float32))
                plgpu.store(y_ref.at[full_index(cols, b), cols], total.astype(y_ref.dtype), mask=c_ok)
        return
    for b in range(batch):
        if combine == "atomic":
            plgpu.atomic_add(o_ref, (full_index(cols, b), cols), acc[b])
        elif combine == "partials":
            split = full_index(cols, 0) + pl.program_id(1)
            plgpu.store(o_ref.at[split, full_index(cols, b), cols], acc[b])
        else:
            plgpu.store(o_ref.at[full_index(cols, b), cols], acc[b].astype(o_ref.dtype), mask=c_ok)


@functools.partial(jax.jit, static_argnames=("rows_per_idx", "blocks", "interpret"))
def gather_rows_reduce(a, w, idx, *, rows_per_idx: int, blocks: DownBlocks, interpret: bool):
    """y[b] = sum_{k,r} a[b, k*R + r] * w[idx[k]*R + r] for a [B, K*R], w [F*R, D] -> [B, D]."""
    batch, n_entries = a.shape
    d_model = w.shape[1]
    check_pow2(block_e=blocks.block_e, block_d=blocks.block_d)
    block_d = min(blocks.block_d, pow2_ceil(d_model))
    steps = cdiv(n_entries, blocks.block_e)
    k_splits = max(min(blocks.k_splits, steps), 1)
    steps_per_split = cdiv(steps, k_splits)
    k_splits = cdiv(steps, steps_per_split)  # drop splits that would own no rows
    if blocks.combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {blocks.combine!r}")
    combine = blocks.combine if k_splits > 1 else None
    kernel = functools.partial(
        _down_kernel, n_entries=n_entries, rows_per_idx=rows_per_idx, d_model=d_model,
        batch=batch, steps_per_split=steps_per_split, combine=combine, block_e=blocks.block_e,
        block_d=block_d, interpret=interpret)
    n_dblocks = cdiv(d_model, block_d)
    padded = n_dblocks * block_d
    acc_shape = jax.ShapeDtypeStruct((batch, padded), jnp.float32)
    count_shape = jax.ShapeDtypeStruct((n_dblocks,), jnp.int32)
    out_shape = {
        None: jax.ShapeDtypeStruct((batch, d_model), a.dtype),
        "atomic": acc_shape,
        "partials": jax.ShapeDtypeStruct((k_splits, batch, padded), jnp.float32),
        "atomic_last": (acc_shape, count_shape, jax.ShapeDtypeStruct((batch, d_model), a.dtype)),
    }[combine]
    # Atomic partial sums (and the per-block counters) live in zeroed buffers passed in as inputs
    # and aliased to outputs.
    aliases = {"atomic": {3: 0}, "atomic_last": {3: 0, 4: 1}}.get(combine, {})
    call = pl.pallas_call(
        kernel,
        grid=(n_dblocks, k_splits),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="gather_rows_reduce",
    )
    operands = (a, idx.astype(jnp.int32), w)
    if combine == "atomic":
        acc = call(*operands, jnp.zeros(out_shape.shape, jnp.float32))  # [B, Dp] fp32
        return acc[:, :d_model].astype(a.dtype)
    if combine == "atomic_last":
        zeros = (jnp.zeros(acc_shape.shape, jnp.float32), jnp.zeros(count_shape.shape, jnp.int32))
        return call(*operands, *zeros)[2]
    if combine == "partials":
        return call(*operands).sum(axis=0)[:, :d_model].astype(a.dtype)  # [S, B, Dp] -> [B, D]
    return call(*operands)


def gathered_down(a, w_down, idx, *, interpret=False, **blocks):
    """Selected neurons' MLP down projection from the transposed weight.

    a [B, K] activations of the selected neurons; w_down [F, D] (row f = neuron f's output
    weights); idx [K]. Returns y [B, D] = sum_k a[b, k] * w_down[idx[k]] in a.dtype, fp32 sums.
    """
    check_block_keys(blocks, DOWN_BLOCK_KEYS, "gathered_down")
    cfg = dataclasses.replace(default_down_blocks(idx.shape[0], w_down.shape[1], a.shape[0]),
                              **blocks)
    return gather_rows_reduce(a, w_down, idx, rows_per_idx=1, blocks=cfg, interpret=interpret)


@jax.jit
def gathered_down_reference(a, w_down, idx):
    """XLA reference: jnp.take of the selected rows, then an fp32-accumulated dot."""
    w_sel = jnp.take(w_down, idx, axis=0)  # [K, D]
    y = jnp.einsum("BK,KD->BD", a, w_sel, preferred_element_type=jnp.float32)
    return y.astype(a.dtype)

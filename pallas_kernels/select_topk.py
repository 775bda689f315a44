"""Top-K row selection for sparse decode: scores -> the K best rows' indices, ascending, in one kernel.

The predictor gives one score per MLP neuron (or head) per decode step; the gathered kernels need the
K best rows as an index list. XLA's `lax.top_k` + `jnp.sort` at K = F/4 of F = 16384 lowers to
sorts of the whole score vector (several kernels each), and on the H100 that cost ~50 us per layer:
more than the sparse layer's own weight reads. This kernel does it in one program per row group:

1. Map each float32 score to an int32 key with the same order (sign-magnitude -> two's complement).
2. Bisect the key space between the smallest and largest key for t = the K-th largest key:
   count(key >= mid) per step over the scores, which are read once and stay in registers (F = 16384
   is 32 int32 per thread at 16 warps). The loop stops as soon as exactly K keys are >= the lower
   bound, usually after ~20 of the 32 possible steps.
3. Keep key > t, plus the first K - count(key > t) keys equal to t (ties go to lower indices, like
   `lax.top_k`), and compact them with a running prefix sum: the output is ascending, so the
   gathered kernels stream rows in address order.

Exact (equal sets to `lax.top_k`), deterministic, and independent of the score distribution.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, pow2_ceil

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1
MAX_CHUNK = 8192  # scores per register-resident chunk: 32 int32 per thread at 8 warps
# Measured on the H100 (scripts/topk_probe.py, pallas_kernels/results/topk_probe.json): 8 warps beat 16
# and 32 at F = 16384 (15.9 / 17.4 / 19.9 us), and a 4/8/16-way search that counts several bounds per
# block-wide reduction was slower than bisection at every warp count (22-43 us).
MAX_WARPS = 8


def order_key(x: jax.Array) -> jax.Array:
    """int32 keys that sort like the float32 values x (any shape)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return i ^ ((i >> 31) & jnp.int32(INT32_MAX))


def _topk_kernel(s_ref, o_ref, *, n, k, chunk, n_chunks):
    # s_ref [G, N] float32 scores; o_ref [G, K (+ chunk when interpreted)] int32: row g's top-K, ascending.
    g = pl.program_id(0)
    lane = jnp.arange(chunk, dtype=jnp.int32)
    # The scores are read once and stay in registers (chunk by chunk, statically unrolled): every
    # bisection step is then compares and one block-wide sum, no memory traffic.
    idx, oks, keys = [], [], []
    for c in range(n_chunks):
        i = c * chunk + lane
        ok = i < n
        x = plgpu.load(s_ref.at[jnp.full_like(i, g), i], mask=ok, other=0.0)
        idx.append(i)
        oks.append(ok)
        keys.append(order_key(x))

    def count(pred):  # number of real scores whose key satisfies pred; chunks add up lane-wise first
        hits = sum((pred(key) & ok).astype(jnp.int32) for key, ok in zip(keys, oks))
        return jnp.sum(hits)

    # Invariants: count(key >= lo) >= k and count(key > hi) < k, so the k-th largest key is in
    # [lo, hi]; the bracket starts at the smallest and largest key.
    lo0 = jnp.min(functools.reduce(jnp.minimum, [jnp.where(ok, key, INT32_MAX) for key, ok in zip(keys, oks)]))
    hi0 = jnp.max(functools.reduce(jnp.maximum, [jnp.where(ok, key, INT32_MIN) for key, ok in zip(keys, oks)]))

    def cond(carry):
        lo, hi, c_lo = carry
        return (lo < hi) & (c_lo != k)

    def step(carry):
        lo, hi, c_lo = carry
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2) without overflow
        c_mid = count(lambda key: key >= mid)
        ok = c_mid >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1), jnp.where(ok, c_mid, c_lo)

    lo, _, _ = jax.lax.while_loop(cond, step, (lo0, hi0, jnp.int32(n)))
    need_eq = k - count(lambda key: key > lo)  # how many keys equal to lo to keep (first ones win)

    n_sel = n_eq = jnp.int32(0)
    for i, ok, key in zip(idx, oks, keys):
        eq = (key == lo) & ok
        eq_i = eq.astype(jnp.int32)
        eq_rank = n_eq + jnp.cumsum(eq_i)  # 1-based rank among equal keys so far
        sel = ((key > lo) & ok) | (eq & (eq_rank <= need_eq))
        sel_i = sel.astype(jnp.int32)
        # Unselected lanes aim at their own slot past K: the CPU interpreter's masked store writes the
        # old value back, which must not land on a selected lane's slot (on the GPU they are masked off
        # and the output has just K columns).
        pos = jnp.where(sel, n_sel + jnp.cumsum(sel_i) - 1, k + lane)
        plgpu.store(o_ref.at[jnp.full_like(i, g), pos], i, mask=sel)
        n_sel, n_eq = n_sel + jnp.sum(sel_i), n_eq + jnp.sum(eq_i)


@functools.partial(jax.jit, static_argnames=("k", "chunk", "num_warps", "interpret"))
def _topk_rows(scores, *, k, chunk, num_warps, interpret):
    groups, n = scores.shape
    kernel = functools.partial(_topk_kernel, n=n, k=k, chunk=chunk, n_chunks=cdiv(n, chunk))
    out = pl.pallas_call(
        kernel,
        grid=(groups,),
        out_shape=jax.ShapeDtypeStruct((groups, k + (chunk if interpret else 0)), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="select_topk",
    )(scores.astype(jnp.float32))
    return out[:, :k] if interpret else out


def topk_rows(scores, k: int, *, interpret: bool = False, chunk: int | None = None, num_warps: int | None = None):
    """Ascending indices of the k largest scores of each row. scores [G, N] -> int32 [G, k].

    Ties at the boundary go to the lower index (the set `lax.top_k` returns). NaN scores are
    ranked by their bit pattern; feed finite scores. One program per row: G is the number of
    independent selections (tensor-parallel shards, or 1).
    """
    if scores.ndim != 2:
        raise ValueError(f"topk_rows takes scores [G, N], got shape {scores.shape}")
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} scores per row, got {k}")
    chunk = chunk or min(pow2_ceil(n), MAX_CHUNK)
    if chunk & (chunk - 1):
        raise ValueError(f"chunk={chunk} must be a power of two")
    num_warps = num_warps or max(1, min(MAX_WARPS, chunk // 512))
    return _topk_rows(scores, k=k, chunk=chunk, num_warps=num_warps, interpret=interpret)


def topk_rows_reference(scores, k: int):
    """XLA reference: lax.top_k then an ascending sort of the indices. scores [G, N] -> int32 [G, k]."""
    return jnp.sort(jax.lax.top_k(scores, k)[1], axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Scores from a predictor code, ranked per block of rows: the decode step's whole selection, one kernel.
# --------------------------------------------------------------------------------------------------
MAX_CODE_BLOCK = 256  # rows one program ranks: the pairwise rank is a [NB, NB] compare in registers


def _rank_code_block(z_ref, w_ref, o_ref, s, *, start, rank, block_rows, k_block, n_slots, nb, rb):
    # z_ref [>= start + r]: the predictor code at start .. start + r - 1; w_ref [N, r] output matrix
    # (rows = neurons / heads); o_ref [n_slots (+ NB when interpreted)] int32, n_slots = blocks * kb.
    # Block s scores rows s*block_rows .. (s+1)*block_rows - 1 and writes the ascending indices of its
    # kb best to o_ref[s*kb : (s+1)*kb].
    lane = jnp.arange(nb, dtype=jnp.int32)  # [NB]
    row = s * block_rows + lane
    row_ok = lane < block_rows
    c = jnp.arange(rb, dtype=jnp.int32)  # [RB]
    c_ok = c < rank
    w = plgpu.load(w_ref.at[row[:, None], c[None, :]], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    # The code is rounded to the weights' dtype first, as the XLA path's einsum does (fp32 sums).
    z = plgpu.load(z_ref.at[start + c], mask=c_ok, other=0.0).astype(w.dtype).astype(jnp.float32)
    key = order_key(jnp.sum(w.astype(jnp.float32) * z[None, :], axis=1))  # [NB]
    # Rank = how many rows of the block beat this one (higher score, or equal score and lower index):
    # a strict order, so the ranks are a permutation and exactly kb rows have rank < kb. All [NB, NB]
    # compares at once instead of a search loop: the block is small and registers are plentiful.
    other, me = key[None, :], key[:, None]  # [1, NB] (row j), [NB, 1] (row i)
    j_lt_i = lane[None, :] < lane[:, None]  # [NB, NB]
    beats = ((other > me) | ((other == me) & j_lt_i)) & row_ok[None, :]
    sel = (jnp.sum(beats.astype(jnp.int32), axis=1) < k_block) & row_ok  # [NB]
    pos = jnp.sum((sel[None, :] & j_lt_i).astype(jnp.int32), axis=1)  # selected rows before this one
    # Unselected lanes aim past the blocks' slots (see _topk_kernel's store: the interpreter writes
    # the old value back on masked-off lanes).
    slot = jnp.where(sel, s * k_block + pos, n_slots + lane)
    plgpu.store(o_ref.at[slot], row, mask=sel)


def _code_topk_kernel(z_ref, w_ref, o_ref, **block):
    _rank_code_block(z_ref, w_ref, o_ref, pl.program_id(0), **block)


def _code_block(n: int, rank: int, k: int, blocks: int, start: int) -> dict:
    """_rank_code_block's static sizes for N = n rows of rank r in `blocks` blocks, kb of each kept."""
    kb = -(-k // blocks)
    return dict(start=start, rank=rank, block_rows=n // blocks, k_block=kb, n_slots=blocks * kb,
                nb=pow2_ceil(n // blocks), rb=pow2_ceil(rank))


def _code_topk_out(block: dict, interpret: bool) -> jax.ShapeDtypeStruct:
    # Interpreted, the unselected lanes' scratch slots (see _rank_code_block) follow the real ones.
    return jax.ShapeDtypeStruct((block["n_slots"] + (block["nb"] if interpret else 0),), jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "blocks", "start", "num_warps", "interpret"))
def _code_topk_rows(z, w_t, *, k, blocks, start, num_warps, interpret):
    block = _code_block(*w_t.shape, k, blocks, start)
    out = pl.pallas_call(
        functools.partial(_code_topk_kernel, **block),
        grid=(blocks,),
        out_shape=_code_topk_out(block, interpret),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="code_topk",
    )(z, w_t)
    return out[: block["n_slots"]] if interpret else out


def _check_code_topk(z, w_t, k: int, blocks: int, start: int) -> None:
    if w_t.ndim != 2 or z.ndim != 1 or not 0 <= start <= z.shape[0] - w_t.shape[1]:
        raise ValueError(f"code_topk_rows takes z [r] (or a longer z with the code at start) and w_t [N, r], "
                         f"got {z.shape}, {w_t.shape} and start={start}")
    n = w_t.shape[0]
    if blocks < 1 or n % blocks:
        raise ValueError(f"{n} rows cannot be split into {blocks} equal blocks")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} rows, got {k}")


def _check_code_kernel(z, w_t, k: int, blocks: int, start: int) -> int:
    """_check_code_topk, and that one program can rank a block; returns the block's rows."""
    _check_code_topk(z, w_t, k, blocks, start)
    block_rows = w_t.shape[0] // blocks
    if block_rows > MAX_CODE_BLOCK:
        raise ValueError(f"code_topk_rows ranks at most {MAX_CODE_BLOCK} rows per block, got {block_rows} "
                         f"({w_t.shape[0]} rows in {blocks} blocks)")
    return block_rows


def _code_topk_warps(block_rows: int) -> int:
    return 4 if block_rows <= 32 else 8  # H100: 8 warps 4.7 us vs 4 warps 6.3 at 128 rows


def code_topk_rows(z, w_t, k: int, *, blocks: int = 1, start: int = 0, interpret: bool = False,
                   num_warps: int | None = None):
    """Ascending indices of the rows with the best scores w_t @ z[start:start + r], ranked per block of rows.

    z [>= start + r] (a predictor's rank-r code at start: both sites' codes come from one matvec,
    and slicing them apart would cost a kernel), w_t [N, r] (its output matrix, transposed) -> int32
    [blocks * kb], kb = ceil(k / blocks): the N rows are split into `blocks` equal contiguous blocks
    and each keeps its kb best (ties to the lower index), in order, block s at positions
    s*kb .. (s+1)*kb - 1: the layout `dejavu_jax.sparse.blockwise_topk_idx` returns. One program
    per block computes its N/blocks scores (fp32 sums) and ranks them by pairwise compares, so the
    score matvec, the ranking and the compaction are one launch with `blocks` programs in parallel
    (`topk_rows` ranks all N in one program by a sequential search). N / blocks <= MAX_CODE_BLOCK.
    """
    block_rows = _check_code_kernel(z, w_t, k, blocks, start)
    num_warps = num_warps or _code_topk_warps(block_rows)
    return _code_topk_rows(z, w_t, k=k, blocks=blocks, start=start, num_warps=num_warps, interpret=interpret)


def _code_topk_pair_kernel(z_ref, wh_ref, wm_ref, oh_ref, om_ref, *, heads, mlp, mlp_blocks):
    # Programs 0 .. mlp_blocks - 1 rank the MLP blocks, the last one the heads (one block). Each
    # branch is specialized to its own static sizes; programs of one launch run concurrently.
    s = pl.program_id(0)
    pl.when(s < mlp_blocks)(lambda: _rank_code_block(z_ref, wm_ref, om_ref, s, **mlp))
    pl.when(s == mlp_blocks)(lambda: _rank_code_block(z_ref, wh_ref, oh_ref, 0, **heads))


@functools.partial(jax.jit, static_argnames=("k_heads", "k_mlp", "mlp_blocks", "mlp_start", "heads_start",
                                             "num_warps", "interpret"))
def _code_topk_pair(z, heads_w_t, mlp_w_t, *, k_heads, k_mlp, mlp_blocks, mlp_start, heads_start, num_warps,
                    interpret):
    heads = _code_block(*heads_w_t.shape, k_heads, 1, heads_start)
    mlp = _code_block(*mlp_w_t.shape, k_mlp, mlp_blocks, mlp_start)
    heads_idx, mlp_idx = pl.pallas_call(
        functools.partial(_code_topk_pair_kernel, heads=heads, mlp=mlp, mlp_blocks=mlp_blocks),
        grid=(mlp_blocks + 1,),
        out_shape=(_code_topk_out(heads, interpret), _code_topk_out(mlp, interpret)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="code_topk_pair",
    )(z, heads_w_t, mlp_w_t)
    if interpret:
        return heads_idx[: heads["n_slots"]], mlp_idx[: mlp["n_slots"]]
    return heads_idx, mlp_idx


def code_topk_pair(z, heads_w_t, k_heads: int, mlp_w_t, k_mlp: int, *, mlp_blocks: int, mlp_start: int,
                   heads_start: int = 0, interpret: bool = False, num_warps: int | None = None):
    """A layer's two selections from one shared code in one launch: the two `code_topk_rows` calls

        code_topk_rows(z, heads_w_t, k_heads, start=heads_start)
        code_topk_rows(z, mlp_w_t, k_mlp, blocks=mlp_blocks, start=mlp_start)

    -> (heads_idx int32 [k_heads], mlp_idx int32 [mlp_blocks * ceil(k_mlp / mlp_blocks)]), the same
    values. The grid is the MLP's blocks plus one program for the heads, which then runs beside
    them instead of as a 1-program launch of its own (~2 us per layer on the H100, see
    results/profile-opt-6.7b-session5). heads_w_t [H, r_h] and every MLP block have at most
    MAX_CODE_BLOCK rows; num_warps (one for all programs) defaults to what code_topk_rows picks for
    the MLP blocks, the bulk of the work.
    """
    _check_code_kernel(z, heads_w_t, k_heads, 1, heads_start)
    block_rows = _check_code_kernel(z, mlp_w_t, k_mlp, mlp_blocks, mlp_start)
    return _code_topk_pair(z, heads_w_t, mlp_w_t, k_heads=k_heads, k_mlp=k_mlp, mlp_blocks=mlp_blocks,
                           mlp_start=mlp_start, heads_start=heads_start,
                           num_warps=num_warps or _code_topk_warps(block_rows), interpret=interpret)


def code_topk_rows_reference(z, w_t, k: int, *, blocks: int = 1, start: int = 0):
    """XLA reference: the einsum (z in w_t's dtype, fp32 sums), then lax.top_k + sort per block."""
    _check_code_topk(z, w_t, k, blocks, start)
    n, r = w_t.shape
    z = z[start:start + r]
    scores = jnp.einsum("r,nr->n", z.astype(w_t.dtype), w_t, preferred_element_type=jnp.float32)
    local = topk_rows_reference(scores.reshape(blocks, n // blocks), -(-k // blocks))  # [blocks, kb]
    return (local + (jnp.arange(blocks, dtype=jnp.int32) * (n // blocks))[:, None]).reshape(-1)


def code_topk_pair_reference(z, heads_w_t, k_heads: int, mlp_w_t, k_mlp: int, *, mlp_blocks: int, mlp_start: int,
                             heads_start: int = 0):
    """XLA reference for code_topk_pair: the two code_topk_rows_reference selections."""
    return (code_topk_rows_reference(z, heads_w_t, k_heads, start=heads_start),
            code_topk_rows_reference(z, mlp_w_t, k_mlp, blocks=mlp_blocks, start=mlp_start))

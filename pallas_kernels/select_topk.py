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

"""Probe: would pulling the next kernel's selected weight rows into L2 ahead of time pay? GPU only.

The sparse decode step (OPT-6.7B, H200) takes ~68 us per layer for ~37 us of bytes: between the
bandwidth-bound gathered kernels run ~10 small launches during which HBM is nearly idle. The
up-projection's rows are known a layer ahead (lookahead predictor), so a side kernel could read them
into L2 while the small launches run, and the up kernel would then read from L2. This measures the
three things that idea needs, at OPT-6.7B MLP shapes (D 4096, F 16384, fp16):

1. up / down kernel from HBM (4 weight copies in rotation, past L2) against from L2 (one copy);
2. `prefetch_rows` (below) by mode (loads into registers; one PTX L2 prefetch per 128-byte
   line; one bulk prefetch per row) and rows per program: its own time, and the up kernel's time
   right after it (do the rows stay in L2?);
3. a chain of 6 small dependent XLA launches followed by the up kernel, with and without the
   prefetch beside the chain (no data edge between them, so a concurrent CUDA graph may overlap
   them): the span of the whole.

python scripts/l2_probe.py --out DIR  ->  DIR/l2.{json,md}
(item 3 overlaps only with XLA_FLAGS=--xla_gpu_command_buffer_scheduling_mode=CONCURRENT)
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src import state
from jax._src import tree_util
from jax._src.pallas import core as pallas_core
from jax._src.state import discharge as state_discharge
from jax._src.state import primitives as sp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import gather_mlp as gm
from pallas_kernels._common import cdiv, check_pow2, pow2_ceil
from pallas_kernels.microbench import _time_calls, copy_bandwidth_gbs, write_rows

D, F = 4096, 16384

# --------------------------------------------------------------------------------------------------
# An L2 prefetch instruction inside Pallas (Triton) kernels: `l2_prefetch(ref.at[...])`.
#
# Pallas exposes loads, not prefetches. A load-based prefetch kernel holds registers and SM slots
# for as long as the reads take (pallas_kernels/NOTES.md, session 12), which is what the decode
# step's other kernels need at the same time. PTX's `prefetch.global.L2::evict_last` (one 128-byte
# line per lane) and sm_90's `cp.async.bulk.prefetch.L2.global` (a whole contiguous range per lane)
# return nothing and hold nothing: the L2 fetches the lines while the program moves on. Below is
# a primitive that lowers to one of them, using the Triton lowering's pointer arithmetic (JAX
# internals: checked on jax 0.10 and 0.11).
#
# In interpret mode (CPU) the primitive reads nothing and returns zeros.
# --------------------------------------------------------------------------------------------------

l2_prefetch_p = jax_core.Primitive("l2_prefetch")


@l2_prefetch_p.def_effectful_abstract_eval
def _abstract_eval(*avals_flat, args_tree, bulk_bytes):
    del bulk_bytes
    ref_aval, transforms = args_tree.unflatten(avals_flat)
    shape = pallas_core.TransformedRef(ref_aval, transforms).shape
    return jax_core.ShapedArray(shape, jnp.int32), {state.ReadEffect(0)}


@state_discharge.register_discharge_rule(l2_prefetch_p)
def _discharge(in_avals, out_avals, *args_flat, args_tree, bulk_bytes):
    del args_flat, args_tree, bulk_bytes
    return (None,) * len(in_avals), jnp.zeros(out_avals[0].shape, jnp.int32)


def l2_prefetch(ref_at, *, bulk_bytes: int = 0) -> jax.Array:
    """Asks L2 for the addresses of `ref_at` (a ref indexed like a load's, e.g. w.at[rows, cols]).

    bulk_bytes 0: each element's 128-byte line (index one element per line); > 0: each element
    starts a contiguous range of that many bytes (a multiple of 16, 16-byte aligned; sm_90+).
    Returns int32 zeros of the indexed shape; the kernel must use them (e.g. store their max), which
    keeps the instruction alive and lets a consumer order itself after the prefetches.
    """
    if bulk_bytes % 16:
        raise ValueError(f"bulk_bytes must be a multiple of 16, got {bulk_bytes}")
    ref, transforms = sp.get_ref_and_transforms(ref_at, None, "l2_prefetch")
    args_flat, args_tree = tree_util.tree_flatten((ref, transforms))
    return l2_prefetch_p.bind(*args_flat, args_tree=args_tree, bulk_bytes=bulk_bytes)


def _register_triton_lowering() -> None:
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering as tl

    @tl.register_lowering(l2_prefetch_p)
    def _lowering(ctx, *args_flat, args_tree, bulk_bytes):
        ptr, transforms = args_tree.unflatten(args_flat)
        (idx,) = transforms
        block_info = ctx.block_infos[0]
        shape = idx.get_indexer_shape_static()
        ptrs = tl._add(tl._bcast_to(ptr, shape), tl._compute_offsets_from_indices(block_info, idx))
        if bulk_bytes:
            asm = f"cp.async.bulk.prefetch.L2.global [$1], {bulk_bytes}; mov.u32 $0, 0;"
        else:
            asm = "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;"
        out_type = ir.RankedTensorType.get(shape, ir.IntegerType.get_signless(32))
        zeros = tt_dialect.elementwise_inline_asm([out_type], asm, constraints="=r,l", pure=False,
                                                  packed_element=1, args=[ptrs])
        return zeros[0] if isinstance(zeros, (list, tuple)) else zeros


_register_triton_lowering()


def _prefetch_kernel(idx_ref, w_ref, after_ref, o_ref, *, n_entries, d_model, block_e, block_d, mode):
    # idx_ref [K]; w_ref [F, U*D] (the first D columns are fetched); after_ref: not read (the launch's
    # dependency only); o_ref [programs] fp32, zeros.
    del after_ref
    e = pl.program_id(0) * block_e + jnp.arange(block_e, dtype=jnp.int32)
    e_ok = e < n_entries
    row = plgpu.load(idx_ref.at[e], mask=e_ok, other=0)  # padded entries fetch row 0 again
    if mode == "load":  # loads into registers (evict_last), summed to a zero
        top = jnp.float32(-jnp.inf)
        for d0 in range(0, d_model, block_d):
            cols = d0 + jnp.arange(block_d, dtype=jnp.int32)
            ok = e_ok[:, None] & (cols < d_model)[None, :] if d0 + block_d > d_model else e_ok[:, None]
            w = plgpu.load(w_ref.at[row[:, None], cols[None, :]], mask=ok, other=0.0, eviction_policy="evict_last")
            top = jnp.maximum(top, jnp.max(w.astype(jnp.float32)))
        o_ref[pl.program_id(0)] = top * 0.0
        return
    if mode == "bulk":  # one lane per row: the whole row as one bulk prefetch
        zeros = l2_prefetch(w_ref.at[row, 0], bulk_bytes=d_model * w_ref.dtype.itemsize)
    else:  # "line": one lane per 128-byte line
        per_line = 128 // w_ref.dtype.itemsize
        cols = jnp.minimum(jnp.arange(pow2_ceil(cdiv(d_model, per_line)), dtype=jnp.int32) * per_line, d_model - 1)
        zeros = l2_prefetch(w_ref.at[row[:, None], cols[None, :]])
    o_ref[pl.program_id(0)] = jnp.max(zeros).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("d_model", "block_e", "block_d", "mode", "interpret"))
def _prefetch_rows(w, idx, after, *, d_model, block_e, block_d, mode, interpret):
    n = idx.shape[0]
    grid = cdiv(n, block_e)
    kernel = functools.partial(_prefetch_kernel, n_entries=n, d_model=d_model, block_e=block_e,
                               block_d=min(block_d, pow2_ceil(d_model)), mode=mode)
    return pl.pallas_call(
        kernel, grid=(grid,), out_shape=jax.ShapeDtypeStruct((grid,), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4), interpret=interpret, name="prefetch_rows",
    )(idx.astype(jnp.int32), w, after)


def prefetch_rows(w, idx, after, *, block_e: int = 32, block_d: int = 4096, mode: str = "line", interpret=False):
    """Reads the selected rows w[idx, :D] once so that they sit in L2 for the next kernel over them.

    w [F, D] or [F, U, D] (part 0 read); idx [K]; after: any array, the launch waits for it (so it
    starts at a chosen point of the step, beside the kernels that leave HBM idle). Returns a [P]
    fp32 array of zeros that the consumer must add in (that edge orders the reads before it).
    """
    check_pow2(block_e=block_e, block_d=block_d)
    d_model = w.shape[-1]
    return _prefetch_rows(w.reshape(w.shape[0], -1), idx, after, d_model=d_model, block_e=block_e,
                          block_d=block_d, mode=mode, interpret=interpret)


def time_per_application(apply, xs, layers, n_trials):
    """microbench.time_per_application with a data edge from each application to the next (the
    next x adds 0 * the previous output), so the applications stay in order even where the CUDA
    graph keeps only data edges (CONCURRENT scheduling, where optimization barriers order nothing)."""
    def run(xs, layers):
        outs, prev = [], None
        for x in xs:
            for layer in layers:
                if prev is not None:
                    x = x + (prev.reshape(-1)[0] * 0).astype(x.dtype)
                prev = apply(x, layer)
                outs.append(prev)
        return outs
    return _time_calls(jax.jit(run), xs, layers, n_trials)


def timed_case(flags: str, case: str, make_fn, xs, layers, ref, floor_us: float) -> dict:
    """One probe row: fn = make_fn(), its largest difference from `ref` on (xs[0], layers[0]), and
    time_per_application's numbers over the chain. A case that does not build, compile or run
    leaves its error in the row instead (a probe records it and goes on). The row is printed."""
    row = dict(flags=flags, case=case)
    try:
        fn = make_fn()
        err = float(jnp.max(jnp.abs(jax.jit(fn)(xs[0], layers[0]).astype(jnp.float32) - ref.astype(jnp.float32))))
        t = time_per_application(fn, xs, layers, 10)
        row.update(time_us=round(t["time_us"], 2), wall_us=round(t["wall_us"], 2),
                   kernel_us=round(t.get("kernel_us", float("nan")), 2), floor_us=round(floor_us, 2),
                   max_err=err, kernels=t.get("kernels"))
    except Exception as e:  # recorded, not fatal
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
    print(json.dumps(row), flush=True)
    return row

def small_chain(x, n=6):
    """n dependent launches on a [1, D] row (a norm-like reduction each), kept apart by barriers."""
    for _ in range(n):
        xf = x.astype(jnp.float32)
        x = ((xf - xf.mean()) * jax.lax.rsqrt(xf.var() + 1e-5)).astype(x.dtype)
        x = jax.lax.optimization_barrier(x)
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25])
    p.add_argument("--trials", type=int, default=10)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth_gbs()
    keys = jax.random.split(jax.random.key(0), 16)
    copies = [jax.random.normal(k, (F, D), jnp.float16) * 0.02 for k in keys[:4]]  # 4 x 134 MB
    xs = [jax.random.normal(k, (1, D), jnp.float16) for k in keys[4:12]]
    rows = []

    def record(row, t, nbytes):
        row.update(time_us=round(t["time_us"], 2), kernel_us=round(t.get("kernel_us", float("nan")), 2),
                   floor_us=round(nbytes / bw / 1e3, 2), kernels=t.get("kernels"))
        print(json.dumps(row), flush=True)
        rows.append(row)

    for density in args.densities:
        k = int(F * density)
        idx = jnp.sort(jax.random.choice(keys[13], F, (k,), replace=False)).astype(jnp.int32)
        nbytes = k * D * 2
        up = lambda x, w: gm.gathered_up(x, w[:, None, :], idx)
        down = lambda x, w: gm.gathered_down(jnp.tile(x, (1, -(-k // D)))[:, :k], w, idx)  # a [1, K]
        for name, fn in (("up", up), ("down", down)):
            record(dict(density=density, case=f"{name} from HBM (4 copies)"), time_per_application(fn, xs, copies,
                                                                                                   args.trials), nbytes)
            record(dict(density=density, case=f"{name} from L2 (1 copy)"), time_per_application(fn, xs, copies[:1],
                                                                                                args.trials), nbytes)
        for mode, block_e in (("load", 4), ("line", 8), ("line", 32), ("bulk", 32), ("bulk", 128)):
            pre = functools.partial(prefetch_rows, idx=idx, mode=mode, block_e=block_e)
            tag = f"prefetch {mode} BE{block_e}"
            t = time_per_application(lambda x, w: pre(w[:, None, :], after=x) + x[0, 0].astype(jnp.float32), xs,
                                     copies, args.trials)
            record(dict(density=density, case=f"{tag} alone"), t, nbytes)

            def pre_then_up(x, w):
                s = pre(w[:, None, :], after=x)
                return up(x + s[0].astype(x.dtype), w)
            record(dict(density=density, case=f"{tag}, then up"), time_per_application(pre_then_up, xs, copies,
                                                                                       args.trials), nbytes)

            def chain_pre_up(x, w):
                s = pre(w[:, None, :], after=x)  # no edge to the chain: free to overlap it
                return up(small_chain(x) + s[0].astype(x.dtype), w)
            record(dict(density=density, case=f"6 small launches beside {tag}, then up"),
                   time_per_application(chain_pre_up, xs, copies, args.trials), nbytes)

        def chain_up(x, w):
            return up(small_chain(x), w)

        record(dict(density=density, case="6 small launches then up"), time_per_application(chain_up, xs, copies,
                                                                                            args.trials), nbytes)

    # Dense: XLA's up matvec over all of W (134 MB, more than L2), after a prefetch of its first rows.
    dense_up = lambda x, w: jnp.einsum("bd,fd->bf", x, w)
    record(dict(density=1.0, case="dense up einsum from HBM"), time_per_application(dense_up, xs, copies, args.trials),
           F * D * 2)
    for frac in (0.125, 0.25):
        head = jnp.arange(int(F * frac), dtype=jnp.int32)
        pre = functools.partial(prefetch_rows, idx=head, mode="line")

        def pre_dense(x, w):
            s = pre(w[:, None, :], after=x)
            return dense_up(x + s[0].astype(x.dtype), w)
        record(dict(density=1.0, case=f"prefetch first {frac} of rows, then dense up einsum"),
               time_per_application(pre_dense, xs, copies, args.trials), F * D * 2)

    device = jax.devices()[0].device_kind
    write_rows(args.out, "l2", f"L2 prefetch probe, OPT-6.7B MLP (D {D}, F {F}, fp16), {device}, copy {bw:.0f} GB/s",
               ["density", "case", "time_us", "kernel_us", "floor_us", "kernels"], rows, device=device, copy_gbs=bw)

if __name__ == "__main__":
    main()

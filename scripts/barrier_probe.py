"""Probe: what a grid barrier inside one persistent kernel costs against a launch boundary. GPU only.

Issue 7's remaining gap is per-launch fixed cost (~3 us over its bytes for each gathered kernel,
pallas_kernels/NOTES.md). The one direction not measured is a persistent per-layer kernel whose
phases (attention inputs, attention, out projection, MLP, their reductions) are separated by grid
barriers instead of launches. Session 22 wrote its cost model down with two unknowns; this probe
measures both on a stand-in that has the step's shape:

* a phase is a gathered matvec at the up projection's shape at density 0.25: y = relu(W[idx] x),
  K = 4096 of F = 16384 rows of D = 4096 (33.5 MB), and its output is the next phase's input
  (K == D), so phase k + 1 cannot start anywhere before every program has finished phase k;
* N phases over 4 weight copies in rotation (4 x 134 MB, past L2).

Cases (time per phase, GPU span):

* "launches": the production `gathered_up` once per phase, in one jit (XLA's CUDA graph);
* "persistent": one launch of P programs (1-4 per SM, CONFIGS), each owning row blocks p, p + P, ... of every
  phase, with a grid barrier (an atomic arrive on a counter, then a spin on it) between phases;
* "persistent, prefetch": the same, with each program's first weight tile of phase k + 1 requested
  before it arrives at phase k's barrier (the indices are known ahead, the weights never depend on
  the previous phase), so the barrier's wait overlaps that tile's round trip;
* "barriers only": the persistent kernel with no rows, so its time per phase is one barrier.

python scripts/barrier_probe.py --out DIR            (GPU: DIR/barrier.{json,md})
python scripts/barrier_probe.py --check              (CPU, interpret mode, one program: the persistent
                                                     kernel's phases against the launches' reference)
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from pallas_kernels import gather_mlp as gm  # noqa: E402
from pallas_kernels._common import cdiv  # noqa: E402

D, F, K = 4096, 16384, 4096
COPIES = 4
# (programs per SM, rows per step, warps, stages (None: Triton's default), prefetch). Run 1 (session
# 22, results/barrier-probe-h100/run1.md) swept 1-2 per SM, 1-2 rows, 4-8 warps, with and without
# the prefetch: best 21.2 us per phase (2 per SM, 2 rows, 8 warps) against 14.0 for the launches.
# Run 2 asks whether more rows in flight per SM close that.
CONFIGS = (
    (2, 2, 8, None, True), (2, 4, 8, None, True), (2, 8, 8, None, True), (2, 4, 16, None, True),
    (3, 2, 8, None, True), (3, 4, 8, None, True), (4, 2, 8, None, True), (4, 4, 8, None, True),
    (2, 4, 8, 1, True), (2, 4, 8, 4, True), (2, 4, 8, None, False), (4, 2, 4, None, True),
)
# A spin that has not seen every program after this many polls gives up (the output is then wrong and
# max_err says so) rather than hanging the device: programs that are not co-resident never arrive.
MAX_POLLS = 1 << 16  # ~50 ms; a real wait is a few us


def _grid_barrier(count_ref, target, interpret: bool):
    """Wait until `target` arrivals have been counted (this program's included). count_ref [1] int32."""
    if not interpret:
        plgpu.debug_barrier()  # every thread's stores of the phase are issued before the release

    def at():  # a traced index: the interpreter's atomic takes no Python int
        return (pl.program_id(0) * 0,)
    plgpu.atomic_add(count_ref, at(), jnp.int32(1))  # acq_rel: releases this program's stores

    if interpret:  # one program at a time (the check runs one): its own arrivals are all there are;
        return     # and the interpreter cannot discharge a while loop around a ref

    def waiting(carry):
        seen, polls = carry
        return (seen < target) & (polls < MAX_POLLS)

    def poll(carry):  # read through an atomic (+0): from L2, with acquire
        return plgpu.atomic_add(count_ref, at(), jnp.int32(0)), carry[1] + 1

    jax.lax.while_loop(waiting, poll, (plgpu.atomic_add(count_ref, at(), jnp.int32(0)), jnp.int32(0)))


def _persistent_kernel(x_ref, idx_ref, *refs, n_programs, block_e, prefetch, work, interpret):
    # x_ref [1, D] phase 0's input; idx_ref [N, K] rows of each phase (K == D); refs: COPIES weights
    # [F, D], count_in (aliased, unread), y_ref [N + 1, K] (row k + 1: phase k's output), count_ref [1].
    # work False: no rows are read, the phases are only their barriers.
    ws, (_, y_ref, count_ref) = refs[:COPIES], refs[COPIES:]
    n_phases, n_rows = idx_ref.shape
    p = pl.program_id(0)
    cols = jnp.arange(x_ref.shape[1], dtype=jnp.int32)
    n_steps = cdiv(cdiv(n_rows, block_e), n_programs)

    def tile(k, j):  # phase k's j-th row block of this program: (entries, ok, weight rows [BE, D])
        e = (p + j * n_programs) * block_e + jnp.arange(block_e, dtype=jnp.int32)
        ok = e < n_rows
        row = plgpu.load(idx_ref.at[k, e], mask=ok, other=0)
        return e, ok, plgpu.load(ws[k % COPIES].at[row[:, None], cols[None, :]], mask=ok[:, None], other=0.0)

    first = tile(0, 0) if work else None
    for k in range(n_phases):
        if work:
            src = x_ref.at[0, cols] if k == 0 else y_ref.at[k, cols]
            x = plgpu.load(src).astype(jnp.float32)  # [D]

            def compute(e, ok, w, k=k, x=x):
                h = jnp.sum(w.astype(jnp.float32) * x[None, :], axis=1)  # [BE]
                plgpu.store(y_ref.at[k + 1, e], jnp.maximum(h, 0.0).astype(y_ref.dtype), mask=ok)

            compute(*first)

            def step(j, c, k=k, compute=compute):
                compute(*tile(k, j))
                return c

            jax.lax.fori_loop(1, n_steps, step, 0)
            if prefetch and k + 1 < n_phases:
                first = tile(k + 1, 0)  # requested now, used after the barrier
        if k + 1 < n_phases:
            _grid_barrier(count_ref, (k + 1) * n_programs, interpret)
            if work and not prefetch:
                first = tile(k + 1, 0)


@functools.partial(jax.jit, static_argnames=("n_programs", "block_e", "prefetch", "work", "num_warps",
                                             "num_stages", "interpret"))
def persistent_chain(x, weights, idx, *, n_programs, block_e=1, prefetch=False, work=True, num_warps=4,
                     num_stages=None, interpret=False):
    """x [1, D]; weights: COPIES x [F, D]; idx [N, K] with K == D. Returns phase N-1's output [1, K]."""
    n_phases, n_rows = idx.shape
    assert n_rows == x.shape[1], "each phase's output is the next one's input: K == D"
    kernel = functools.partial(_persistent_kernel, n_programs=n_programs, block_e=block_e, prefetch=prefetch,
                               work=work, interpret=interpret)
    count = jnp.zeros((1,), jnp.int32)
    y, _ = pl.pallas_call(
        kernel, grid=(n_programs,),
        out_shape=(jax.ShapeDtypeStruct((n_phases + 1, n_rows), x.dtype), jax.ShapeDtypeStruct((1,), jnp.int32)),
        input_output_aliases={2 + COPIES: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="persistent_phases")(x, idx, *weights, count)
    return y[n_phases][None]


def launch_chain(x, weights, idx, interpret=False):
    """The same phases as one production gathered_up launch each."""
    for k in range(idx.shape[0]):
        x = gm.gathered_up(x, weights[k % COPIES][:, None, :], idx[k], interpret=interpret)
    return x


def reference_chain(x, weights, idx):
    for k in range(idx.shape[0]):
        x = gm.gathered_up_reference(x, weights[k % COPIES][:, None, :], idx[k])
    return x


def make_inputs(key, n_phases: int, d: int = D, f: int = F, k: int = K):
    keys = jax.random.split(key, COPIES + n_phases + 1)
    weights = [(jax.random.normal(kk, (f, d), jnp.float32) * (2.0 / d) ** 0.5).astype(jnp.float16)
               for kk in keys[:COPIES]]
    idx = jnp.stack([jnp.sort(jax.random.choice(kk, f, (k,), replace=False)) for kk in keys[COPIES:-1]])
    x = jax.random.normal(keys[-1], (1, d), jnp.float16)
    return x, weights, idx.astype(jnp.int32)


def check() -> None:
    """Interpret mode: one program (its own arrivals satisfy every barrier) at small shapes."""
    x, weights, idx = make_inputs(jax.random.key(1), 3, d=64, f=256, k=64)
    ref = reference_chain(x, weights, idx).astype(jnp.float32)
    for prefetch in (False, True):
        got = persistent_chain(x, weights, idx, n_programs=1, block_e=4, prefetch=prefetch, interpret=True)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)))
        print(json.dumps(dict(prefetch=prefetch, max_err=err, scale=float(jnp.max(jnp.abs(ref))))))
        assert err < 2e-2 * float(jnp.max(jnp.abs(ref))), err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--check", action="store_true", help="CPU interpret-mode correctness check only")
    p.add_argument("--phases", type=int, default=8)
    args = p.parse_args()
    if args.check:
        check()
        return
    if args.out is None:
        p.error("--out is required for the GPU run")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from l2_probe import timed_case
    from pallas_kernels.microbench import copy_bandwidth_gbs, write_rows

    args.out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth_gbs()
    sms = getattr(jax.devices()[0], "core_count", 132)
    x, weights, idx = make_inputs(jax.random.key(0), args.phases)
    xs = [x] + [jax.random.normal(kk, (1, D), jnp.float16) for kk in jax.random.split(jax.random.key(5), 3)]
    layers = [(tuple(weights), idx)]
    n = args.phases
    floor_us = K * D * 2 / bw / 1e3  # one phase's weight rows
    ref = jax.jit(launch_chain)(x, weights, idx)
    label = f"{n} phases, K {K} of {F} rows x D {D}"
    rows = []

    def per_phase(row):  # timed_case printed the row per call of n phases; the table keeps times per
        # phase (its `kernels` column stays per call)
        for key in ("time_us", "kernel_us", "wall_us"):
            if key in row:
                row[key] = round(row[key] / n, 2)
        return row

    rows.append(per_phase(timed_case(label, "launches (gathered_up)",
                                     lambda: lambda x, layer: launch_chain(x, list(layer[0]), layer[1]), xs, layers,
                                     ref, floor_us)))
    for per_sm, block_e, warps, stages, prefetch in CONFIGS:
        programs = per_sm * sms
        cfg = dict(n_programs=programs, block_e=block_e, prefetch=prefetch, num_warps=warps, num_stages=stages)
        rows.append(per_phase(timed_case(
            label, f"persistent P={programs} BE={block_e} warps={warps} stages={stages}"
            + (", prefetch" if prefetch else ""),
            lambda cfg=cfg: lambda x, layer: persistent_chain(x, layer[0], layer[1], **cfg),
            xs, layers, ref, floor_us)))
    rows.append(per_phase(timed_case(
        f"{n} phases, no rows (max_err: not a result)", f"barriers only P={sms}",
        lambda: lambda x, layer: persistent_chain(x, layer[0], layer[1], n_programs=sms, work=False), xs, layers,
        ref, 0.0)))
    device = jax.devices()[0].device_kind
    write_rows(args.out, "barrier", f"Grid barriers in one persistent kernel vs one launch per phase, {device}, "
               f"copy {bw:.0f} GB/s, per phase", ["flags", "case", "time_us", "kernel_us", "floor_us", "max_err",
                                                   "error", "kernels"], rows, device=device, jax=jax.__version__,
               sms=sms, phases=n)


if __name__ == "__main__":
    main()

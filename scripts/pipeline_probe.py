"""Probe: do the gathered MLP kernels hide each other's ramp and tail when the neurons are split? GPU only.

Each gathered kernel of the sparse step pays ~2.5-3 us over its bytes: its first loads' round trip
and a tail where the last programs finish alone (pallas_kernels/NOTES.md). Under the decode loop's
concurrent CUDA graph, launches without a data edge between them may run at the same time. If the
selected neurons are split into groups, group A's down projection needs only group A's up
projection, so it can start while group B's up projection still runs, and its ramp overlaps B's
work (and B's down kernel overlaps A's tail). Same bytes, more launches: this measures whether the
overlap pays, at OPT-6.7B MLP shapes (D 4096, F 16384, density 0.25, fp16), as a chain of MLP
layers (up -> down -> residual + the partial sums) over 4 weight copies in rotation (past L2):

* "one group": the production kernels, one up and one down launch;
* "G groups by F": the selection split into G runs of entries (sizes given), each group its own
  up and down launch, all partial sums added in one XLA fusion;
* "2 groups, B after A": as above with group B's up launch fed group A's output as an operand it
  does not read (a graph edge), so the order is up A -> {down A, up B} -> down B.

python scripts/pipeline_probe.py --out DIR   (one subprocess per XLA flag set)
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

FLAG_SETS = {
    "concurrent": "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT",
    "chained": "",  # XLA's default scheduling mode
}
D, F, DENSITY = 4096, 16384, 0.25
# Group sizes as fractions of the selection; "dep" orders group B's up launch after group A's.
CASES = {
    "one group": ((1.0,), False),
    "2 groups 1/2 + 1/2": ((0.5, 0.5), False),
    "2 groups 1/4 + 3/4": ((0.25, 0.75), False),
    "2 groups 3/4 + 1/4": ((0.75, 0.25), False),
    "3 groups 1/3 each": ((1 / 3, 1 / 3, 1 / 3), False),
    "4 groups 1/4 each": ((0.25,) * 4, False),
    "2 groups 1/2 + 1/2, B after A": ((0.5, 0.5), True),
    "2 groups 1/4 + 3/4, B after A": ((0.25, 0.75), True),
}


def up_after(x, w_up, idx, b_up, dep, interpret=False):
    """gathered_up (ReLU, bias) whose launch has `dep` as one more operand, never read: the CUDA
    graph then starts it only after dep's producer has finished."""
    import jax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    from pallas_kernels import gather_mlp as gm
    from pallas_kernels._common import cdiv, pow2_ceil

    n = idx.shape[0]
    blocks = gm.default_up_blocks(n, D, 1, 1)
    body = functools.partial(gm._up_kernel, n_entries=n, rows_per_idx=1, n_parts=1, d_model=D, batch=1,
                             activation="relu", has_bias=True, norm_kind=None, norm_eps=0.0, has_norm_bias=False,
                             block_e=blocks.block_e, block_d=min(blocks.block_d, pow2_ceil(D)))

    def kernel(x_ref, idx_ref, w_ref, dep_ref, b_ref, o_ref):
        del dep_ref
        body(x_ref, idx_ref, w_ref, b_ref, o_ref)

    return pl.pallas_call(kernel, grid=(cdiv(n, blocks.block_e),), out_shape=jax.ShapeDtypeStruct((1, n), x.dtype),
                          compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps),
                          interpret=interpret, name="gather_rows_matvec_after")(x, idx, w_up, dep, b_up)


def run_one(name: str) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import gather_mlp as gm
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from l2_probe import timed_case  # timed over a chain with a data edge (ordered under CONCURRENT too)
    from pallas_kernels.microbench import copy_bandwidth_gbs

    interpret = jax.default_backend() == "cpu"  # a smoke run of the cases here; times mean nothing
    bw = copy_bandwidth_gbs()
    keys = jax.random.split(jax.random.key(0), 16)
    k = int(F * DENSITY)
    # As the step selects (per-block top-K): 32 of every 128 rows, sorted within the block.
    idx = jnp.sort(jnp.concatenate([b * 128 + jax.random.choice(kk, 128, (32,), replace=False)
                                    for b, kk in enumerate(jax.random.split(keys[13], F // 128))])).astype(jnp.int32)
    assert idx.shape == (k,)
    layers = [(jax.random.normal(keys[2 * i], (F, D), jnp.float16) * D ** -0.5,
               jax.random.normal(keys[2 * i + 1], (F, D), jnp.float16) * F ** -0.5,
               jnp.full((F,), 0.01, jnp.float16)) for i in range(4)]  # 4 x 268 MB: past L2
    xs = [jax.random.normal(kk, (1, D), jnp.float16) for kk in keys[8:12]]
    floor_us = 2 * k * D * 2 / bw / 1e3

    def make(fractions, dep):
        cuts = [0]
        for f in fractions:
            cuts.append(min(k, cuts[-1] + int(round(f * k))))
        cuts[-1] = k
        groups = [idx[a:b] for a, b in zip(cuts[:-1], cuts[1:])]

        def layer_fn(x, layer):
            w_up, w_down, b = layer
            total = x.astype(jnp.float32)
            prev = None
            for g in groups:
                if dep and prev is not None:
                    a = up_after(x, w_up, g, b, prev, interpret)
                else:
                    a = gm.gathered_up(x, w_up[:, None, :], g, b[:, None], interpret=interpret)
                prev = a
                total = total + gm.gathered_down(a, w_down, g, interpret=interpret).astype(jnp.float32)
            return total.astype(x.dtype)
        return layer_fn

    ref = jax.jit(make((1.0,), False))(xs[0], layers[0]).astype(jnp.float32)
    return [timed_case(name, label, functools.partial(make, fractions, dep), xs, layers, ref, floor_us)
            for label, (fractions, dep) in CASES.items()]


def main() -> None:
    from pallas_kernels.microbench import flag_set_probe_main
    flag_set_probe_main(__file__, __doc__, FLAG_SETS, run_one, "pipeline",
                        f"Split-neuron MLP pipeline probe, OPT-6.7B MLP at density {DENSITY}",
                        ["flags", "case", "time_us", "wall_us", "kernel_us", "floor_us", "max_err", "error", "kernels"])


if __name__ == "__main__":
    main()

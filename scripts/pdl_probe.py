"""Probe: does programmatic dependent launch (PDL) hide the gathered kernels' ramp and tail? GPU only.

Each kernel of the sparse decode step pays ~2.5-3 us over its bytes (pallas_kernels/NOTES.md): the
launch, the first loads' round trip, and a tail where the last programs finish alone. On Hopper a
kernel launched with PDL may start while its predecessor still runs; `griddepcontrol.wait` then
blocks until the predecessor has finished and its writes are visible. The gathered kernels' weight
rows do not depend on the predecessor (the selected indices come from the predictor, launches
earlier), only their activation input does. So a kernel could issue its weight loads *before* the
wait, inside the predecessor's tail, and read the activations after it.

That needs XLA to launch the Pallas (Triton custom-call) kernels with the PDL attribute (jax 0.11's
XLA does by default, `--xla_gpu_enable_pdl`; its own fusions wait at their start). This probe
measures what it is worth at OPT-6.7B MLP shapes (D 4096, F 16384, density 0.25, fp16): a chain of
MLP layers (up -> down -> XLA's partial-sum + residual), 4 weight copies in rotation (past L2), with
the production kernels and with probe copies of them by where the `griddepcontrol.wait` goes and
whether `griddepcontrol.launch_dependents` lets the next kernel start early (MODES, see `build`),
one process per XLA flag set: the span per layer from profiler events, and each result against the
production kernels' (the same sums).

python scripts/pdl_probe.py --out DIR            (every flag set, one subprocess each)
python scripts/pdl_probe.py --out DIR --one NAME (one flag set, in this process)
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

FLAG_SETS = {
    "concurrent": "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT",
    "concurrent+pdl": "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT --xla_gpu_enable_pdl=true",
    "concurrent-pdl": "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT --xla_gpu_enable_pdl=false",
    "no-graphs+pdl": "--xla_gpu_enable_command_buffer= --xla_gpu_enable_pdl=true",
    "no-graphs-pdl": "--xla_gpu_enable_command_buffer= --xla_gpu_enable_pdl=false",
}
D, F, DENSITY = 4096, 16384, 0.25
# Where the probe kernels wait: "none": no PDL instruction; "wait" / "wait+launch": after the weight
# loads are issued (then the signal), before the activation loads; "wait-first" / "launch-first": at
# the start (wait then signal / signal then wait); "idx-wait": after the index loads; "prefetch-wait":
# after an L2 prefetch of the weight rows (no registers held), the rows then loaded after the wait.
MODES = ("none", "wait", "wait+launch", "wait-first", "launch-first", "idx-wait", "prefetch-wait")


_gdc_p = None


def _gdc(op: str):
    """One `griddepcontrol.<op>` instruction in a Pallas (Triton) kernel, returning an int32 0 that the
    kernel adds into the indices of the loads that must come after it (a data edge; the instruction
    is not pure, so it also stays in program order). Interpret mode: a plain 0. JAX internals (the
    Triton lowering's inline-asm op): checked on jax 0.10 (lowering) and 0.11.2 (GPU)."""
    global _gdc_p
    import jax.numpy as jnp
    from jax._src import core as jax_core

    if _gdc_p is None:
        from jax._src.lib.mlir import ir
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as triton_lowering

        _gdc_p = jax_core.Primitive("grid_dependency_control")
        _gdc_p.def_abstract_eval(lambda *, asm: jax_core.ShapedArray((), jnp.int32))
        _gdc_p.def_impl(lambda *, asm: jnp.int32(0))

        @triton_lowering.register_lowering(_gdc_p)
        def _lower(ctx, *, asm):
            del ctx
            out = tt_dialect.elementwise_inline_asm([ir.IntegerType.get_signless(32)], asm, constraints="=r",
                                                    pure=False, packed_element=1, args=[])
            return out[0] if isinstance(out, (list, tuple)) else out

    asm = {"wait": "griddepcontrol.wait; mov.u32 $0, 0;",
           "launch": "griddepcontrol.launch_dependents; mov.u32 $0, 0;"}[op]
    return _gdc_p.bind(asm=asm)


def build(mode: str):
    """(up, down) probe kernels in a PDL mode: up(x [1, D], w [F, D], idx [K], b [F]) -> relu [1, K];
    down(a [1, K], w [F, D], idx [K]) -> fp32 partial sums [S, 1, D]. Tiles as the production
    defaults at this shape (up: one row per program; down: [32, 512] tiles, 2 steps per split)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def after_wait():  # the PDL instructions of this mode; their token orders the loads after them
        if mode == "none":
            return 0
        if mode == "launch-first":
            return _gdc("launch") + _gdc("wait")
        tok = _gdc("wait")
        return tok if mode == "wait" else tok + _gdc("launch")

    early = mode in ("wait-first", "launch-first")
    tag = mode.replace("-", "_").replace("+", "_")  # kernel names in the profile

    def prefetch(w_ref, rows, cols0, width):  # rows [R]; one line (64 fp16) per lane
        from l2_probe import l2_prefetch
        lines = cols0 + jnp.arange(width // 64, dtype=jnp.int32) * 64
        return jnp.max(l2_prefetch(w_ref.at[rows[:, None], lines[None, :]]))

    def up_kernel(x_ref, idx_ref, w_ref, b_ref, o_ref, *, n):
        tok = after_wait() if early else 0
        e = pl.program_id(0) + tok + jnp.arange(1, dtype=jnp.int32)
        e_ok = e < n
        row = plgpu.load(idx_ref.at[e], mask=e_ok, other=0)
        cols = jnp.arange(D, dtype=jnp.int32)
        if mode == "idx-wait":
            row = row + after_wait()
        if mode == "prefetch-wait":
            row = row + prefetch(w_ref, row, 0, D) + after_wait()
        w = plgpu.load(w_ref.at[row[:, None], cols[None, :]], mask=e_ok[:, None], other=0.0)  # [1, D]
        bias = plgpu.load(b_ref.at[row], mask=e_ok, other=0.0).astype(jnp.float32)
        if mode in ("wait", "wait+launch"):
            tok = after_wait()
        # (tokens scaled so that Triton still sees aligned contiguous indices)
        x = plgpu.load(x_ref.at[jnp.zeros_like(cols), cols + tok * D]).astype(jnp.float32)
        h = jnp.sum(w.astype(jnp.float32) * x[None, :], axis=1) + bias
        plgpu.store(o_ref.at[jnp.zeros_like(e), e], jnp.maximum(h, 0.0).astype(o_ref.dtype), mask=e_ok)

    def down_kernel(a_ref, idx_ref, w_ref, o_ref, *, n, block_e, block_d, steps):
        tok = after_wait() if early else 0
        cols = pl.program_id(0) * block_d + jnp.arange(block_d, dtype=jnp.int32)
        first = (pl.program_id(1) + tok) * steps * block_e
        es = [first + t * block_e + jnp.arange(block_e, dtype=jnp.int32) for t in range(steps)]
        rows = [plgpu.load(idx_ref.at[e], mask=e < n, other=0) for e in es]
        if mode == "idx-wait":
            tok = after_wait()
            rows = [r + tok for r in rows]
        if mode == "prefetch-wait":
            pre = sum(prefetch(w_ref, r, pl.program_id(0) * block_d, block_d) for r in rows)
            tok = after_wait() + pre
            rows = [r + tok for r in rows]
        ws = [plgpu.load(w_ref.at[r[:, None], cols[None, :]], mask=(e < n)[:, None], other=0.0)
              for e, r in zip(es, rows)]  # every weight tile in flight before the wait
        if mode in ("wait", "wait+launch"):
            tok = after_wait()
        acc = jnp.zeros((block_d,), jnp.float32)
        for e, w in zip(es, ws):
            a = plgpu.load(a_ref.at[jnp.zeros_like(e), e + tok * block_e], mask=e < n, other=0.0)
            a = a.astype(jnp.float32)
            acc = acc + jnp.sum(a[:, None] * w.astype(jnp.float32), axis=0)
        plgpu.store(o_ref.at[pl.program_id(1) + jnp.zeros_like(cols), jnp.zeros_like(cols), cols], acc)

    @jax.jit
    def up(x, w, idx, b):
        n = idx.shape[0]
        return pl.pallas_call(functools.partial(up_kernel, n=n), grid=(n,),
                              out_shape=jax.ShapeDtypeStruct((1, n), x.dtype),
                              compiler_params=plgpu.CompilerParams(num_warps=4), name=f"probe_up_{tag}")(x, idx, w, b)

    @jax.jit
    def down(a, w, idx):
        n = idx.shape[0]
        block_e, block_d, steps = 32, 512, 2
        splits = -(-n // (block_e * steps))
        return pl.pallas_call(functools.partial(down_kernel, n=n, block_e=block_e, block_d=block_d, steps=steps),
                              grid=(D // block_d, splits),
                              out_shape=jax.ShapeDtypeStruct((splits, 1, D), jnp.float32),
                              compiler_params=plgpu.CompilerParams(num_warps=4),
                              name=f"probe_down_{tag}")(a, idx, w)

    return up, down


def run_one(name: str) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import gather_mlp as gm
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from l2_probe import timed_case  # timed over a chain with a data edge (ordered under CONCURRENT too)
    from pallas_kernels.microbench import copy_bandwidth_gbs

    bw = copy_bandwidth_gbs()
    keys = jax.random.split(jax.random.key(0), 16)
    k = int(F * DENSITY)
    idx = jnp.sort(jax.random.choice(keys[13], F, (k,), replace=False)).astype(jnp.int32)
    layers = [(jax.random.normal(keys[2 * i], (F, D), jnp.float16) * D ** -0.5,
               jax.random.normal(keys[2 * i + 1], (F, D), jnp.float16) * F ** -0.5,
               jnp.full((F,), 0.01, jnp.float16)) for i in range(4)]  # 4 x 268 MB: past L2
    xs = [jax.random.normal(kk, (1, D), jnp.float16) for kk in keys[8:12]]
    floor_us = 2 * k * D * 2 / bw / 1e3

    def production(x, layer):
        w_up, w_down, b = layer
        a = gm.gathered_up(x, w_up[:, None, :], idx, b[:, None])
        return (x.astype(jnp.float32) + gm.gathered_down(a, w_down, idx).astype(jnp.float32)).astype(x.dtype)

    def probe(mode):
        up, down = build(mode)

        def layer_fn(x, layer):
            w_up, w_down, b = layer
            parts = down(up(x, w_up, idx, b), w_down, idx)
            return (x.astype(jnp.float32) + parts.sum(0)).astype(x.dtype)
        return layer_fn

    ref = jax.jit(production)(xs[0], layers[0])
    # (Runs 2 and 3 also had the production kernels with the PDL entry of commit 39644ac, since reverted.)
    cases = [("production kernels", lambda: production)]
    return [timed_case(name, label, make_fn, xs, layers, ref, floor_us)
            for label, make_fn in cases + [(f"probe, {m}", functools.partial(probe, m)) for m in MODES]]


def main() -> None:
    from pallas_kernels.microbench import flag_set_probe_main
    flag_set_probe_main(__file__, __doc__, FLAG_SETS, run_one, "pdl",
                        f"PDL probe, OPT-6.7B MLP at density {DENSITY} (up + down + XLA sum)",
                        ["flags", "case", "time_us", "kernel_us", "floor_us", "max_err", "error", "kernels"], 400)


if __name__ == "__main__":
    main()

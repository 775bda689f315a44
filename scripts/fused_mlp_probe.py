"""Probe: the gathered MLP as one persistent kernel that streams W1 and W2^T rows together. GPU only.

Measured on the H100 in session 20 (results/fused-mlp-probe-h100/README.md): a tie with the separate
kernels at densities 0.1 and 0.25 and a loss at 1.0, so the kernel lives here, not in pallas_kernels.

The sparse step's MLP is two gathered kernels (up, then down with split-K fp32 partials) and an XLA
reduction that adds the partials to the residual. Each kernel pays ~3 us over its bytes (its first
round trips and its tail; pallas_kernels/NOTES.md). Session 5 measured one kernel for the whole MLP
and lost: each of its ~128 programs streamed its W1 rows, reduced, then streamed its W2^T rows, so
half the time only one matrix was in flight per SM, and its [P, D] fp32 partials cost traffic.

This variant differs in the one thing that made that version slow: a neuron's down row does not
depend on its activation, only the multiply does. So every loop step loads a block of BE neurons'
W1 rows *and* their W2^T rows at once (one full-width [BE, D] tile of each), computes the BE
activations from the first and adds the second, scaled, into the program's [D] fp32 accumulator.
The grid is persistent (P programs, P ~ 1-2 per SM, each owning neuron blocks p, p + P, ...), so
Triton's software pipeline keeps the next steps' loads of both matrices in flight; the partials
are [P, D] fp32 (2-4 MB, written to and read from L2) and the XLA reduction that adds them to the
residual takes the place of the one the split-K down kernel needs anyway. At density 1.0 the same
kernel is a candidate for the dense step's MLP (XLA's up GEMM, split-K down GEMM and reduction).

Cases at OPT-6.7B MLP shapes (D 4096, F 16384, fp16, per-block top-K selection as the step makes
it: round(128 * density) of every 128 rows, sorted), a chain of MLP layers over 4 weight copies in
rotation (past L2), each layer y = x + MLP(x) (up bias and ReLU, no down bias):

* "separate": the production kernels (gathered_up with bias + ReLU, gathered_down with partials);
* "xla dense" (density 1.0 only): the dense step's einsums;
* "persistent P=.., BE=.., warps=.., stages=..": the kernel below.

python scripts/fused_mlp_probe.py --out DIR            (GPU: DIR/fused_mlp.{json,md})
python scripts/fused_mlp_probe.py --out DIR --check    (CPU, interpret mode: the kernel against
                                                        the reference at small odd shapes)
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
from pallas_kernels._common import cdiv, check_pow2, full_index, pow2_ceil  # noqa: E402

D, F = 4096, 16384
DENSITIES = (0.1, 0.25, 0.5, 1.0)
# (programs, neurons per step, warps, stages); stages None = Triton's default.
CONFIGS = (
    (132, 2, 4, None), (132, 4, 8, None), (264, 1, 4, None), (264, 2, 4, None), (264, 2, 8, None),
    (132, 2, 4, 4), (264, 2, 4, 3), (528, 1, 4, None),
)


def _mlp_kernel(x_ref, idx_ref, wu_ref, bu_ref, wd_ref, o_ref, *, n_entries, d_model, block_e, n_programs,
                n_steps, block_d):
    # x_ref [1, D]; idx_ref [K]; wu_ref, wd_ref [F, D]; bu_ref [F]; o_ref [P, Dp] fp32: program p's sums.
    # (Session 20 measured this kernel as pallas_kernels.gather_mlp.gathered_mlp, `git show 99a45f5`,
    # which also had batch > 1 and SwiGLU; at batch 1 with ReLU it is this code.)
    p = pl.program_id(0)
    chunks = []  # static column chunks: a whole row per step, in pieces of <= block_d
    for d0 in range(0, d_model, block_d):
        cols = d0 + jnp.arange(block_d, dtype=jnp.int32)
        chunks.append((cols, cols < d_model if d0 + block_d > d_model else None))
    xs = [gm._load_cols(x_ref.at[full_index(cols, 0), cols], c_ok).astype(jnp.float32) for cols, c_ok in chunks]

    def step(j, acc):
        e = (p + j * n_programs) * block_e + jnp.arange(block_e, dtype=jnp.int32)  # [BE]
        e_ok = e < n_entries
        row = plgpu.load(idx_ref.at[e], mask=e_ok, other=0)

        def tile(ref, cols, c_ok):
            ok = e_ok[:, None] if c_ok is None else e_ok[:, None] & c_ok[None, :]
            return plgpu.load(ref.at[row[:, None], cols[None, :]], mask=ok, other=0.0)

        # Both matrices' rows are requested before anything waits on either.
        w1 = [tile(wu_ref, cols, c_ok) for cols, c_ok in chunks]
        w2 = [tile(wd_ref, cols, c_ok) for cols, c_ok in chunks]
        bias = plgpu.load(bu_ref.at[row], mask=e_ok, other=0.0).astype(jnp.float32)
        h = sum(jnp.sum(w.astype(jnp.float32) * x[None, :], axis=1) for w, x in zip(w1, xs)) + bias  # [BE]
        # Rounded to the activations' dtype, as the separate kernels' [1, K] intermediate is.
        a = jnp.where(e_ok, jnp.maximum(h, 0.0), 0.0).astype(x_ref.dtype).astype(jnp.float32)
        return tuple(s + jnp.sum(a[:, None] * w.astype(jnp.float32), axis=0) for s, w in zip(acc, w2))

    acc = jax.lax.fori_loop(0, n_steps, step, tuple(jnp.zeros((block_d,), jnp.float32) for _ in chunks))
    for (cols, _), s in zip(chunks, acc):
        plgpu.store(o_ref.at[full_index(cols, p), cols], s)


@functools.partial(jax.jit, static_argnames=("n_programs", "block_e", "num_warps", "num_stages", "interpret"))
def gathered_mlp(x, w_up, b_up, w_down, idx, *, n_programs, block_e, num_warps=4, num_stages=None, interpret=False):
    """y [1, D] = gathered_down(gathered_up(x, ...), ...) with ReLU and the up bias, in one launch plus
    XLA's sum of the [P, D] fp32 partials. x [1, D]; w_up, w_down [F, D]; b_up [F]; idx [K]."""
    assert x.shape[0] == 1, "batch 1 only"
    d_model, n_entries = x.shape[1], idx.shape[0]
    check_pow2(block_e=block_e)
    block_d = min(pow2_ceil(d_model), 4096)
    n_blocks = cdiv(n_entries, block_e)
    n_programs = min(n_programs, n_blocks)
    kernel = functools.partial(_mlp_kernel, n_entries=n_entries, d_model=d_model, block_e=block_e,
                               n_programs=n_programs, n_steps=cdiv(n_blocks, n_programs), block_d=block_d)
    out = pl.pallas_call(
        kernel, grid=(n_programs,),
        out_shape=jax.ShapeDtypeStruct((n_programs, cdiv(d_model, block_d) * block_d), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="gathered_mlp")(x, idx.astype(jnp.int32), w_up, b_up, w_down)
    return out.sum(axis=0)[None, :d_model].astype(x.dtype)


def separate_layer(x, layer, interpret=False):
    w_up, b_up, w_down, idx = layer
    a = gm.gathered_up(x, w_up[:, None, :], idx, b_up[:, None], interpret=interpret)
    return (x.astype(jnp.float32) + gm.gathered_down(a, w_down, idx, interpret=interpret).astype(jnp.float32)
            ).astype(x.dtype)


def xla_dense_layer(x, layer):
    """The dense step's MLP as XLA runs it (every neuron; idx unused)."""
    w_up, b_up, w_down, _ = layer
    a = jax.nn.relu(jnp.einsum("bd,fd->bf", x, w_up) + b_up)
    return x + jnp.einsum("bf,fd->bd", a, w_down)


def persistent_layer(x, layer, *, interpret=False, **cfg):
    w_up, b_up, w_down, idx = layer
    y = gathered_mlp(x, w_up, b_up, w_down, idx, interpret=interpret, **cfg)
    # The partials' sum (inside gathered_mlp) and the residual add are one XLA fusion.
    return (x.astype(jnp.float32) + y.astype(jnp.float32)).astype(x.dtype)


def block_topk_idx(key, f: int, density: float, block: int = 128):
    per = max(int(round(block * density)), 1)
    keys = jax.random.split(key, cdiv(f, block))
    parts = [b * block + jax.random.choice(k, min(block, f - b * block), (min(per, f - b * block),), replace=False)
             for b, k in enumerate(keys)]
    return jnp.sort(jnp.concatenate(parts)).astype(jnp.int32)


def make_layers(key, d: int, f: int, density: float, n: int):
    layers = []
    for i in range(n):
        k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, i), 4)
        layers.append(((jax.random.normal(k1, (f, d), jnp.float32) * d ** -0.5).astype(jnp.float16),
                       (jax.random.normal(k2, (f,), jnp.float32) * 0.1).astype(jnp.float16),
                       (jax.random.normal(k3, (f, d), jnp.float32) * f ** -0.5).astype(jnp.float16),
                       block_topk_idx(k4, f, density)))
    return layers


def check() -> None:
    """Interpret mode on the CPU: the persistent kernel against the separate kernels' reference."""
    key = jax.random.key(1)
    for d, f, density, cfg in ((300, 1000, 0.25, dict(n_programs=7, block_e=2)),
                               (256, 512, 0.1, dict(n_programs=3, block_e=4)),
                               (130, 384, 0.5, dict(n_programs=64, block_e=1))):
        (w_up, b_up, w_down, idx), = make_layers(key, d, f, density, 1)
        x = jax.random.normal(jax.random.fold_in(key, 9), (1, d), jnp.float16)
        ref = gm.gathered_down_reference(gm.gathered_up_reference(x, w_up[:, None, :], idx, b_up[:, None]), w_down,
                                         idx).astype(jnp.float32)
        got = gathered_mlp(x, w_up, b_up, w_down, idx, interpret=True, **cfg).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - ref)))
        print(json.dumps(dict(d=d, f=f, density=density, **cfg, max_err=err)))
        assert err < 2e-3, err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--check", action="store_true", help="CPU interpret-mode correctness check only")
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    args = p.parse_args()
    if args.check:
        check()
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from l2_probe import timed_case
    from pallas_kernels.microbench import copy_bandwidth_gbs, write_rows

    args.out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth_gbs()
    rows = []
    for density in args.densities:
        layers = make_layers(jax.random.key(0), D, F, density, 4)  # 4 x 268 MB: past L2
        xs = [jax.random.normal(k, (1, D), jnp.float16) for k in jax.random.split(jax.random.key(5), 4)]
        k = layers[0][3].shape[0]
        floor_us = 2 * k * D * 2 / bw / 1e3
        ref = jax.jit(separate_layer)(xs[0], layers[0])
        label = f"density {density} (K {k})"
        rows.append(timed_case(label, "separate", lambda: separate_layer, xs, layers, ref, floor_us))
        if k == F:
            rows.append(timed_case(label, "xla dense", lambda: xla_dense_layer, xs, layers, ref, floor_us))
        for n_programs, block_e, warps, stages in CONFIGS:
            cfg = dict(n_programs=n_programs, block_e=block_e, num_warps=warps, num_stages=stages)
            rows.append(timed_case(label, f"persistent P={n_programs} BE={block_e} warps={warps} stages={stages}",
                                   lambda cfg=cfg: functools.partial(persistent_layer, **cfg), xs, layers, ref,
                                   floor_us))
        del layers
    device = jax.devices()[0].device_kind
    write_rows(args.out, "fused_mlp", f"Persistent one-kernel gathered MLP vs the separate kernels, OPT-6.7B MLP, "
               f"{device}, copy {bw:.0f} GB/s", ["flags", "case", "time_us", "kernel_us", "floor_us", "max_err",
                                                  "error", "kernels"], rows, device=device, jax=jax.__version__)


if __name__ == "__main__":
    main()

"""Probe: would pulling the next kernel's selected weight rows into L2 ahead of time pay? GPU only.

The sparse decode step (OPT-6.7B, H200) takes ~68 us per layer for ~37 us of bytes: between the
bandwidth-bound gathered kernels run ~10 small launches during which HBM is nearly idle. The
up-projection's rows are known a layer ahead (lookahead predictor), so a side kernel could read them
into L2 while the small launches run, and the up kernel would then read from L2. This measures the
three things that idea needs, at OPT-6.7B MLP shapes (D 4096, F 16384, fp16):

1. up / down kernel from HBM (4 weight copies in rotation, past L2) against from L2 (one copy);
2. `gather_mlp.prefetch_rows` by mode (loads into registers; one PTX L2 prefetch per 128-byte
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

from pallas_kernels import gather_mlp as gm
from pallas_kernels.microbench import _time_calls, copy_bandwidth_gbs

D, F = 4096, 16384


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
        down = lambda x, w: gm.gathered_down(x[:, :k] if k <= D else jnp.tile(x, (1, k // D + 1))[:, :k], w, idx)
        for name, fn in (("up", up), ("down", down)):
            record(dict(density=density, case=f"{name} from HBM (4 copies)"), time_per_application(fn, xs, copies,
                                                                                                   args.trials), nbytes)
            record(dict(density=density, case=f"{name} from L2 (1 copy)"), time_per_application(fn, xs, copies[:1],
                                                                                                args.trials), nbytes)
        for mode, block_e in (("load", 4), ("line", 8), ("line", 32), ("bulk", 32), ("bulk", 128)):
            pre = functools.partial(gm.prefetch_rows, idx=idx, mode=mode, block_e=block_e)
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
        pre = functools.partial(gm.prefetch_rows, idx=head, mode="line")

        def pre_dense(x, w):
            s = pre(w[:, None, :], after=x)
            return dense_up(x + (s[0] * 0).astype(x.dtype), w)
        record(dict(density=1.0, case=f"prefetch first {frac} of rows, then dense up einsum"),
               time_per_application(pre_dense, xs, copies, args.trials), F * D * 2)

    device = jax.devices()[0].device_kind
    (args.out / "l2.json").write_text(json.dumps(dict(device=device, copy_gbs=bw, rows=rows), indent=1))
    cols = ["density", "case", "time_us", "kernel_us", "floor_us", "kernels"]
    lines = [f"# L2 prefetch probe, OPT-6.7B MLP (D {D}, F {F}, fp16), {device}, copy {bw:.0f} GB/s", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    (args.out / "l2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

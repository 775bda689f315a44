"""Time select_topk at OPT MLP and head widths on the GPU, per warp count, against lax.top_k + sort;
and code_topk (scores from the predictor code + per-block top-K, one kernel) against the XLA score
matvec followed by select_topk, the decode step's path without it.

Kernel time per selection comes from profiler events (pallas_kernels.microbench._device_events): a
jitted call runs `reps` independent selections; the median over calls of the summed select_topk
kernel durations is divided by reps. k = N is the fixed cost (load, bracket, compaction: the search
exits at once). Usage: python3 scripts/topk_probe.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import select_topk as st
from pallas_kernels.microbench import _device_events


def kernel_us(fn, args, reps: int, name: str) -> float:
    calls = _device_events(fn, args, 5)
    per_call = [sum(d for n, _, d in c if name in n) / 1e3 / reps for c in calls]
    return statistics.median(per_call) if per_call else float("nan")


def code_topk_rows_timed(rng, reps: int) -> list[dict]:
    """us per selection: code_topk (one kernel; per block count and warp count) vs einsum + select_topk
    (one top-K) at OPT-6.7B shapes."""
    rows = []
    for n, k, block_counts in [(16384, 4096, (64, 128, 256)), (16384, 1638, (128,)), (32, 16, (1,))]:
        z = jnp.asarray(rng.standard_normal((reps, 128)).astype(np.float32))
        w = jnp.asarray(rng.standard_normal((n, 128)).astype(np.float16))
        two = jax.jit(lambda z, w: [st.topk_rows(jnp.einsum("r,nr->n", z[i].astype(w.dtype), w,
                                                            preferred_element_type=jnp.float32)[None], k)
                                    for i in range(reps)])
        runs = [(dict(impl="einsum + select_topk (one top-K)", blocks=1), two)]
        for blocks in block_counts:
            for warps in (4, 8):
                fused = jax.jit(lambda z, w, blocks=blocks, warps=warps: [
                    st.code_topk_rows(z[i], w, k, blocks=blocks, num_warps=warps) for i in range(reps)])
                runs.append((dict(impl="code_topk (scores + per-block top-K)", blocks=blocks, num_warps=warps), fused))
        for label, fn in runs:
            calls = _device_events(fn, (z, w), 5)
            us = statistics.median(sum(d for _, _, d in c) / 1e3 / reps for c in calls) if calls else None
            rows.append(dict(n=n, k=k, **label, us=us and round(us, 2)))
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=32)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    cases = [(16384, 4096), (16384, 16384), (36864, 9216), (32, 16)]
    for (n, k) in cases:
        s = jnp.asarray(rng.standard_normal((args.reps, n)).astype(np.float32))
        ref = np.asarray(jax.jit(lambda s: jax.vmap(lambda r: st.topk_rows_reference(r[None], k)[0])(s))(s))
        for warps in ((None,) if n <= 64 else (4, 8, 16, 32)):
            label = dict(n=n, k=k, num_warps=warps)
            try:
                fn = jax.jit(lambda s: [st.topk_rows(s[i][None], k, num_warps=warps)
                                        for i in range(args.reps)])
                got = np.concatenate([np.asarray(x) for x in fn(s)])
                exact = bool(np.array_equal(got, ref))
                us = kernel_us(fn, (s,), args.reps, "select_topk")
                rows.append(dict(label, us=round(us, 2), exact=exact))
            except Exception as e:  # a variant that does not compile is a result too
                rows.append(dict(label, us=None, error=f"{type(e).__name__}: {str(e)[:200]}"))
            print(rows[-1], flush=True)
        xfn = jax.jit(lambda s: [st.topk_rows_reference(s[i][None], k) for i in range(args.reps)])
        calls = _device_events(xfn, (s,), 5)
        xla = statistics.median(sum(d for _, _, d in c) / 1e3 / args.reps for c in calls) if calls else None
        rows.append(dict(n=n, k=k, impl="xla lax.top_k + sort", us=xla and round(xla, 2)))
        print(rows[-1], flush=True)
    rows += code_topk_rows_timed(rng, args.reps)
    (out / "topk_probe.json").write_text(json.dumps(dict(device=str(jax.devices()[0]), rows=rows), indent=1))
    print(f"wrote {out / 'topk_probe.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()

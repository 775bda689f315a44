"""Probe: how close the dense step's matvecs (the four per-layer projections and the LM head) come to
their bytes at OPT-6.7B, in the forms the model writes them, against alternatives. GPU only. The floor
uses `pallas_kernels.microbench.copy_bandwidth_gbs` (a jnp add, read + write), which reads lower than
the bench's cudaMemcpy; read GB/s is the weight bytes over the measured span.

python scripts/matvec_probe.py --out DIR  ->  DIR/matvecs.{json,md}
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels.gather_mlp import default_up_blocks, gather_rows_matvec
from pallas_kernels.microbench import copy_bandwidth_gbs, time_per_application

D, F, H, Dh, V = 4096, 16384, 32, 128, 50272


def cases():
    f32 = jnp.float32
    return {
        # name: (weight shape, input width, apply(x [1, 1, width], w) -> y)
        "lm head einsum bte,ve->btv, astype f32 (model)": (
            (V, D), D, lambda x, w: jnp.einsum("bte,ve->btv", x, w).astype(f32)),
        "lm head einsum, preferred f32": (
            (V, D), D, lambda x, w: jnp.einsum("bte,ve->btv", x, w, preferred_element_type=f32)),
        "lm head w @ x (gemv form)": (
            (V, D), D, lambda x, w: (w @ x[0, 0])[None, None].astype(f32)),
        "lm head pallas row matvec": (
            (V, D), D, lambda x, w: gather_rows_matvec(
                x[0], w, jnp.arange(V, dtype=jnp.int32), rows_per_idx=1, n_parts=1, activation="none",
                blocks=default_up_blocks(V, D, 1, 1), interpret=False)[None].astype(f32)),
        "lm head padded to a multiple of 64 rows": (
            (-(-V // 64) * 64, D), D, lambda x, w: jnp.einsum("bte,ve->btv", x, w)[..., :V].astype(f32)),
        "q proj btd,nhd->btnh": ((H, Dh, D), D, lambda x, w: jnp.einsum("btd,nhd->btnh", x, w)),
        "kv proj btd,ckhd->cbtkh": ((2, H, Dh, D), D, lambda x, w: jnp.einsum("btd,ckhd->cbtkh", x, w)),
        "out proj btnh,nhd->btd": ((H, Dh, D), D, lambda x, w: jnp.einsum("btnh,nhd->btd", x.reshape(1, 1, H, Dh), w)),
        "up btd,fud->btfu": ((F, 1, D), D, lambda x, w: jax.nn.relu(jnp.einsum("btd,fud->btfu", x, w)[..., 0])),
        "down btf,fd->btd": ((F, D), F, lambda x, w: jnp.einsum("btf,fd->btd", x, w)),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--trials", type=int, default=10)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth_gbs()
    rows = []
    for name, (shape, n_in, apply) in cases().items():
        nbytes = 2 * math.prod(shape)
        n_layers = max(1, min(4, (400 << 20) // nbytes + 1))  # weights past L2 between calls
        keys = jax.random.split(jax.random.key(0), n_layers + 4)
        layers = [jax.random.normal(k, shape, jnp.float16) * 0.02 for k in keys[:n_layers]]
        xs = [jax.random.normal(k, (1, 1, n_in), jnp.float16) for k in keys[n_layers:]]
        t = time_per_application(apply, xs, layers, args.trials)
        floor = nbytes / bw / 1e3
        row = dict(case=name, floor_us=round(floor, 2), time_us=round(t["time_us"], 2),
                   kernel_us=round(t.get("kernel_us", float("nan")), 2), x_floor=round(t["time_us"] / floor, 3),
                   read_gbs=round(nbytes / t["time_us"] / 1e3, 1),
                   kernels=t.get("kernels"))
        print(json.dumps(row), flush=True)
        rows.append(row)
    (args.out / "matvecs.json").write_text(json.dumps(dict(device=jax.devices()[0].device_kind, copy_gbs=bw,
                                                         rows=rows), indent=1))
    lines = [f"# Dense matvecs at OPT-6.7B, {jax.devices()[0].device_kind}, copy {bw:.0f} GB/s", "",
             "| case | floor us | span us | kernel us | x floor | read GB/s | kernels |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['floor_us']} | {r['time_us']} | {r['kernel_us']} | {r['x_floor']} | "
              f"{r['read_gbs']} | {r['kernels']} |" for r in rows]
    (args.out / "matvecs.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

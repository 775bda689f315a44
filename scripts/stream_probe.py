"""Probe: how fast a Pallas (Triton) kernel streams weight rows through tensor-core dots at batch-1
decode sizes, by weight layout, tile, D split and load hints. GPU only.

The lazy KV step's window K/V kernel (x [16, D] window rows times [R, D] selected head rows) reads
its bytes at ~2.5 TB/s on the H200 whatever its tile (pallas_kernels/NOTES.md, session 8 sweep),
while XLA's dense matvecs reach ~4 TB/s. This times the same product stripped to its loads and
dots, to find which of these sets the rate:
- layout "rows": W [R, D] row-major, each loop step loads a [BN, BD] tile (BN rows, BD*2 bytes
  contiguous each, D*2 bytes apart); "tiled": W stored as [R/BN, D/BD, BN, BD], each step one
  contiguous BN*BD*2-byte block;
- split: S programs share a row block, each over D/S columns, fp32 partials summed by XLA;
- evict_first on the weight loads (streamed once; keeps the x tile in L2).

python scripts/stream_probe.py --out DIR  ->  DIR/stream.{json,md}
"""
from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gather_attention import gathered_window_kv
from pallas_kernels.microbench import copy_bandwidth_gbs, time_per_application, write_rows

D, M = 4096, 16  # OPT-6.7B width; window rows (the tensor-core dot's minimum)


def _stream_kernel(x_ref, w_ref, o_ref, *, block_n, block_d, steps, tiled, evict):
    j, s = pl.program_id(0), pl.program_id(1)
    m = jnp.arange(M, dtype=jnp.int32)
    rows = j * block_n + jnp.arange(block_n, dtype=jnp.int32)

    def step(i, acc):
        k = s * steps + i
        cols = k * block_d + jnp.arange(block_d, dtype=jnp.int32)
        x = plgpu.load(x_ref.at[m[:, None], cols[None, :]])  # [M, BD]
        if tiled:
            w = plgpu.load(w_ref.at[j, k], eviction_policy=evict)  # [BN, BD], one contiguous block
        else:
            w = plgpu.load(w_ref.at[rows[:, None], cols[None, :]], eviction_policy=evict)
        return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((M, block_n), jnp.float32))
    o_ref[s, :, pl.ds(j * block_n, block_n)] = acc


@functools.partial(jax.jit, static_argnames=("block_n", "block_d", "split", "tiled", "evict", "warps", "stages",
                                             "interpret"))
def stream(x, w, *, block_n, block_d, split, tiled, evict, warps, stages, interpret=False):
    """x [M, D] @ w^T, w [R, D] (tiled: [R/BN, D/BD, BN, BD]) -> [M, R] fp32."""
    rows = w.shape[0] * w.shape[2] if tiled else w.shape[0]
    steps = D // block_d // split
    kernel = functools.partial(_stream_kernel, block_n=block_n, block_d=block_d, steps=steps, tiled=tiled,
                               evict=evict)
    parts = pl.pallas_call(
        kernel, grid=(rows // block_n, split),
        out_shape=jax.ShapeDtypeStruct((split, M, rows), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret, name="stream_probe")(x, w)
    return parts.sum(0) if split > 1 else parts[0]


def tile_layout(w, block_n, block_d):
    """[R, D] -> [R/BN, D/BD, BN, BD]."""
    r = w.shape[0]
    return w.reshape(r // block_n, block_n, D // block_d, block_d).transpose(0, 2, 1, 3)


def configs():
    out = []
    for layout in ("rows", "tiled"):
        for bn, bd, split in ((32, 256, 1), (64, 256, 1), (32, 512, 1), (16, 256, 1), (32, 256, 2),
                              (32, 256, 4), (64, 256, 2), (16, 256, 4), (16, 512, 2)):
            out.append(dict(layout=layout, block_n=bn, block_d=bd, split=split, evict=None, warps=4, stages=None))
        for bn, bd, split, stages in ((32, 256, 1, 4), (32, 128, 1, 6), (32, 256, 2, 4)):
            out.append(dict(layout=layout, block_n=bn, block_d=bd, split=split, evict=None, warps=4, stages=stages))
        for bn, bd, split in ((32, 256, 1), (32, 256, 2), (32, 256, 4)):
            out.append(dict(layout=layout, block_n=bn, block_d=bd, split=split, evict="evict_first", warps=4,
                            stages=None))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[4608, 6912],
                   help="weight rows R (6.7B, 18 KV heads: 4608 for K/V, 6912 with Q)")
    p.add_argument("--trials", type=int, default=10)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth_gbs()
    results = []

    def record(row, t, nbytes):
        row.update(time_us=round(t["time_us"], 2), kernel_us=round(t.get("kernel_us", float("nan")), 2),
                   read_gbs=round(nbytes / t["time_us"] / 1e3, 1), floor_us=round(nbytes / bw / 1e3, 2))
        print(json.dumps(row), flush=True)
        results.append(row)

    for rows in args.rows:
        nbytes = 2 * rows * D
        n_layers = max(2, (400 << 20) // nbytes + 1)  # weights past L2 between applications
        keys = jax.random.split(jax.random.key(rows), n_layers + 4)
        layers = [jax.random.normal(k, (rows, D), jnp.float16) * 0.02 for k in keys[:n_layers]]
        xs = [jax.random.normal(k, (M, D), jnp.float16) for k in keys[n_layers:]]
        t = time_per_application(lambda x, w: jnp.einsum("md,rd->mr", x, w, preferred_element_type=jnp.float32),
                                 xs, layers, args.trials)
        record(dict(rows=rows, method="xla einsum"), t, nbytes)
        if rows % 128 == 0 and rows // 256 <= 32:
            heads = jnp.arange(rows // 256, dtype=jnp.int32)  # K and V of rows/256 heads of Dh 128
            kv_layers = [w.reshape(2, rows // 256, 128, D) for w in layers]
            t = time_per_application(lambda x, w: gathered_window_kv(x[None], w, heads), xs, kv_layers, args.trials)
            record(dict(rows=rows, method="gathered_window_kv (default tiles)"), t, nbytes)
        for cfg in configs():
            tiled = cfg["layout"] == "tiled"
            ws = [tile_layout(w, cfg["block_n"], cfg["block_d"]) for w in layers] if tiled else layers
            fn = functools.partial(stream, block_n=cfg["block_n"], block_d=cfg["block_d"], split=cfg["split"],
                                   tiled=tiled, evict=cfg["evict"], warps=cfg["warps"], stages=cfg["stages"])
            ref = jnp.einsum("md,rd->mr", xs[0], layers[0], preferred_element_type=jnp.float32)
            err = float(jnp.max(jnp.abs(fn(xs[0], ws[0]) - ref)))
            try:
                t = time_per_application(fn, xs, ws, args.trials)
            except Exception as e:  # a tile past shared memory
                print(json.dumps(dict(rows=rows, **cfg, error=repr(e)[:160])), flush=True)
                continue
            record(dict(rows=rows, method="stream", **cfg, max_err=round(err, 4)), t, nbytes)
            del ws
    device = jax.devices()[0].device_kind
    cols = ["rows", "method", "layout", "block_n", "block_d", "split", "stages", "evict", "time_us", "kernel_us",
            "floor_us", "read_gbs"]
    write_rows(args.out, "stream", f"Streaming weight rows through tensor-core dots, x [16, {D}], {device}, copy "
               f"{bw:.0f} GB/s", cols, results, device=device, copy_gbs=bw)

if __name__ == "__main__":
    main()

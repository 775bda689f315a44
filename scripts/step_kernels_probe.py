"""Diagnostic: the sparse lazy-KV decode step's attention-input and up-projection kernels, timed alone.

At OPT-6.7B's shapes (D 4096, 32 heads of 128, F 16384, a 16-token window, fp16, biases, LayerNorm,
batch 1, heads 0.5 and MLP 0.25), each over a chain of 32 layers' distinct weights so that the L2
cache never holds the next layer's, it times
  * the attention inputs as the unfused step runs them (XLA norm and ring write, gathered_head_proj,
    gathered_window_kv_update) and as the fused step does (gathered_window_qkv_update), each at a
    sweep of tile shapes;
  * the MLP up projection on the normed input (XLA norm first) and with the norm inside
    (gathered_up's `norm`), at a sweep of rows per program.
Writes one JSON line per measurement (us per layer, read GB/s) to stdout and --out, and a sorted
summary table (markdown) beside it. Needs a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common
from pallas_kernels import gather_attention as ga
from pallas_kernels import gather_mlp as gm

LAYERS = 32  # --layers
D, H, DH, F, W, S = 4096, 32, 128, 16384, 16, 256
K_HEADS, K_MLP, REFRESH = 16, 4096, 2
EPS = 1e-5


def _median_us(fn, carry, reps):
    carry = jax.block_until_ready(fn(*carry))  # compile
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(fn(*carry))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / LAYERS * 1e6


def _layers(key, shape, scale=0.02):
    keys = jax.random.split(key, LAYERS)
    return [(jax.random.normal(k, shape, jnp.float32) * scale).astype(jnp.float16) for k in keys]


def main() -> int:
    global LAYERS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="results/step_kernels_probe/probe.jsonl")
    p.add_argument("--quick", action="store_true", help="the default tiles only")
    p.add_argument("--layers", type=int, default=LAYERS, help="layers in the chain (fewer: a CPU smoke run)")
    args = p.parse_args()
    LAYERS = args.layers
    interpret = _common.on_cpu()  # a smoke run of the code on CPU, through the interpreter
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    out.write_text("")

    def report(**row):  # as it goes: a run cut short keeps what it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    rng = np.random.default_rng(0)
    k0 = jax.random.PRNGKey(0)
    ks = jax.random.split(k0, 8)
    w_q, w_kv = _layers(ks[0], (H, DH, D)), _layers(ks[1], (2, H, DH, D))
    b_q, b_kv = jnp.zeros((H, DH), jnp.float16), jnp.zeros((2, H, DH), jnp.float16)
    scale, bias = jnp.ones((D,), jnp.float16), jnp.zeros((D,), jnp.float16)
    h = jax.random.normal(ks[2], (1, D), jnp.float16)
    q_idx = jnp.asarray(np.sort(rng.choice(H, K_HEADS, replace=False)), jnp.int32)
    refresh = jnp.asarray([6, 7], jnp.int32)
    cur = jnp.int32(5)
    slots = jnp.arange(W, dtype=jnp.int32) + 100
    heads = ga.first_occurrences(jnp.concatenate([q_idx, refresh]), H)
    attn_bytes = (K_HEADS * DH * D + 2 * (K_HEADS + REFRESH) * DH * D) * 2  # Q rows, K and V rows

    def fresh_state():
        wins = [jnp.zeros((1, W, D), jnp.float16) for _ in range(LAYERS)]
        caches = [jnp.zeros((1, H, S, DH), jnp.float16) for _ in range(2 * LAYERS)]
        return wins, caches

    def unfused(wins, caches, w_q, w_kv, *, blocks):
        qs = []
        for l in range(LAYERS):
            x = _common.apply_norm(h, scale, bias, kind="layernorm", eps=EPS)
            win = jax.lax.dynamic_update_slice(wins[l], x[:, None], (0, cur, 0))
            qs.append(ga.gathered_head_proj(x, w_q[l], q_idx, b_q, interpret=interpret))
            k, v = ga.gathered_window_kv_update(win, w_kv[l], heads, slots, caches[2 * l], caches[2 * l + 1],
                                                b_kv, None, interpret=interpret, **blocks)
            wins[l], caches[2 * l], caches[2 * l + 1] = win, k, v
        return wins, caches, sum(q.astype(jnp.float32).sum() for q in qs)

    def fused(wins, caches, w_q, w_kv, *, blocks):
        qs = []
        for l in range(LAYERS):
            q, win, k, v = ga.gathered_window_qkv_update(
                h, scale, bias, wins[l], w_q[l], w_kv[l], q_idx, refresh, cur, slots, caches[2 * l],
                caches[2 * l + 1], b_q, b_kv, None, norm_kind="layernorm", norm_eps=EPS,
                interpret=interpret, **blocks)
            qs.append(q)
            wins[l], caches[2 * l], caches[2 * l + 1] = win, k, v
        return wins, caches, sum(q.astype(jnp.float32).sum() for q in qs)

    default = ga.default_window_kv_blocks(W, K_HEADS + REFRESH, DH, D)
    sweep = [dict(block_m=16, block_n=bn, block_d=bd, num_warps=nw, num_stages=ns)
             for bn, bd, nw, ns in itertools.product((16, 32, 64, 128), (128, 256), (4, 8), (3,))]
    sweep = [dict()] + ([] if args.quick else sweep)
    for name, fn in (("attention inputs, unfused", unfused), ("attention inputs, fused", fused)):
        for blocks in sweep:
            # Weights are arguments, not outputs (an output that is an input can be a copy) and
            # not closed over (GBs of constants).
            chain = jax.jit(lambda wins, caches, wq, wkv, _b=blocks, _f=fn: _f(wins, caches, wq, wkv, blocks=_b)[:2],
                            donate_argnums=(0, 1))
            try:
                us = _median_us(lambda wins, caches, _c=chain: _c(wins, caches, w_q, w_kv), fresh_state(), args.reps)
            except Exception as e:  # a tile the compiler refuses (shared memory, registers)
                report(op=name, blocks=blocks or "default", error=f"{type(e).__name__}: {str(e)[:200]}")
                continue
            report(op=name, blocks=blocks or f"default {default}", us=us, gbs=attn_bytes / us / 1e3)

    w_up = _layers(ks[3], (F, 1, D))
    b_up = jnp.zeros((F, 1), jnp.float16)
    idx = jnp.asarray(np.sort(rng.choice(F, K_MLP, replace=False)), jnp.int32)
    up_bytes = K_MLP * D * 2

    def up(w_up, normed, blocks):
        outs = []
        for l in range(LAYERS):
            if normed:
                outs.append(gm.gathered_up(h, w_up[l], idx, b_up, norm=("layernorm", EPS, scale, bias),
                                            interpret=interpret, **blocks))
            else:
                x = _common.apply_norm(h, scale, bias, kind="layernorm", eps=EPS)
                outs.append(gm.gathered_up(x, w_up[l], idx, b_up, interpret=interpret, **blocks))
        return sum(o.astype(jnp.float32).sum() for o in outs)

    up_sweep = [dict()] + ([] if args.quick else [
        dict(block_e=be, block_d=4096, num_warps=nw) for be, nw in itertools.product((1, 2, 4), (4, 8))])
    for normed in (False, True):
        for blocks in up_sweep:
            fn = jax.jit(lambda w, _n=normed, _b=blocks: up(w, _n, _b))
            try:
                us = _median_us(lambda *_, _f=fn: (_f(w_up),), (), args.reps)
            except Exception as e:
                report(op=f"up, norm {'inside' if normed else 'in XLA'}", blocks=blocks or "default",
                       error=f"{type(e).__name__}: {str(e)[:200]}")
                continue
            report(op=f"up, norm {'inside' if normed else 'in XLA'}", blocks=blocks or "default", us=us,
                   gbs=up_bytes / us / 1e3)

    lines = [f"# Step kernels probe ({jax.devices()[0].device_kind}, jax {jax.__version__})", "",
             f"Per layer, over {LAYERS} layers of distinct weights; fastest 8 of each op.", "",
             "| op | tiles | us/layer | GB/s |", "|---|---|---|---|"]
    for op in dict.fromkeys(r["op"] for r in rows):
        timed = sorted((r for r in rows if r["op"] == op and "us" in r), key=lambda r: r["us"])
        defaults = [r for r in timed if str(r["blocks"]).startswith("default")]
        for r in (defaults + [r for r in timed if r not in defaults])[:9]:
            lines.append(f"| {op} | {r['blocks']} | {r['us']:.1f} | {r['gbs']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

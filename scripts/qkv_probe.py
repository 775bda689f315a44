"""Probe: what would one Q/K/V weight array be worth to the dense decode step? GPU only.

The dense step projects Q (`q` [H, Dh, D]) and K/V (`kv` [2, KV, Dh, D]) in two matvecs; at OPT-6.7B
each pays the fixed cost of a one-wave split-K GEMM and its partial-sum reduction (33.5 + 67 MB,
scripts/matvec_probe.py). This times, in the model's einsum forms with biases, at OPT-6.7B (D 4096,
32 heads of 128, fp16), the two matvecs as the model writes them against one matvec over the same
rows stored together, in two layouts ([3, H, Dh, D] and per head [H, 3, Dh, D]), as a chain of
applications with a data edge from each to the next (so that they stay ordered in a concurrent CUDA
graph), one process per XLA flag set (the decode loop runs with CONCURRENT).

python scripts/qkv_probe.py --out DIR  ->  DIR/qkv.{json,md}
"""
from __future__ import annotations

import json

FLAG_SETS = {
    "concurrent": "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT",
    "chained": "",  # XLA's default scheduling mode
}
D, H, Dh = 4096, 32, 128


def cases():
    import jax.numpy as jnp

    def separate(x, w):  # the model today: _project_heads + kv_project
        wq, bq, wkv, bkv = w
        q = jnp.einsum("btd,nhd->btnh", x, wq) + bq
        kv = jnp.einsum("btd,ckhd->cbtkh", x, wkv) + bkv[:, None, None]
        return q, kv[0], kv[1]

    def stacked(x, w):  # [3, H, Dh, D]
        wqkv, b = w
        y = jnp.einsum("btd,ckhd->cbtkh", x, wqkv) + b[:, None, None]
        return y[0], y[1], y[2]

    def per_head(x, w):  # [H, 3, Dh, D]
        wqkv, b = w
        y = jnp.einsum("btd,kchd->cbtkh", x, wqkv) + b.transpose(1, 0, 2)[:, None, None]
        return y[0], y[1], y[2]

    return {
        # name: (weight shapes, apply(x [1, 1, D], weights) -> (q, k, v))
        "q and kv, two matvecs (the model)": (((H, Dh, D), (H, Dh), (2, H, Dh, D), (2, H, Dh)), separate),
        "qkv stacked [3, H, Dh, D], one matvec": (((3, H, Dh, D), (3, H, Dh)), stacked),
        "qkv per head [H, 3, Dh, D], one matvec": (((H, 3, Dh, D), (H, 3, Dh)), per_head),
    }


def run_one(name: str) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.microbench import _time_calls, copy_bandwidth_gbs

    bw = copy_bandwidth_gbs()
    nbytes = 3 * H * Dh * D * 2
    rows = []
    for label, (shapes, apply) in cases().items():
        keys = iter(jax.random.split(jax.random.key(0), 64))
        layers = [tuple(jax.random.normal(next(keys), s, jnp.float16) * 0.02 for s in shapes) for _ in range(4)]
        xs = [jax.random.normal(next(keys), (1, 1, D), jnp.float16) for _ in range(4)]

        def run(xs, layers):
            outs, prev = [], None
            for x in xs:
                for layer in layers:
                    if prev is not None:  # a data edge from every output of the previous application
                        x = x + sum(p.reshape(-1)[0] for p in prev) * 0
                    prev = apply(x, layer)
                    outs.append(prev)
            return outs

        ref = cases()["q and kv, two matvecs (the model)"][1]
        row = dict(flags=name, case=label)
        t = _time_calls(jax.jit(run), xs, layers, 10)
        row.update(time_us=round(t["time_us"], 2), wall_us=round(t["wall_us"], 2),
                   kernel_us=round(t.get("kernel_us", float("nan")), 2), floor_us=round(nbytes / bw / 1e3, 2),
                   kernels=t.get("kernels"))
        if label.startswith("qkv"):  # the same numbers as the two matvecs over the same weights
            w = layers[0]
            parts = [(w[0][i], w[1][i]) if "stacked" in label else (w[0][:, i], w[1][:, i]) for i in range(3)]
            sep = (parts[0][0], parts[0][1], jnp.stack([parts[1][0], parts[2][0]]),
                   jnp.stack([parts[1][1], parts[2][1]]))
            got = jax.jit(apply)(xs[0], w)
            want = jax.jit(ref)(xs[0], sep)
            row["max_err"] = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
                                 for g, r in zip(got, want))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    from pallas_kernels.microbench import flag_set_probe_main
    flag_set_probe_main(__file__, __doc__, FLAG_SETS, run_one, "qkv", "Dense Q/K/V projections at OPT-6.7B",
                        ["flags", "case", "time_us", "wall_us", "kernel_us", "floor_us", "max_err", "kernels"], 400)


if __name__ == "__main__":
    main()

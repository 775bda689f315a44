"""Diagnostic: achieved read bandwidth of one batch-1 fp16 matvec in JAX (XLA) and torch (cuBLAS).

Tells whether a dense decode step's gap to the copy-bandwidth floor is in the matvecs themselves or
in the small kernels around them. Prints one JSON line per measurement.
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import torch

LAYERS = 32  # a chain of distinct weights so the L2 cache never holds the next one


def time_chain(fn, reps=20):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


for rows, cols in [(16384, 4096), (4096, 16384), (12288, 4096), (4096, 4096)]:
    ws = [jax.random.normal(jax.random.PRNGKey(i), (rows, cols), jnp.float16) for i in range(LAYERS)]
    x = jax.random.normal(jax.random.PRNGKey(99), (1, cols), jnp.float16)
    f = jax.jit(lambda x, ws: [jnp.einsum("bd,fd->bf", x, w) for w in ws])
    t = time_chain(lambda: f(x, ws)) / LAYERS
    tw = [torch.randn(rows, cols, dtype=torch.float16, device="cuda") for _ in range(LAYERS)]
    tx = torch.randn(1, cols, dtype=torch.float16, device="cuda")
    for w in tw:
        tx @ w.T
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    tt = []
    for _ in range(20):
        s.record()
        for w in tw:
            tx @ w.T
        e.record()
        e.synchronize()
        tt.append(s.elapsed_time(e) / 1e3 / LAYERS)
    nbytes = rows * cols * 2
    print(json.dumps({"shape": [rows, cols], "jax_us": t * 1e6, "jax_gbs": nbytes / t / 1e9,
                      "torch_us": statistics.median(tt) * 1e6, "torch_gbs": nbytes / statistics.median(tt) / 1e9}))
    del ws, tw

"""Sharded vs unsharded oracle-mask forward on every local device, with two per-block top-K thresholds.

The TP tests on 2 H200s (session 4) found the sharded oracle-mask forward of a tiny OPT differing from
the unsharded one by up to 1.25 in the logits while the CPU run matched. This script times nothing: it
prints, per model (tests/test_sharding.py's tiny configs), padding, site (MLP, heads, both) and
threshold implementation, the max |logit difference| per position of
  - the GSPMD-sharded forward vs the unsharded one on device 0, and
  - that unsharded forward vs the same forward on the CPU,
for the blockwise oracle (`sharding.tp_selector`) and the plain one. "lax_top_k" is the threshold the
project used before (k-th value from `lax.top_k` over a [.., blocks, N/blocks] reshape of a sharded
axis); "bisection" is `batching.blockwise_topk_mask` now (compare-and-count, `sparse.topk_mask`).

    python scripts/tp_oracle_mask_diag.py            # on a machine with 2+ GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu python scripts/tp_oracle_mask_diag.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dejavu_jax import batching as BT  # noqa: E402
from dejavu_jax import model as M  # noqa: E402
from dejavu_jax import sharding as S  # noqa: E402
from dejavu_jax.sparse import OracleSelector  # noqa: E402
from test_sharding import _tiny_configs  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def lax_top_k_mask(scores, k, blocks=1):
    """The former blockwise_topk_mask: the k_b-th value from lax.top_k, ties kept."""
    n = scores.shape[-1]
    nb, kb = n // blocks, BT.per_block_k(k, blocks)
    if kb >= nb:
        return jnp.ones(scores.shape, bool)
    s = scores.reshape(scores.shape[:-1] + (blocks, nb))
    return (s >= jax.lax.top_k(s, kb)[0][..., -1:]).reshape(scores.shape)


def max_diff(a, b) -> list:
    return np.round(np.abs(np.asarray(a) - np.asarray(b)).max(-1), 6).tolist()  # [B, T]


def main() -> int:
    tp = jax.device_count()
    mesh = S.make_mesh(tp)
    cpu = jax.devices("cpu")[0]
    out = {"devices": str(jax.devices())}
    for impl, mask_fn in (("bisection", BT.blockwise_topk_mask), ("lax_top_k", lax_top_k_mask)):
        BT.blockwise_topk_mask = mask_fn  # BatchSelector looks the function up at call time
        for name, cfg in _tiny_configs().items():
            params = M.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
            params = jax.tree_util.tree_map(lambda a: a * 6.0 if a.ndim >= 2 else a, params)
            sparams = S.shard_params(params, cfg, mesh)
            B, T = 2, 10
            toks = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, cfg.vocab_size)
            for pad in (True, False):
                valid = jnp.ones((B, T), bool).at[1, :3].set(not pad)
                pos = M.positions_from_valid(valid)
                for site in ("both", "mlp", "heads"):
                    mk = cfg.ffn_size // 2 if site != "heads" else cfg.ffn_size
                    hk = cfg.num_heads // 2 if site != "mlp" else cfg.num_heads
                    orc = OracleSelector((mk,) * cfg.num_layers, (hk,) * cfg.num_layers, cfg.ffn_size,
                                         cfg.num_heads)
                    for sel_name, sel in (("tp", S.tp_selector(orc, tp)), ("plain", orc)):
                        fwd = jax.jit(lambda p, t, q, v, sel=sel: M.forward(p, cfg, t, q, valid=v, selector=sel)[0])
                        ref, sharded = fwd(params, toks, pos, valid), fwd(sparams, toks, pos, valid)
                        with jax.default_device(cpu):
                            on_cpu = fwd(*jax.device_put((params, toks, pos, valid), cpu))
                        key = f"{impl} {name} pad={pad} {site} {sel_name}"
                        out[f"{key} sharded-vs-unsharded"] = max_diff(ref, sharded)
                        out[f"{key} unsharded-vs-cpu"] = max_diff(ref, on_cpu)
    print("RESULT " + json.dumps(out))
    for key, rows in out.items():
        if key != "devices":
            print(f"{max(max(r) for r in rows):10.6f}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tensor parallelism on 4 CPU host devices: sharded forwards equal single-device ones; HLO collectives.

The 4 devices need XLA_FLAGS=--xla_force_host_platform_device_count=4 before JAX starts, while
the rest of the suite runs in one process with 1 device; so the multi-device checks run once in a
child process (this file executed as a script: `python tests/test_sharding.py worker [TP]`), which
prints one JSON object of measured differences and collective counts, and the tests assert on it.
On a machine with 2 or more GPUs the same worker also runs on 2 real GPUs (NCCL all-reduces,
compiled Pallas kernels per shard): `test_two_gpus_*`, skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TP = 4  # CPU host devices; the GPU variant uses 2
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# The child process: everything that needs 4 devices
# --------------------------------------------------------------------------------------------
def _tiny_configs():
    from dejavu_jax.config import ModelConfig

    return {
        # OPT: MHA with biases, learned positions, vocab divisible by 4 (vocab-parallel case)
        "opt": ModelConfig(vocab_size=68, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                           ffn_size=64, max_positions=64, norm="layernorm", activation="relu", positions="learned",
                           position_offset=2, attn_bias=True, mlp_bias=True, family="opt", name="tiny-opt"),
        # Llama: GQA (8 query heads, 4 KV heads: one KV head and its 2 query heads per shard), with
        # Qwen3's per-head q/k norms (replicated scales: each shard normalises its own heads)
        "llama": ModelConfig(vocab_size=67, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                             ffn_size=48, max_positions=64, norm="rmsnorm", activation="swiglu", positions="rope",
                             attn_bias=False, mlp_bias=False, qk_norm=True, tie_embeddings=False, family="llama",
                             name="tiny-llama"),
    }


def _worker(TP: int = TP) -> dict:  # noqa: N803 (the device count reads as the constant it shadows)
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dejavu_jax import model as M
    from dejavu_jax import sharding as S
    from dejavu_jax.bench import random_predictor_selector
    from dejavu_jax.checkpoint import load_checkpoint, save_checkpoint
    from dejavu_jax.sparse import OracleSelector
    from pallas_kernels import get_ops

    assert jax.device_count() == TP, jax.devices()
    mesh = S.make_mesh(TP)
    xla = get_ops("xla")
    out: dict = {}
    def maxdiff(a, b) -> float:
        return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


    for name, cfg in _tiny_configs().items():
        r: dict = {}
        params = M.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
        params = jax.tree_util.tree_map(lambda a: a * 6.0 if a.ndim >= 2 else a, params)  # visible sparsity effects
        for i, lp in enumerate(params["layers"]):  # q/k norm scales away from 1, so a misplaced one shows
            for j, key in enumerate(k for k in ("q_norm", "k_norm") if k in lp):
                lp[key] = {"scale": 1.0 + 0.3 * jax.random.normal(jax.random.PRNGKey(10 + 2 * i + j), (cfg.head_dim,))}
        sparams = S.shard_params(params, cfg, mesh)
        B, T, n_steps, S_max = 2, 10, 2, 16
        toks = jax.random.randint(jax.random.PRNGKey(1), (B, T + n_steps), 0, cfg.vocab_size)
        valid = jnp.ones((B, T), bool).at[1, :3].set(False)  # row 1 left-padded
        pos = M.positions_from_valid(valid)
        fwd = jax.jit(lambda p, t, q, v: M.forward(p, cfg, t, q, valid=v)[0])

        # 1. dense chunk forward (no cache)
        r["prefill_diff"] = maxdiff(fwd(params, toks[:, :T], pos, valid), fwd(sparams, toks[:, :T], pos, valid))
        vparams = S.shard_params(params, cfg, mesh, vocab_parallel=True) if cfg.vocab_size % TP == 0 else None
        if vparams is not None:
            r["vocab_parallel_diff"] = maxdiff(fwd(params, toks[:, :T], pos, valid),
                                               fwd(vparams, toks[:, :T], pos, valid))

        # 2. dense cached prefill + decode steps; sparse decode (per-shard top-K) in both placements
        pre = jax.jit(lambda p, t, q, c, v: M.forward(p, cfg, t, q, c, v))

        def run_decode(p, cache, selector, ops, step_fn=None, rows=B):
            """Dense prefill of the first `rows` rows, then n_steps decode steps -> logits [rows, 1+n, V]."""
            t, q, v = toks[:rows], pos[:rows], valid[:rows]
            logits, cache = pre(p, t[:, :T], q, cache, v)
            outs = [logits[:, -1]]
            step = step_fn or jax.jit(lambda p, s, t, q, c: M.forward(p, cfg, t, q, c, selector=s, ops=ops))
            for i in range(n_steps):
                lg, cache = step(p, selector, t[:, T + i:T + i + 1], q[:, -1:] + 1 + i, cache)
                outs.append(lg[:, 0])
            return jnp.stack(outs, 1), cache

        cache0 = M.init_cache(cfg, B, S_max, jnp.float32)
        dense_ref, _ = run_decode(params, cache0, None, None)
        dense_tp, cache_tp = run_decode(sparams, S.shard_cache(cache0, mesh), None, None,
                                        S.decode_step_fn(cfg, mesh, cache0))
        r["decode_dense_diff"] = maxdiff(dense_ref, dense_tp)
        r["cache_k_spec"] = str(cache_tp.k[0].sharding.spec)

        pred = random_predictor_selector(cfg, jax.random.PRNGKey(2), mlp_density=0.5, head_density=0.5, rank=8,
                                         dtype=jnp.float32)
        smap_ops = S.sharded_ops(xla, mesh)
        # batch 2: one union index set per step (batch 1 is checked on the compiled steps of part 4)
        ref, _ = run_decode(params, cache0, S.tp_selector(pred, TP), xla)  # blockwise top-K, unsharded
        got, _ = run_decode(sparams, S.shard_cache(cache0, mesh), S.shard_selector(S.tp_selector(pred, mesh), mesh),
                            smap_ops, S.decode_step_fn(cfg, mesh, cache0, ops=smap_ops))
        r["sparse_b2_diff"] = maxdiff(ref, got)
        r["sparse_b2_vs_dense"] = maxdiff(ref, dense_ref)  # sparsity must change something

        # the sparse step's selected indices are blockwise: shard s picks from its own rows only
        ctx_x = jax.random.normal(jax.random.PRNGKey(3), (1, 1, cfg.hidden_size))
        sel_idx = S.tp_selector(pred, TP).neurons(M.SelectContext(1, params["layers"][1], ctx_x, ctx_x, ctx_x)).idx
        kb, nb = len(sel_idx) // TP, cfg.ffn_size // TP
        r["idx_blockwise"] = bool(np.all(np.asarray(sel_idx).reshape(TP, kb) // nb == np.arange(TP)[:, None]))

        # 3. oracle masks (dense compute, per-shard top-K on true importances) under GSPMD
        orc = OracleSelector((cfg.ffn_size // 2,) * cfg.num_layers, (cfg.num_heads // 2,) * cfg.num_layers,
                             cfg.ffn_size, cfg.num_heads)
        mfwd = jax.jit(lambda p, t, q, v: M.forward(p, cfg, t, q, valid=v, selector=S.tp_selector(orc, TP))[0])
        r["oracle_mask_diff"] = maxdiff(mfwd(params, toks[:, :T], pos, valid), mfwd(sparams, toks[:, :T], pos, valid))

        # 4. collectives of the compiled decode steps (batch 1)
        c1 = M.init_cache(cfg, 1, S_max, jnp.float32)
        args = (toks[:1, :1], pos[:1, :1], S.shard_cache(c1, mesh))
        tp_sel = S.shard_selector(S.tp_selector(pred, mesh), mesh)
        hlo = {
            "dense": S.decode_step_fn(cfg, mesh, c1, donate=False).lower(sparams, None, *args),
            "sparse_smap": S.decode_step_fn(cfg, mesh, c1, ops=smap_ops, donate=False).lower(sparams, tp_sel, *args),
            "sparse_gspmd": S.decode_step_fn(cfg, mesh, c1, ops=xla, donate=False).lower(sparams, tp_sel, *args),
        }
        compiled = {}
        for key, lowered in hlo.items():
            compiled[key] = lowered.compile()
            text = compiled[key].as_text()
            r[f"hlo_{key}"] = S.collective_counts(text)
            r[f"hlo_{key}_allgather_shapes"] = S.collective_shapes(text, "all-gather")
        # batch-1 decode step from an empty cache: the compiled sharded steps vs the unsharded forward
        one = jax.jit(lambda p, s, t, q, c, ops: M.forward(p, cfg, t, q, c, selector=s, ops=ops)[0],
                      static_argnums=5)
        r["step_b1_dense_diff"] = maxdiff(one(params, None, *args[:2], c1, None),
                                          compiled["dense"](sparams, None, *args)[0])
        sparse_ref = one(params, S.tp_selector(pred, TP), *args[:2], c1, xla)
        r["sparse_b1_diff"] = maxdiff(sparse_ref, compiled["sparse_smap"](sparams, tp_sel, *args)[0])
        r["sparse_b1_vs_dense"] = maxdiff(sparse_ref, one(params, None, *args[:2], c1, None))

        # 5. Pallas kernels (interpret mode on CPU) per shard under shard_map: one sparse step, equal to
        #    XLA (GQA only: it covers every kernel, and interpret mode is slow on CPU)
        if name == "llama":
            pal = S.sharded_ops(get_ops("pallas"), mesh)
            lx, _ = S.decode_step_fn(cfg, mesh, c1, ops=smap_ops, donate=False)(sparams, tp_sel, *args)
            lp, _ = S.decode_step_fn(cfg, mesh, c1, ops=pal, donate=False)(sparams, tp_sel, *args)
            r["pallas_vs_xla_diff"] = maxdiff(lx, lp)

        # 6. sharded checkpoint restore: every leaf lands in its shards, values equal
        if name == "opt":  # one family: the restore path does not depend on it
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp) / "ckpt", cfg, jax.tree_util.tree_map(np.asarray, params))
                shardings = S.param_shardings(cfg, mesh)
                _, loaded = load_checkpoint(Path(tmp) / "ckpt", jnp.float32, sharding=shardings)
                same = jax.tree_util.tree_map(lambda a, sh: a.sharding.is_equivalent_to(sh, a.ndim), loaded, shardings)
                r["ckpt_shardings_match"] = all(jax.tree_util.tree_leaves(same))
                r["ckpt_up_shard_shape"] = list(loaded["layers"][0]["up"].addressable_shards[0].data.shape)
                r["ckpt_value_diff"] = max(maxdiff(a, b) for a, b in zip(jax.tree_util.tree_leaves(loaded),
                                                                         jax.tree_util.tree_leaves(params)))
        # 7. bench's tensor-parallel sparse path (per-shard selection, shard_map ops, sharded cache)
        if name == "llama":
            from dejavu_jax.bench import sparse_rows

            rows = sparse_rows(cfg, sparams, densities=[(0.5, 0.5)], kernels=["xla"], rank=4, kv_modes=["exact"],
                               prompt_len=4, new_tokens=2, reps=1, bw=1.0, extras=False, batch=2, mesh=mesh)
            r["bench_tp_rows"] = rows
        out[name] = r
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    print("RESULT " + json.dumps(_worker(int(sys.argv[2]) if len(sys.argv) > 2 else TP)), flush=True)
    sys.exit(0)


# --------------------------------------------------------------------------------------------
# The tests (this process: 1 device)
# --------------------------------------------------------------------------------------------
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from dejavu_jax import sharding as S  # noqa: E402
from dejavu_jax.config import preset  # noqa: E402


def _run_worker(tp: int, env: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "worker", str(tp)], capture_output=True,
                          text=True, env=dict(os.environ, **env), cwd=REPO, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"TP worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def tp_results():
    return _run_worker(TP, {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                          f" --xla_force_host_platform_device_count={TP}").strip(),
                            "JAX_PLATFORMS": "cpu"})


def _gpu_count() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


@pytest.fixture(scope="module")
def two_gpu_results():
    if _gpu_count() < 2:
        pytest.skip("needs 2 GPUs")
    # the child shares the GPUs with this process: no preallocation; fp32 dots at full precision (not TF32)
    return _run_worker(2, {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0,1"),
                           "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_DEFAULT_MATMUL_PRECISION": "highest"})


FAMILIES = ["opt", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_dense_forward_equals_single_device(tp_results, family):
    r = tp_results[family]
    assert r["prefill_diff"] < 1e-4
    assert r["decode_dense_diff"] < 1e-4
    assert r["step_b1_dense_diff"] < 1e-4
    assert r["cache_k_spec"] == "P(None, 'model', None, None)"


def test_vocab_parallel_forward_equals_single_device(tp_results):
    assert tp_results["opt"]["vocab_parallel_diff"] < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_sharded_sparse_decode_equals_single_device(tp_results, family, batch):
    r = tp_results[family]
    assert r[f"sparse_b{batch}_diff"] < 1e-4
    assert r[f"sparse_b{batch}_vs_dense"] > 1e-2  # the sparse path really dropped rows
    assert r["idx_blockwise"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_oracle_masks_equal_single_device(tp_results, family):
    assert tp_results[family]["oracle_mask_diff"] < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_collectives(tp_results, family):
    """One all-reduce per block half, no all-gather, dense and sparse (shard_map'ed gathers)."""
    L = _tiny_layers(family)
    for key in ("dense", "sparse_smap"):
        counts = tp_results[family][f"hlo_{key}"]
        assert counts["all-reduce"] == 2 * L, (key, counts)
        assert counts["all-gather"] == 0, (key, tp_results[family][f"hlo_{key}_allgather_shapes"])
        assert counts["reduce-scatter"] == counts["all-to-all"] == counts["collective-permute"] == 0, counts
    # Plain jnp.take on sharded weights under GSPMD: not local (documented in sharding.py): it moves
    # weights or the KV cache between devices, which is why sharded_ops exists.
    gspmd = tp_results[family]["hlo_sparse_gspmd"]
    assert gspmd["all-gather"] > 0 or gspmd["all-reduce"] > 2 * L, gspmd


def test_pallas_kernels_per_shard_equal_xla(tp_results):
    assert tp_results["llama"]["pallas_vs_xla_diff"] < 1e-4


def test_bench_runs_tensor_parallel(tp_results):
    rows = tp_results["llama"]["bench_tp_rows"]
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["decode_ms_per_token"] > 0


def test_sharded_checkpoint_restore(tp_results):
    r = tp_results["opt"]
    cfg = _tiny_cfg("opt")
    assert r["ckpt_shardings_match"]
    assert r["ckpt_up_shard_shape"] == [cfg.ffn_size // TP, cfg.up_rows, cfg.hidden_size]
    assert r["ckpt_value_diff"] == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_two_gpus_sharded_decode_equals_single_device(two_gpu_results, family):
    """TP=2 on real GPUs: NCCL all-reduces, per-shard top-K, and (GQA) the compiled Pallas kernels."""
    r = two_gpu_results[family]
    for key in ("prefill_diff", "decode_dense_diff", "step_b1_dense_diff", "sparse_b1_diff", "sparse_b2_diff",
                "oracle_mask_diff"):
        assert r[key] < 1e-4, (key, r[key])
    assert r["sparse_b1_vs_dense"] > 1e-2 and r["idx_blockwise"]
    for key in ("dense", "sparse_smap"):
        assert r[f"hlo_{key}"]["all-reduce"] == 2 * _tiny_layers(family), r[f"hlo_{key}"]
        assert r[f"hlo_{key}"]["all-gather"] == 0, r[f"hlo_{key}"]
    if family == "llama":
        assert r["pallas_vs_xla_diff"] < 1e-4
        assert "error" not in r["bench_tp_rows"][0], r["bench_tp_rows"]
    else:
        assert r["ckpt_shardings_match"] and r["ckpt_value_diff"] == 0.0


def _tiny_cfg(family):
    return _tiny_configs()[family]


def _tiny_layers(family):
    return _tiny_cfg(family).num_layers


# ---------------------------------------------------------------------------- single-process checks
def test_every_parameter_has_a_rule():
    for name in ("opt-125m", "opt-350m", "smollm2-135m"):
        cfg = preset(name)
        specs = S.param_specs(cfg)
        flat = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert len(flat) == len(jax.tree_util.tree_leaves(
            jax.tree_util.tree_map(lambda s: 0, __import__("dejavu_jax.model").model.param_shapes(cfg),
                                   is_leaf=lambda x: isinstance(x, tuple))))
        lp = specs["layers"][0]
        assert lp["q"] == jax.sharding.PartitionSpec("model", None, None)
        assert lp["kv"] == jax.sharding.PartitionSpec(None, "model", None, None)
        assert lp["down"] == jax.sharding.PartitionSpec("model", None)
        assert specs["embed"] == jax.sharding.PartitionSpec(None, None)
        assert S.param_specs(cfg, vocab_parallel=True)["embed"] == jax.sharding.PartitionSpec("model", None)


def test_divisibility_errors_name_the_dimension():
    cfg = preset("smollm2-135m")  # 9 heads, 3 KV heads, 1536 neurons
    S.check_tp(cfg, 3)
    with pytest.raises(S.ShardingError, match=r"num_heads=9.*num_kv_heads=3.*not divisible by 2"):
        S.check_tp(cfg, 2)
    with pytest.raises(S.ShardingError, match="vocab_size"):
        S.check_tp(preset("opt-125m").replace(vocab_size=50271), 2, vocab_parallel=True)
    with pytest.raises(S.ShardingError, match="needs 8 devices"):
        S.make_mesh(8, jax.devices()[:1])


def test_one_device_mesh_runs_the_same_code():
    """TP=1 is a valid mesh: shard_params + sharded_ops + tp_selector on one device equal plain sparse."""
    from dejavu_jax import model as M
    from dejavu_jax.bench import random_predictor_selector
    from pallas_kernels import get_ops

    cfg = _tiny_cfg("llama")
    params = M.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    mesh = S.make_mesh(1)
    pred = random_predictor_selector(cfg, jax.random.PRNGKey(2), mlp_density=0.5, head_density=0.5, rank=8,
                                     dtype=jnp.float32)
    cache = M.init_cache(cfg, 1, 8, jnp.float32)
    tok, pos = jnp.array([[5]]), jnp.array([[0]])
    ref, _ = M.forward(params, cfg, tok, pos, cache, selector=pred, ops=get_ops("xla"))
    step = S.decode_step_fn(cfg, mesh, cache, ops=S.sharded_ops(get_ops("xla"), mesh), donate=False)
    got, _ = step(S.shard_params(params, cfg, mesh), S.tp_selector(pred, mesh), tok, pos, S.shard_cache(cache, mesh))
    assert float(jnp.max(jnp.abs(ref - got))) < 1e-5

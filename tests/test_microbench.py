"""pallas_kernels.microbench on CPU: the window K/V rows and sweep run in quick mode at tiny shapes
(the kernel interpreted; times are host wall clock there, so only the rows' contents are checked)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import gather_attention as ga
from pallas_kernels import microbench as mb

TINY_WINDOW = dict(KV=4, Dh=16, D=64, W=4, n_layers=2, reps=1, n_trials=1, bandwidth_gbs=1.0,
                   log=lambda line: None)


KV_METHODS = tuple(m for m in mb.WINDOW_KV_METHODS if not m.startswith("qkv"))


def test_window_kv_microbench_rows():
    rows = mb.window_kv_microbench((1, 3), S=12, methods=KV_METHODS, **TINY_WINDOW)
    qkv_methods = ("qkv_unfused", "qkv_normed", "qkv_fused")
    rows += mb.window_kv_microbench((2, 3), S=12, methods=qkv_methods, **TINY_WINDOW)
    assert [(r["Ka"], r["method"]) for r in rows] == (
        [(ka, m) for ka in (1, 3) for m in KV_METHODS] + [(ka, m) for ka in (2, 3) for m in qkv_methods])
    for r in rows:
        assert r["op"] == "window_kv" and (r["KV"], r["Dh"], r["D"], r["W"]) == (4, 16, 64, 4)
        updates = r["method"] in ("pallas_update", "pallas_scatter", "xla_update") or r["method"].startswith("qkv")
        assert r.get("S") == (12 if updates else None)
        heads = 4 if r["method"] == "dense" else r["Ka"]
        queries = r["Ka"] - 1 if r["method"].startswith("qkv") else 0  # ceil(KV / W) = 1 group refreshed
        assert r["bytes"] == (2 * heads + queries) * 16 * 64 * 2  # K, V (and Q) rows, fp16
        assert r["sel_floor_us"] == round(2 * r["Ka"] * 16 * 64 * 2 / 1e3, 2)
        assert r["time_us"] > 0
        assert r["gbs"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e3), abs=0.1)
        assert r["x_floor"] == pytest.approx(r["time_us"] / r["floor_us"], rel=0.01)
    md = mb.to_markdown(rows, "cpu")
    assert "Window K/V of the selected KV heads" in md and "| 3/4 | 4 | dense |" in md
    assert "| 2/4 | 4 | qkv_fused | default |" in md
    with pytest.raises(ValueError, match="Ka > 1"):  # no query head left beside the refreshed group
        mb.window_kv_microbench((1,), methods=("qkv_fused",), **TINY_WINDOW)


def test_qkv_microbench_methods_compute_the_same_step(monkeypatch):
    """The three qkv rows time the same computation: run once from the same state, the unfused ops,
    the kernel reading the XLA-normed ring and the normalising kernel give the same ring, caches and
    queries."""
    import numpy as np

    captured = {}

    def capture(update, xs, states, layers, n_trials):
        captured[update.__name__] = update(xs[0], states[0], layers[0])
        return dict(time_us=1.0)

    monkeypatch.setattr(mb, "time_per_update", capture)  # one application instead of timing
    mb.window_kv_microbench((3,), S=12, methods=("qkv_unfused", "qkv_normed", "qkv_fused"), **TINY_WINDOW)
    for other in ("qkv_normed", "qkv_fused"):
        for a, b in zip(captured["qkv_unfused"], captured[other]):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-3)


def test_chain_update_threads_each_layers_state_in_place():
    """reps x layers updates, each layer's state carried from one rep to the next (donated)."""
    xs = [jnp.full((3,), float(r + 1)) for r in range(2)]
    layers = [jnp.float32(10.0), jnp.float32(100.0)]
    run = mb.chain_update(lambda x, state, layer: state + x * layer, n_layers=2, reps=2)
    threaded = mb._Threaded(run, [jnp.zeros((3,)), jnp.ones((3,))])
    threaded(xs, layers)
    out = threaded(xs, layers)  # a second call starts from the first one's states
    assert [float(o[0]) for o in out] == [2 * (1 + 2) * 10.0, 1 + 2 * (1 + 2) * 100.0]


def test_window_kv_sweep_picks_a_complete_config():
    configs = mb.WINDOW_KV_SWEEP[:2]
    rows = mb.window_kv_sweep((2,), configs=configs, methods=("pallas", "qkv_fused"), **TINY_WINDOW)
    assert [(r["method"], r["blocks"]) for r in rows] == [(m, c) for m in ("pallas", "qkv_fused") for c in configs]
    assert all(r["sweep"] for r in rows)
    for method in ("pallas", "qkv_fused"):
        mine = [r for r in rows if r["method"] == method]
        assert mb.best_window_kv_blocks(rows, method) == min(mine, key=lambda r: r["time_us"])["blocks"]
    md = mb.to_markdown(rows, "cpu")
    assert "Window K/V block sweep: pallas" in md and "Window K/V block sweep: qkv_fused" in md
    with pytest.raises(ValueError, match="no window K/V blocks"):
        mb.window_kv_sweep((2,), methods=("xla",), **TINY_WINDOW)


def test_window_kv_sweep_records_a_config_that_fails_and_goes_on(monkeypatch):
    """A tile the GPU compiler refuses (shared memory) is a row of its own; the sweep continues."""
    real = mb.window_kv_microbench

    def refuse_wide_tiles(heads_counts, *, blocks, **kw):
        if blocks["block_d"] > 256:
            raise RuntimeError("RESOURCE_EXHAUSTED: Shared memory size limit exceeded")
        return real(heads_counts, blocks=blocks, **kw)

    monkeypatch.setattr(mb, "window_kv_microbench", refuse_wide_tiles)
    configs = (dict(block_n=16, block_d=512), dict(block_n=16, block_d=256))
    rows = mb.window_kv_sweep((2,), configs=configs, **TINY_WINDOW)
    assert [r["op"] for r in rows] == ["window_kv_failed", "window_kv"]
    assert "Shared memory" in rows[0]["error"] and mb.best_window_kv_blocks(rows) == configs[1]
    assert "did not build" in mb.to_markdown(rows, "cpu")


def test_up_norm_rows_time_the_same_projection():
    """--up-norm's rows: the up kernel with the LayerNorm inside and after XLA's norm read the same
    bytes (one matrix's selected rows) and compute the same activations."""
    import numpy as np

    case = mb.MlpCase(D=64, F=96, density=0.25)
    layer = mb._mlp_layers(case, 1, jax.random.key(0))[0]
    x = jax.random.normal(jax.random.key(1), (1, 64), jnp.float32).astype(jnp.float16) * 3 + 1
    ap = mb.mlp_appliers()
    np.testing.assert_allclose(np.asarray(ap["pallas_up_norm"](x, layer), np.float32),
                               np.asarray(ap["pallas_up_xla_norm"](x, layer), np.float32), atol=2e-3)
    rows = mb.kernel_microbench([dict(D=64, F=96)], densities=(0.25,), methods=mb.UP_METHODS, n_layers=1,
                                reps=1, n_trials=1, bandwidth_gbs=1.0, log=lambda line: None)
    assert [r["method"] for r in rows] == list(mb.UP_METHODS)
    assert {r["bytes"] for r in rows} == {24 * 64 * 2}
    assert "pallas_up_norm" in mb.to_markdown(rows, "cpu")


def test_window_kv_sweep_configs_are_valid():
    for blocks in mb.WINDOW_KV_SWEEP:
        mb.check_window_kv_blocks(blocks)  # powers of two, >= the tensor-core dot minimum
        assert set(blocks) <= set(ga.WINDOW_KV_BLOCK_KEYS)
    with pytest.raises(ValueError):
        mb.check_window_kv_blocks(dict(block_n=8))
    with pytest.raises(ValueError):
        mb.check_window_kv_blocks(dict(block_d=96))


def test_window_kv_sweep_configs_lower_to_triton_at_opt_6_7b():
    """Each sweep config passes the Triton lowering rules at the GPU run's shape (lowered for CUDA
    on CPU: abstract inputs, nothing compiled), so no config of the GPU sweep fails to build."""
    shape = mb.OPT_6_7B_WINDOW_KV
    KV, Dh, D, W = (shape[k] for k in ("KV", "Dh", "D", "W"))
    x = jax.ShapeDtypeStruct((1, W, D), jnp.float16)
    w_kv, b = jax.ShapeDtypeStruct((2, KV, Dh, D), jnp.float16), jax.ShapeDtypeStruct((2, KV, Dh), jnp.float16)
    heads = jax.ShapeDtypeStruct((18,), jnp.int32)
    for blocks in mb.WINDOW_KV_SWEEP:
        fn = functools.partial(ga.gathered_window_kv, **blocks)
        text = jax.jit(fn).trace(x, w_kv, heads, b).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text, blocks


def _load_profile_decode():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "profile_decode.py"
    spec = importlib.util.spec_from_file_location("profile_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_decode_lazy_kv_runs_on_cpu(monkeypatch):
    """--kv-mode lazy: the sparse decode loop runs on the lazy cache (window ring per layer); on
    CPU the trace has no GPU events, so profile() reports that instead of kernel times."""
    from dejavu_jax import bench
    from dejavu_jax import model as M
    from dejavu_jax.config import ModelConfig
    from pallas_kernels import get_ops

    pd = _load_profile_decode()
    caches = []
    make_cache = pd.init_sparse_cache

    def spy(*args, **kw):
        caches.append(make_cache(*args, **kw))
        return caches[-1]

    monkeypatch.setattr(pd, "init_sparse_cache", spy)
    cfg = ModelConfig(vocab_size=67, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                      ffn_size=64, max_positions=128, norm="layernorm", activation="relu", positions="learned",
                      position_offset=2, attn_bias=True, mlp_bias=True, family="opt", name="tiny-opt")
    params = M.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    sel = bench.fixed_index_selector(cfg, mlp_density=0.5, head_density=0.5)
    r = pd.profile(cfg, params, selector=sel, ops=get_ops("xla"), tokens=3, prompt_len=4, kv_mode="lazy")
    assert caches and all(c.win_x is not None and len(c.win_x) == cfg.num_layers for c in caches)
    if jax.default_backend() == "cpu":
        assert "no GPU events" in r["error"]
    with pytest.raises(SystemExit):  # only the modes the cache knows
        pd.main(["--kv-mode", "approximate"])

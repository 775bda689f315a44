"""Sparse forward vs dense: masks, gathered decode, oracle/threshold/predictor selectors, lazy KV."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax import model as M
from dejavu_jax.config import ModelConfig
from dejavu_jax.model import Selection
from dejavu_jax.sparse import (
    KV_MODES,
    FixedSelector,
    OracleSelector,
    PredictorSelector,
    Predictors,
    SparsityConfig,
    SparsityError,
    build_selector,
    choose_kv_mode,
    init_sparse_cache,
    input_source,
    model_fingerprint,
    predictor_logits,
    predictor_shapes,
    share_first_matmul,
    step_fuses_attention_inputs,
    topk_mask,
)
from pallas_kernels import get_ops

OPS = get_ops("xla")

TINY = {
    "opt": ModelConfig(vocab_size=67, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                       ffn_size=64, max_positions=128, norm="layernorm", activation="relu", positions="learned",
                       position_offset=2, attn_bias=True, mlp_bias=True, family="opt", name="tiny-opt"),
    "llama": ModelConfig(vocab_size=67, hidden_size=32, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
                         ffn_size=48, max_positions=128, norm="rmsnorm", activation="swiglu", positions="rope",
                         attn_bias=False, mlp_bias=False, tie_embeddings=False, family="llama", name="tiny-llama"),
}


def scaled_params(cfg: ModelConfig, seed: int = 0):
    """Random params with weights large enough that sparsity visibly changes the outputs."""
    params = M.init_params(cfg, jax.random.PRNGKey(seed), jnp.float32)
    return jax.tree_util.tree_map(lambda a: a * 8.0 if a.ndim >= 2 else a, params)


@pytest.fixture(scope="module", params=["opt", "llama"])
def tiny(request):
    cfg = TINY[request.param]
    return cfg, scaled_params(cfg)


def tokens_for(cfg, B=2, T=12, seed=1):
    toks = jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    return toks, pos


def kl_to_dense(dense_logits, logits):
    p = jax.nn.log_softmax(dense_logits, -1)
    q = jax.nn.log_softmax(logits, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def decode_steps(params, cfg, prompt, n_steps, selector=None, ops=None, cache=None, step_selector=None):
    """Dense prefill, then n_steps decode steps on fixed random tokens, all in one jitted call
    (one compilation per test). step_selector(i), if given, is step i's selector (i traced) in place of
    selector. Returns logits [B, n_steps, V]."""
    B, T = prompt.shape
    cache = cache if cache is not None else M.init_cache(cfg, B, T + n_steps + 1, jnp.float32)
    toks = jax.random.randint(jax.random.PRNGKey(7), (n_steps, B, 1), 0, cfg.vocab_size)

    @jax.jit
    def run(params, prompt, toks, cache):
        _, cache = M.forward(params, cfg, prompt, jnp.broadcast_to(jnp.arange(T), (B, T)), cache)

        def step(cache, xs):
            tok, i = xs
            sel = selector if step_selector is None else step_selector(i)
            logits, cache = M.forward(params, cfg, tok, jnp.full((B, 1), T + i), cache, selector=sel, ops=ops)
            return cache, logits[:, 0]

        _, out = jax.lax.scan(step, cache, (toks, jnp.arange(n_steps)))
        return out.transpose(1, 0, 2)

    return run(params, prompt, toks, cache)


# ------------------------------------------------------------------------------------------
# All selected == dense
# ------------------------------------------------------------------------------------------
def test_all_selected_mask_equals_dense(tiny):
    cfg, params = tiny
    toks, pos = tokens_for(cfg)
    dense, _ = M.forward(params, cfg, toks, pos)
    L = cfg.num_layers
    sel = FixedSelector([np.arange(cfg.ffn_size)] * L, [np.arange(cfg.num_heads)] * L, cfg.ffn_size,
                        cfg.num_heads, as_mask=True)
    sparse, _ = M.forward(params, cfg, toks, pos, selector=sel)
    np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=1e-5)
    oracle = build_selector(cfg, params, mode="oracle", mlp_density=1.0, head_density=1.0)
    np.testing.assert_allclose(M.forward(params, cfg, toks, pos, selector=oracle)[0], dense, atol=1e-5, rtol=1e-5)


def test_all_selected_gather_decode_equals_dense(tiny):
    cfg, params = tiny
    prompt, _ = tokens_for(cfg, B=1, T=6)
    L = cfg.num_layers
    dense = decode_steps(params, cfg, prompt, 4)
    sel = FixedSelector([np.arange(cfg.ffn_size)] * L, [np.arange(cfg.num_heads)] * L, cfg.ffn_size, cfg.num_heads)
    gathered = decode_steps(params, cfg, prompt, 4, selector=sel, ops=OPS)
    np.testing.assert_allclose(gathered, dense, atol=1e-4, rtol=1e-4)


def test_gathered_decode_equals_mask_decode(tiny):
    cfg, params = tiny
    prompt, _ = tokens_for(cfg, B=1, T=6)
    rng = np.random.default_rng(0)
    L = cfg.num_layers
    mlp_idx = [np.sort(rng.choice(cfg.ffn_size, cfg.ffn_size // 3, replace=False)) for _ in range(L)]
    head_idx = [np.sort(rng.choice(cfg.num_heads, 2, replace=False)) for _ in range(L)]
    mlp_idx[0] = None  # a dense layer mixed in
    as_idx = FixedSelector(mlp_idx, head_idx, cfg.ffn_size, cfg.num_heads)
    as_mask = FixedSelector(mlp_idx, head_idx, cfg.ffn_size, cfg.num_heads, as_mask=True)
    gathered = decode_steps(params, cfg, prompt, 4, selector=as_idx, ops=OPS)
    masked = decode_steps(params, cfg, prompt, 4, selector=as_mask)
    dense = decode_steps(params, cfg, prompt, 4)
    np.testing.assert_allclose(gathered, masked, atol=1e-4, rtol=1e-4)
    assert float(jnp.max(jnp.abs(gathered - dense))) > 1e-2  # the selection really changed something


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_rope_with_qkv_bias_or_norm_sparse_paths(backend, family):
    """Qwen2's layout (RoPE, GQA, q/k/v biases, no out bias), here with YaRN's scaled cos and sin: the
    bias is added before the rotation on every gathered path. Qwen3's (per-head q/k RMSNorm, heads wider than D / H): the norm comes
    before the rotation on every path, the lazy window recompute included. All heads and neurons
    gathered == dense; a partial selection gathered == masked; lazy KV (window 3, heads idling and
    returning) == exact, with the fused attention inputs asked for (Qwen3 steps do not fuse)."""
    rng = np.random.default_rng(0)
    if family == "qwen2":
        from convert.hf import yarn_freq_factors, yarn_mscale

        D = TINY["llama"].head_dim
        cfg = TINY["llama"].replace(attn_bias=True, family="qwen2", name="tiny-qwen2",
                                    rope_freq_factors=yarn_freq_factors(D, 1e4, 4.0, 8), rope_attention_factor=yarn_mscale(4.0))
        params = scaled_params(cfg)
        for lp in params["layers"]:  # non-zero q/k/v biases; Qwen2's missing out bias converts to zeros
            lp["q_bias"] = jnp.asarray(rng.normal(0, 1.0, lp["q_bias"].shape), jnp.float32)
            lp["kv_bias"] = jnp.asarray(rng.normal(0, 1.0, lp["kv_bias"].shape), jnp.float32)
            lp["out_bias"] = jnp.zeros_like(lp["out_bias"])
    else:
        cfg = TINY["llama"].replace(qk_norm=True, head_dim=16, family="qwen3", name="tiny-qwen3")
        params = scaled_params(cfg)
        for lp in params["layers"]:
            for name in ("q_norm", "k_norm"):
                lp[name] = {"scale": jnp.asarray(rng.normal(1.0, 0.3, cfg.head_dim), jnp.float32)}
        assert not step_fuses_attention_inputs(cfg, "lazy", get_ops(backend, fused_step=True))
    ops = get_ops(backend)
    prompt, _ = tokens_for(cfg, B=1, T=5)
    L, n = cfg.num_layers, 6
    dense = decode_steps(params, cfg, prompt, n)
    every = FixedSelector([np.arange(cfg.ffn_size)] * L, [np.arange(cfg.num_heads)] * L, cfg.ffn_size, cfg.num_heads)
    np.testing.assert_allclose(decode_steps(params, cfg, prompt, n, selector=every, ops=ops), dense,
                               atol=1e-4, rtol=1e-4)
    mlp_idx = [np.sort(rng.choice(cfg.ffn_size, cfg.ffn_size // 3, replace=False)) for _ in range(L)]
    head_idx = [np.sort(rng.choice(cfg.num_heads, 2, replace=False)) for _ in range(L)]
    gathered = decode_steps(params, cfg, prompt, n, selector=FixedSelector(mlp_idx, head_idx, cfg.ffn_size,
                                                                          cfg.num_heads), ops=ops)
    masked = decode_steps(params, cfg, prompt, n, selector=FixedSelector(mlp_idx, head_idx, cfg.ffn_size,
                                                                        cfg.num_heads, as_mask=True))
    np.testing.assert_allclose(gathered, masked, atol=1e-4, rtol=1e-4)
    sel = PredictorSelector(random_predictors(cfg, seed=3), (cfg.ffn_size // 2,) * L, (1,) * L, cfg.ffn_size,
                            cfg.num_heads, True, True)
    exact = decode_steps(params, cfg, prompt, n, selector=sel, ops=ops)
    lazy = decode_steps(params, cfg, prompt, n, selector=sel, ops=get_ops(backend, fused_step=True),
                        cache=init_sparse_cache(cfg, 1, 5 + n + 1, jnp.float32, kv_mode="lazy", lazy_window=3))
    np.testing.assert_allclose(lazy, exact, atol=1e-4, rtol=1e-4)
    assert float(jnp.max(jnp.abs(exact - dense))) > 1e-2  # the selection really changed something


# ------------------------------------------------------------------------------------------
# Oracle and threshold
# ------------------------------------------------------------------------------------------
def test_oracle_degrades_roughly_monotonically(tiny):
    cfg, params = tiny
    toks, pos = tokens_for(cfg, B=2, T=24)
    dense, _ = M.forward(params, cfg, toks, pos)
    mlp_kl = []
    for d in (1.0, 0.75, 0.5, 0.25, 0.1):
        sel = build_selector(cfg, params, mode="oracle", mlp_density=d)
        mlp_kl.append(kl_to_dense(dense, M.forward(params, cfg, toks, pos, selector=sel)[0]))
    assert mlp_kl[0] < 1e-9
    # monotone up to small noise, and clearly worse at the sparsest setting
    assert all(b >= a - 1e-3 for a, b in zip(mlp_kl, mlp_kl[1:])), mlp_kl
    assert mlp_kl[-1] > 10 * max(mlp_kl[1], 1e-6) or mlp_kl[-1] > 0.05, mlp_kl
    head_kl = []
    for d in (1.0, 0.5, 0.25):
        sel = build_selector(cfg, params, mode="oracle", head_density=d)
        head_kl.append(kl_to_dense(dense, M.forward(params, cfg, toks, pos, selector=sel)[0]))
    assert head_kl[0] < 1e-9 and head_kl[1] > 0 and head_kl[2] >= head_kl[1] - 1e-3, head_kl


def test_oracle_keeps_exactly_k_per_token():
    scores = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 40))
    mask = topk_mask(scores, 7)
    assert mask.shape == scores.shape and bool(jnp.all(mask.sum(-1) == 7))
    assert bool(jnp.all(jnp.where(mask, scores, jnp.inf).min(-1) >= jnp.where(mask, -jnp.inf, scores).max(-1)))
    # the bisection threshold equals lax.top_k's k-th value, with negatives and ReLU-style zero ties
    relu_like = jnp.maximum(scores, 0.0)
    for x in (scores, -jnp.abs(scores), relu_like):
        for k in (1, 13, 39):
            ref = x >= jax.lax.top_k(x, k)[0][..., -1:]
            assert bool(jnp.all(topk_mask(x, k) == ref)), k


def test_threshold_calibration_hits_target_density(tiny):
    cfg, params = tiny
    toks, pos = tokens_for(cfg, B=4, T=32, seed=3)
    sel = build_selector(cfg, params, mode="threshold", mlp_density=0.5, head_density=0.5,
                         calibration_tokens=np.asarray(toks))
    rec: list = []
    M.forward(params, cfg, toks, pos, record=rec)
    for layer, r in enumerate(rec):
        kept = float(jnp.mean(r["neuron_importance"] >= sel.mlp_threshold[layer]))
        kept_h = float(jnp.mean(r["head_importance"] >= sel.head_threshold[layer]))
        # ReLU zeros: the threshold may fall on 0 where fewer than half the neurons fire
        assert 0.4 <= kept <= 0.6 or float(sel.mlp_threshold[layer]) == 0.0, (layer, kept)
        assert 0.4 <= kept_h <= 0.6, (layer, kept_h)
    dense, _ = M.forward(params, cfg, toks, pos)
    assert kl_to_dense(dense, M.forward(params, cfg, toks, pos, selector=sel)[0]) > 0


def test_threshold_needs_calibration(tiny):
    cfg, params = tiny
    with pytest.raises(SparsityError, match="calibration"):
        build_selector(cfg, params, mode="threshold", mlp_density=0.5)


# ------------------------------------------------------------------------------------------
# Predictor selector: lookahead inputs and the gathered decode path
# ------------------------------------------------------------------------------------------
def random_predictors(cfg, rank=8, seed=0):
    shapes = predictor_shapes(cfg, rank)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


@pytest.mark.parametrize("form", ["linear", "magnitude"])
def test_predictor_shapes_match_bench_bytes(tiny, form):
    from dejavu_jax.bench import predictor_bytes

    cfg, _ = tiny
    shapes = predictor_shapes(cfg, 8, form)
    n = sum(int(np.prod(s)) for s in jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    assert predictor_bytes(cfg, 8, 2, form) == 2 * n
    with pytest.raises(SparsityError, match="unknown MLP predictor"):
        predictor_shapes(cfg, 8, "quadratic")


def test_rank_only_scores_rank_like_normalized_ones():
    """Decode skips the RMS norm of linear predictors (a positive per-row scale): the per-row top-K
    must not change. The magnitude form is not scale-free and must ignore the flag."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 16)) * np.array([0.01, 1.0, 300.0])[None, :, None], jnp.float32)
    lin = {"a": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal((4, 40)), jnp.float32)}
    fast, full = predictor_logits(lin, x, rank_only=True), predictor_logits(lin, x)
    assert not np.allclose(fast, full)  # the scale really was dropped
    np.testing.assert_array_equal(topk_mask(fast, 10), topk_mask(full, 10))
    mag = {"a": lin["a"], "bg": lin["b"], "bu": lin["b"][::-1], "cg": jnp.zeros(40), "cu": jnp.full((40,), 0.1),
           "bias": jnp.zeros(40), "scale": jnp.ones(1)}
    np.testing.assert_array_equal(predictor_logits(mag, x, rank_only=True), predictor_logits(mag, x))


def test_input_source_pairing():
    assert input_source("mlp", 0, True) == ("block", 0)
    assert input_source("heads", 5, True) == ("block", 4)
    assert input_source("mlp", 5, True) == ("block", 4)
    assert input_source("heads", 5, False) == ("block", 5)
    assert input_source("mlp", 5, False) == ("mlp", 5)


def test_predictor_gather_equals_predictor_mask(tiny):
    cfg, params = tiny
    prompt, _ = tokens_for(cfg, B=1, T=6)
    preds = random_predictors(cfg)
    L = cfg.num_layers
    mk, hk = (cfg.ffn_size // 2,) * L, (2,) * L
    lookahead = cfg.family == "opt"  # one setting per family keeps the test fast; both are covered
    gat = PredictorSelector(preds, mk, hk, cfg.ffn_size, cfg.num_heads, lookahead, gather=True)
    msk = PredictorSelector(preds, mk, hk, cfg.ffn_size, cfg.num_heads, lookahead, gather=False)
    a = decode_steps(params, cfg, prompt, 3, selector=gat, ops=OPS)
    b = decode_steps(params, cfg, prompt, 3, selector=msk)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("transpose", [False, True])
def test_shared_first_matmul_decodes_like_separate_predictors(tiny, transpose):
    """share_first_matmul computes both sites' codes with one matvec (optionally from transposed
    matrices); the selections (hence the logits) are the same as with two. Without lookahead the
    sites read different residuals: unchanged."""
    cfg, params = tiny
    prompt, _ = tokens_for(cfg, B=1, T=6)
    preds = random_predictors(cfg)
    L = cfg.num_layers
    mk, hk = (cfg.ffn_size // 2,) * L, (2,) * L
    sep = PredictorSelector(preds, mk, hk, cfg.ffn_size, cfg.num_heads, True, gather=True)
    shared = share_first_matmul(sep, transpose=transpose)
    D, r = cfg.hidden_size, 16
    assert [a.shape for a in shared.shared_a] == [(r, D) if transpose else (D, r)] * L
    if transpose:
        assert [(b["mlp"].shape, b["heads"].shape) for b in shared.decode_b] == \
            [((cfg.ffn_size, r // 2), (cfg.num_heads, r // 2))] * L
    else:
        assert shared.decode_b is None
    np.testing.assert_allclose(decode_steps(params, cfg, prompt, 3, selector=shared, ops=OPS),
                               decode_steps(params, cfg, prompt, 3, selector=sep, ops=OPS), atol=1e-5, rtol=1e-5)
    no_lookahead = PredictorSelector(preds, mk, hk, cfg.ffn_size, cfg.num_heads, False, gather=True)
    assert share_first_matmul(no_lookahead).shared_a is None


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_blockwise_mlp_topk_gathers_like_its_masks(tiny, backend):
    """mlp_blocks > 1: each block of F / blocks neurons keeps its share of K. The batch-1 decode step
    (shared transposed predictor matvec, then scores + ranking in `code_topk_rows`) equals the
    mask path with the same blocks, and differs from one top-K over the layer."""
    cfg, params = tiny
    prompt, _ = tokens_for(cfg, B=1, T=6)
    preds = random_predictors(cfg)
    L, F = cfg.num_layers, cfg.ffn_size
    mk, hk = (F // 2,) * L, (2,) * L
    blocks = F // 16
    make = lambda gather, b: PredictorSelector(preds, mk, hk, F, cfg.num_heads, True, gather=gather,  # noqa: E731
                                               mlp_blocks=b)
    ops = get_ops(backend)
    blockwise = decode_steps(params, cfg, prompt, 3, selector=share_first_matmul(make(True, blocks)), ops=ops)
    masked = decode_steps(params, cfg, prompt, 3, selector=make(False, blocks))
    np.testing.assert_allclose(blockwise, masked, atol=1e-4, rtol=1e-4)
    one_topk = decode_steps(params, cfg, prompt, 3, selector=share_first_matmul(make(True, 1)), ops=ops)
    assert float(jnp.max(jnp.abs(blockwise - one_topk))) > 1e-3


def test_decode_ranks_both_sites_in_one_kernel(tiny):
    """With the shared transposed matvec and Ops.topk_pair (the default), a layer whose heads and MLP blocks each fit
    one program ranks both in one `code_topk_pair` launch, and gives the mask path's logits; a layer with a
    dense MLP keeps its own heads selection."""
    cfg, params = tiny
    prompt, _ = tokens_for(cfg, B=1, T=6)
    preds = random_predictors(cfg)
    L, F = cfg.num_layers, cfg.ffn_size
    mk, hk = (F,) + (F // 2,) * (L - 1), (2,) * L
    make = lambda gather: PredictorSelector(preds, mk, hk, F, cfg.num_heads, True, gather=gather,  # noqa: E731
                                            mlp_blocks=F // 16)
    pallas, calls = get_ops("pallas"), []

    def counted(name):
        def call(*args, **kwargs):
            calls.append(name)
            return getattr(pallas, name)(*args, **kwargs)
        return call

    ops = dataclasses.replace(pallas, code_topk_pair=counted("code_topk_pair"),
                              code_topk_rows=counted("code_topk_rows"))
    paired = decode_steps(params, cfg, prompt, 3, selector=share_first_matmul(make(True)), ops=ops)
    assert calls == ["code_topk_pair"] * (L - 1)  # traced once per sparse-MLP layer
    calls.clear()
    separate = dataclasses.replace(ops, topk_pair=False)
    np.testing.assert_array_equal(paired, decode_steps(params, cfg, prompt, 3, selector=share_first_matmul(make(True)),
                                                       ops=separate))
    assert calls == ["code_topk_rows"] * (2 * (L - 1))  # heads and MLP, each its own launch
    np.testing.assert_allclose(paired, decode_steps(params, cfg, prompt, 3, selector=make(False)),
                               atol=1e-4, rtol=1e-4)


def test_mlp_topk_block_settings():
    cfg = TINY["opt"].replace(num_layers=3)  # F = 64
    sp = SparsityConfig(mode="predictor", mlp_density=0.25, mlp_topk_block=16)
    assert sp.mlp_topk_blocks(cfg) == 4 and SparsityConfig.from_dict(sp.to_dict()) == sp
    assert SparsityConfig(mode="predictor").mlp_topk_blocks(cfg) == 1
    with pytest.raises(SparsityError, match="does not divide the 64 MLP neurons"):
        SparsityConfig(mode="predictor", mlp_topk_block=24).validate(cfg)
    with pytest.raises(SparsityError, match="predictor and oracle modes"):
        SparsityConfig(mode="threshold", mlp_topk_block=16)
    with pytest.raises(SparsityError, match="must be >= 0"):
        SparsityConfig(mode="predictor", mlp_topk_block=-1)
    preds = Predictors(random_predictors(cfg), {"lookahead": True, "rank": 8,
                                                "model_fingerprint": model_fingerprint(cfg)})
    sel = build_selector(cfg, None, mode="predictor", mlp_density=0.5, predictors=preds, mlp_topk_block=16)
    assert sel.mlp_blocks == 4


def test_selector_is_a_pytree_with_predictor_leaves(tiny):
    cfg, _ = tiny
    preds = random_predictors(cfg)
    sel = PredictorSelector(preds, (4,) * cfg.num_layers, (2,) * cfg.num_layers, cfg.ffn_size, cfg.num_heads)
    leaves, treedef = jax.tree_util.tree_flatten(sel)
    assert len(leaves) == 4 * cfg.num_layers
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.mlp_k == sel.mlp_k and again.lookahead == sel.lookahead


# ------------------------------------------------------------------------------------------
# Lazy KV mode
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_lazy_kv_equals_exact(tiny, backend):
    window = 3
    cfg, params = tiny
    ops = get_ops(backend)
    prompt, _ = tokens_for(cfg, B=1, T=5)
    preds = random_predictors(cfg, seed=3)
    L = cfg.num_layers
    # one head per layer, chosen anew each step: heads go idle and come back, across refreshes
    sel = PredictorSelector(preds, (cfg.ffn_size // 2,) * L, (1,) * L, cfg.ffn_size, cfg.num_heads, True, True)
    n = 9  # three refresh periods
    exact = decode_steps(params, cfg, prompt, n, selector=sel, ops=ops)
    lazy_cache = init_sparse_cache(cfg, 1, 5 + n + 1, jnp.float32, kv_mode="lazy", lazy_window=window)
    lazy = decode_steps(params, cfg, prompt, n, selector=sel, ops=ops, cache=lazy_cache)
    np.testing.assert_allclose(lazy, exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,mlp_norm_in_up,fused_norm", [
    ("xla", False, True), ("pallas", False, True), ("pallas", True, True), ("xla", False, False),
    ("pallas", False, False)])
def test_lazy_kv_fused_attention_inputs_equal_separate_ops(tiny, backend, mlp_norm_in_up, fused_norm):
    """With Ops.fused_step a pre-norm model's gathered lazy-KV step takes its attention inputs from
    one op (`gathered_window_qkv_update`: norm, ring write, Q, window K/V) and must not call the
    separate Q projection or window update; without it, it must not call the fused op. Both decode
    alike, also when the fused run normalises the MLP input inside the up kernel (Ops.mlp_norm_in_up)
    and when XLA normalises and writes the ring before the one op (Ops.fused_norm False)."""
    cfg, params = tiny
    prompt, _ = tokens_for(cfg, B=1, T=5)
    L, n = cfg.num_layers, 6
    sel = PredictorSelector(random_predictors(cfg, seed=4), (cfg.ffn_size // 2,) * L, (2,) * L, cfg.ffn_size,
                            cfg.num_heads, True, True)
    ops = get_ops(backend, fused_step=False)

    def unused(*args, **kwargs):
        raise AssertionError("the fused step called a separate op")

    fused_ops = dataclasses.replace(get_ops(backend, fused_step=True, mlp_norm_in_up=mlp_norm_in_up,
                                            fused_norm=fused_norm),
                                    gathered_head_proj=unused, gathered_window_kv_update=unused)
    qkv = fused_ops.gathered_window_qkv_update

    def qkv_checked(h, *args, **kwargs):  # fused_norm: the op gets the residual, else the normed ring
        assert (h is not None) == fused_norm, f"Ops.fused_norm={fused_norm}: the op got h={h}"
        return qkv(h, *args, **kwargs)

    fused_ops = dataclasses.replace(fused_ops, gathered_window_qkv_update=qkv_checked)
    if mlp_norm_in_up:  # the up kernel must get the norm (and the residual) rather than a normed input
        up = fused_ops.gathered_up

        def up_with_norm(*args, norm=None, **kwargs):
            assert norm is not None, "Ops.mlp_norm_in_up: gathered_up was called without the MLP norm"
            return up(*args, norm=norm, **kwargs)

        fused_ops = dataclasses.replace(fused_ops, gathered_up=up_with_norm)
    separate_ops = dataclasses.replace(ops, gathered_window_qkv_update=unused)
    runs = [decode_steps(params, cfg, prompt, n, selector=sel, ops=o,
                         cache=init_sparse_cache(cfg, 1, 5 + n + 1, jnp.float32, kv_mode="lazy", lazy_window=4))
            for o in (fused_ops, separate_ops)]
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5, rtol=1e-5)


def test_fused_step_defaults():
    """get_ops("pallas") fuses the attention inputs and leaves their norm to XLA (measured fastest at
    every OPT width on the H200, session 10); the XLA references fuse only when asked; ops without
    the fields (e.g. a caller's own) never fuse, and a fused op of theirs normalises."""
    from pallas_kernels import fused_norm_enabled, fused_step_enabled

    auto = get_ops("pallas")
    assert fused_step_enabled(auto) and not fused_norm_enabled(auto)
    assert not fused_step_enabled(get_ops("pallas", fused_step=False))
    assert fused_norm_enabled(get_ops("pallas", fused_norm=True))
    assert not fused_step_enabled(get_ops("xla")) and fused_step_enabled(get_ops("xla", fused_step=True))
    assert not fused_step_enabled(object()) and fused_norm_enabled(object())


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_lazy_kv_skips_idle_heads(tiny, backend):
    """K/V of heads nobody selected (and the round-robin does not refresh) are not written: the saving."""
    cfg, params = tiny
    L, T = cfg.num_layers, 5
    prompt, _ = tokens_for(cfg, B=1, T=T)
    only0 = FixedSelector([None] * L, [np.array([0])] * L, cfg.ffn_size, cfg.num_heads)
    cache = init_sparse_cache(cfg, 1, 16, jnp.float32, kv_mode="lazy", lazy_window=8)
    _, cache = M.forward(params, cfg, prompt, jnp.arange(T)[None], cache)
    # slot T = 5: the round-robin refreshes group 5 % 8 = 5 (past KV: none)
    _, cache = M.forward(params, cfg, prompt[:, :1], jnp.array([[T]]), cache, selector=only0, ops=get_ops(backend))
    k = cache.k[1]  # [B, KV, S, Dh]
    assert float(jnp.abs(k[0, 0, T]).sum()) > 0  # head 0's group written at the new slot
    assert float(jnp.abs(k[0, -1, T]).sum()) == 0  # the last KV group (no selected head) not written
    assert int(cache.index) == T + 1 and cache.win_x[0].shape == (1, 8, cfg.hidden_size)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["head_idx"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class StepHeads:
    """Test selector: query heads head_idx [L, K] (a traced array, so it can change per step), all neurons."""

    head_idx: jax.Array

    def heads(self, ctx):
        return Selection(idx=self.head_idx[ctx.layer])

    def neurons(self, ctx):
        return None


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_lazy_kv_round_robin_refresh_equals_exact(tiny, backend):
    """Heads idle for longer than the window, then used: their K/V older than the window come from
    the round-robin refresh alone (and repeated KV groups, GQA, are handled)."""
    cfg, params = tiny
    window, T, n = 3, 5, 14
    H, L = cfg.num_heads, cfg.num_layers
    prompt, _ = tokens_for(cfg, B=1, T=T)
    # steps 0-6: heads {0, 1}; steps 7-13: the last two heads, idle for 7 > W decode slots before.
    # Llama tiny (H=6, KV=2): both pairs share one KV group each; OPT tiny: four distinct groups.
    first, last = np.array([0, 1]), np.array([H - 2, H - 1])
    schedule = jnp.asarray(np.stack([np.stack([first if i < 7 else last] * L) for i in range(n)]), jnp.int32)
    ops = get_ops(backend)

    def step_selector(i):
        return StepHeads(schedule[i])

    exact = decode_steps(params, cfg, prompt, n, ops=ops, step_selector=step_selector)
    cache = init_sparse_cache(cfg, 1, T + n + 1, jnp.float32, kv_mode="lazy", lazy_window=window)
    lazy = decode_steps(params, cfg, prompt, n, ops=ops, cache=cache, step_selector=step_selector)
    np.testing.assert_allclose(lazy, exact, atol=1e-4, rtol=1e-4)
    dense = decode_steps(params, cfg, prompt, n)
    assert float(jnp.max(jnp.abs(lazy - dense))) > 1e-2  # the selections really changed the outputs


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend (the option is a CUDA-graph setting)")
@pytest.mark.parametrize("family,fused_step,fused_norm", [("opt", False, False), ("opt", True, False),
                                                          ("opt", True, True), ("llama", True, False)])
def test_gpu_concurrent_graph_scheduling_decodes_alike(family, fused_step, fused_norm):
    """The decode loop's CUDA-graph options (generate.DECODE_COMPILER_OPTIONS): concurrent scheduling
    orders kernels by their buffers only, and the whole while loop is one graph. The Pallas kernels
    that write the caches in place must still see every write before them, in every iteration.
    Greedy tokens of a sparse lazy-KV run with predictors and lookahead equal those with the loop on
    the host (HOST_LOOP_OPTIONS), under XLA's defaults (chained kernels, loop on the host) and when
    streamed (a host callback per token, `Generator.on_token`). The Llama case adds RoPE inside the
    fused kernel, GQA and SwiGLU."""
    from dejavu_jax.bench import random_predictor_selector
    from dejavu_jax.generate import HOST_LOOP_OPTIONS, Generator

    shape = dict(vocab_size=512, hidden_size=1024, num_layers=4, num_heads=16, head_dim=64, ffn_size=4096,
                 max_positions=256, eos_token_id=None)
    if family == "opt":
        cfg = ModelConfig(**shape, num_kv_heads=16, norm="layernorm", activation="relu", positions="learned",
                          position_offset=2, attn_bias=True, mlp_bias=True, family="opt", name="mid-opt")
    else:
        cfg = ModelConfig(**shape, num_kv_heads=4, norm="rmsnorm", activation="swiglu", positions="rope",
                          attn_bias=False, mlp_bias=False, tie_embeddings=False, family="llama", name="mid-llama")
    params = M.init_params(cfg, jax.random.PRNGKey(0), jnp.float16)
    sel = random_predictor_selector(cfg, jax.random.PRNGKey(1), mlp_density=0.25, head_density=0.5, rank=64,
                                    dtype=jnp.float16, mlp_topk_block=128)
    ops = get_ops("pallas", fused_step=fused_step, fused_norm=fused_norm)
    prompt = jax.random.randint(jax.random.PRNGKey(2), (1, 32), 3, cfg.vocab_size)
    runs, streamed = [], []
    stream = lambda t: streamed.append(np.array(t))  # noqa: E731
    for options, on_token in ((None, None), (HOST_LOOP_OPTIONS, None), ({}, None), (None, stream)):
        gen = Generator(cfg, selector=sel, ops=ops, decode_options=options, on_token=on_token)
        cache = init_sparse_cache(cfg, 1, 96, jnp.float16, kv_mode="lazy")
        logits, cache, pos = gen.prefill(params, prompt, jnp.ones_like(prompt, bool), cache)
        tokens, _, _ = gen.decode(params, gen._sel_dynamic, cache, logits, pos, jax.random.PRNGKey(0),
                                  max_new_tokens=48)
        runs.append(np.asarray(tokens))
    for run in runs[1:]:
        np.testing.assert_array_equal(runs[0], run)
    np.testing.assert_array_equal(np.stack(streamed, axis=1), runs[0])


def test_generate_lazy_kv_equals_exact_on_a_left_padded_batch(tiny):
    """generate(kv_mode="lazy") with predictors, lookahead and one union index set per step
    (`batching.wrap_selector`): a left-padded batch of three prompts decodes the same greedy tokens
    as the exact KV cache, over more steps than the lazy window (refreshes included)."""
    from dejavu_jax.batching import wrap_selector
    from dejavu_jax.generate import generate

    cfg, params = tiny
    cfg = cfg.replace(eos_token_id=None)
    L = cfg.num_layers
    sel = wrap_selector(PredictorSelector(random_predictors(cfg, seed=5), (cfg.ffn_size // 2,) * L, (2,) * L,
                                          cfg.ffn_size, cfg.num_heads, True, True), batch_select="union")
    prompts = [[5, 17, 33, 8, 60, 12, 9], [44, 3], [30, 31, 32, 33]]
    runs = {kv: generate(params, cfg, prompts, max_new_tokens=20, selector=sel, ops=OPS, kv_mode=kv).tokens
            for kv in ("exact", "lazy")}
    assert runs["lazy"] == runs["exact"]
    dense = generate(params, cfg, prompts, max_new_tokens=20).tokens
    assert dense != runs["exact"]  # the selection really changed the tokens
    with pytest.raises(SparsityError, match="unknown kv_mode"):
        generate(params, cfg, prompts, max_new_tokens=2, kv_mode="paged")


def test_lazy_kv_cache_is_complete_up_to_each_refresh(tiny):
    """The invariant the lazy mode rests on, read off the cache: after decoding with one head only,
    every KV group equals exact mode's cache at every slot up to its last round-robin refresh (the
    selected group: everywhere), and is unwritten after it."""
    cfg, params = tiny
    window, T, n = 3, 4, 10
    L, KV, S = cfg.num_layers, cfg.num_kv_heads, T + 10 + 2
    prompt, _ = tokens_for(cfg, B=1, T=T)
    toks = np.asarray(jax.random.randint(jax.random.PRNGKey(5), (n, 1, 1), 0, cfg.vocab_size))
    only0 = FixedSelector([None] * L, [np.array([0])] * L, cfg.ffn_size, cfg.num_heads)

    @jax.jit
    def run(params, cache):
        _, cache = M.forward(params, cfg, prompt, jnp.arange(T)[None], cache)
        for i in range(n):
            _, cache = M.forward(params, cfg, jnp.asarray(toks[i]), jnp.array([[T + i]]), cache,
                                 selector=only0, ops=OPS)
        return cache

    exact = run(params, init_sparse_cache(cfg, 1, S, jnp.float32))
    lazy = run(params, init_sparse_cache(cfg, 1, S, jnp.float32, kv_mode="lazy", lazy_window=window))
    r = -(-KV // window)
    decoded = np.arange(T, T + n)
    for layer in range(L):
        for g in range(KV):
            if g == 0:
                complete_to = T + n - 1
            else:
                complete_to = decoded[decoded % window == g // r].max()  # g's last refresh
            for cache_kv in ("k", "v"):
                got = np.asarray(getattr(lazy, cache_kv)[layer][0, g])  # [S, Dh]
                want = np.asarray(getattr(exact, cache_kv)[layer][0, g])
                np.testing.assert_allclose(got[:complete_to + 1], want[:complete_to + 1], atol=1e-5, rtol=1e-5)
                assert np.all(got[complete_to + 1:] == 0.0), (layer, g, complete_to)


# ------------------------------------------------------------------------------------------
# Config and bad input
# ------------------------------------------------------------------------------------------
def test_sparsity_config_json_roundtrip_and_schedules():
    cfg = TINY["opt"].replace(num_layers=3)
    sp = SparsityConfig(mode="predictor", mlp_density=0.25, head_density=0.5, dense_first=1, dense_last=1,
                        kv_mode="lazy", lazy_window=8)
    again = SparsityConfig.from_dict(json.loads(sp.to_json()))
    assert again == sp
    assert sp.mlp_schedule(cfg) == (64, 16, 64)
    assert sp.head_schedule(cfg) == (4, 2, 4)
    explicit = SparsityConfig(mode="oracle", mlp_k=[8, 16, 32], head_k=[1, 2, 3])
    assert SparsityConfig.from_dict(explicit.to_dict()).mlp_schedule(cfg) == (8, 16, 32)


def test_choose_kv_mode_lazy_only_for_gathered_multi_head_pallas_steps():
    """auto picks lazy where the Pallas step of a multi-head model reads fewer weights with it (the
    speed measured in README "Session 22"), exact for grouped-query models, masks and XLA; explicit
    modes pass through, unknown ones are refused."""
    from dejavu_jax.config import PRESETS

    mha, gqa = PRESETS["llama-2-7b"], PRESETS["qwen3-8b"]
    assert choose_kv_mode("auto", mha, gathered=True, kernels="pallas") == "lazy"
    assert choose_kv_mode("auto", PRESETS["opt-6.7b"], gathered=True, kernels="pallas") == "lazy"
    assert choose_kv_mode("auto", gqa, gathered=True, kernels="pallas") == "exact"
    assert choose_kv_mode("auto", mha, gathered=False, kernels="pallas") == "exact"
    assert choose_kv_mode("auto", mha, gathered=True, kernels="xla") == "exact"
    for explicit in KV_MODES:
        assert choose_kv_mode(explicit, gqa, gathered=False, kernels="xla") == explicit
    with pytest.raises(SparsityError, match="unknown kv_mode 'paged'; choose one of auto, exact, lazy"):
        choose_kv_mode("paged", mha, gathered=True, kernels="pallas")


@pytest.mark.parametrize("kwargs, match", [
    (dict(mlp_density=0.0), r"mlp_density must be in \(0, 1\]"),
    (dict(mlp_density=1.5), r"mlp_density must be in \(0, 1\]"),
    (dict(head_density=-0.1), r"head_density must be in \(0, 1\]"),
    (dict(mode="sparse"), "unknown sparsity mode"),
    (dict(kv_mode="fast"), "unknown kv_mode"),
    (dict(mlp_k=[8, 16, 999]), "larger than the layer width 64"),
    (dict(head_k=[1, 2, 5]), "larger than the layer width 4"),
    (dict(mlp_k=[8, 16]), "2 entries, the model has 3 layers"),
    (dict(dense_first=2, dense_last=2), "exceeds the 3 layers"),
])
def test_bad_settings_raise_clear_errors(kwargs, match):
    cfg = TINY["opt"].replace(num_layers=3)
    params = None  # settings are validated before any weight is looked at
    args = dict(mode="oracle", mlp_density=0.5)
    args.update(kwargs)
    with pytest.raises(SparsityError, match=match):
        build_selector(cfg, params, **args)


def test_predictor_mode_needs_predictors():
    cfg = TINY["llama"]
    params = M.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    with pytest.raises(SparsityError, match="needs --predictors"):
        build_selector(cfg, params, mode="predictor", mlp_density=0.5)
    assert build_selector(cfg, params, mode="dense") is None
    assert isinstance(build_selector(cfg, params, mode="oracle", mlp_density=0.5), OracleSelector)

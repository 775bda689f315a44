"""Batch > 1 selection (union / per-row), blockwise (per-shard) top-K, and the union statistics."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax import model as M
from dejavu_jax.batching import (
    BatchSelector,
    blockwise_topk_idx,
    blockwise_topk_idx_local,
    blockwise_topk_mask,
    expected_random_union,
    union_stats,
    wrap_selector,
)
from dejavu_jax.bench import random_predictor_selector
from dejavu_jax.config import ModelConfig
from dejavu_jax.sparse import OracleSelector, SparsityError, ThresholdSelector
from pallas_kernels import get_ops

OPS = get_ops("xla")
TINY = {
    "opt": ModelConfig(vocab_size=67, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                       ffn_size=64, max_positions=64, norm="layernorm", activation="relu", positions="learned",
                       position_offset=2, attn_bias=True, mlp_bias=True, family="opt", name="tiny-opt"),
    "llama": ModelConfig(vocab_size=67, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                         ffn_size=48, max_positions=64, norm="rmsnorm", activation="swiglu", positions="rope",
                         tie_embeddings=False, family="llama", name="tiny-llama"),
}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    cfg = TINY[request.param]
    params = M.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    params = jax.tree_util.tree_map(lambda a: a * 6.0 if a.ndim >= 2 else a, params)
    pred = random_predictor_selector(cfg, jax.random.PRNGKey(1), mlp_density=0.5, head_density=0.5, rank=8,
                                     dtype=jnp.float32)
    return cfg, params, pred


def prefill(cfg, params, B, T=8, S=16, seed=3):
    toks = jax.random.randint(jax.random.PRNGKey(seed), (B, T + 1), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T + 1), (B, T + 1))
    _, cache = M.forward(params, cfg, toks[:, :T], pos[:, :T], M.init_cache(cfg, B, S, jnp.float32))
    return toks[:, T:], pos[:, T:], cache


def step(params, cfg, sel, tok, pos, cache):
    return jax.jit(lambda p, s, t, q, c: M.forward(p, cfg, t, q, c, selector=s, ops=OPS)[0])(params, sel, tok, pos,
                                                                                           cache)


# ---------------------------------------------------------------------------- blockwise top-K
@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_blockwise_topk_idx_picks_each_blocks_best(blocks):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=64).astype(np.float32)
    k = 24
    idx = np.asarray(blockwise_topk_idx(jnp.asarray(scores), k, blocks))
    nb, kb = 64 // blocks, -(-k // blocks)
    assert idx.shape == (blocks * kb,) and np.all(np.diff(idx) > 0)
    for s in range(blocks):
        block = idx[s * kb:(s + 1) * kb]
        assert np.all(block // nb == s)
        expect = np.sort(np.argsort(-scores[s * nb:(s + 1) * nb])[:kb]) + s * nb
        np.testing.assert_array_equal(block, expect)
    mask = np.asarray(blockwise_topk_mask(jnp.asarray(scores), k, blocks))
    assert mask.sum() == blocks * kb and mask[idx].all()


def test_blockwise_topk_rejects_uneven_blocks():
    with pytest.raises(SparsityError, match="cannot be split into 3"):
        blockwise_topk_idx(jnp.zeros(64), 8, 3)


def test_local_topk_on_a_one_device_mesh_equals_plain():
    from dejavu_jax.sharding import make_mesh

    scores = jax.random.normal(jax.random.PRNGKey(0), (48,))
    np.testing.assert_array_equal(np.asarray(blockwise_topk_idx_local(scores, 10, make_mesh(1))),
                                  np.asarray(blockwise_topk_idx(scores, 10, 1)))


# ---------------------------------------------------------------------------- selectors in the model
def test_batch_one_equals_predictor_selector(tiny):
    cfg, params, pred = tiny
    tok, pos, cache = prefill(cfg, params, 1)
    ref = step(params, cfg, pred, tok, pos, cache)
    for how in ("union", "per-row"):
        got = step(params, cfg, wrap_selector(pred, batch_select=how), tok, pos, cache)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


def test_one_row_masks_keep_exactly_k_for_large_residuals(tiny):
    """A single row ranks raw logits: with a large residual (unnormalized, as the decode path feeds
    it) a sigmoid would saturate many scores into ties at 1.0 and keep more than K."""
    from dejavu_jax.model import SelectContext

    cfg, params, pred = tiny
    sel = BatchSelector(dataclasses.replace(pred, gather=False))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 3, cfg.hidden_size)) * 1e3, jnp.float32)
    ctx = SelectContext(layer=1, params=params["layers"][1], prev_input=x, block_input=x, mlp_input=x)
    mask = sel.neurons(ctx).mask
    np.testing.assert_array_equal(np.asarray(mask).sum(-1), np.full((1, 3), pred.mlp_k[1]))


def test_union_gather_equals_union_masks(tiny):
    """B=3: the gathered union step (one index set) equals the mask path with the same union sets."""
    cfg, params, pred = tiny
    tok, pos, cache = prefill(cfg, params, 3)
    for combine in ("max", "sum"):
        sel = BatchSelector(pred, "union", combine)
        as_mask = BatchSelector(pred.__class__(**{**pred.__dict__, "gather": False}), "union", combine)
        got = step(params, cfg, sel, tok, pos, cache)
        ref = step(params, cfg, as_mask, tok, pos, cache)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4)
        dense = step(params, cfg, None, tok, pos, cache)
        assert float(jnp.max(jnp.abs(got - dense))) > 1e-2


def test_union_selection_covers_shared_k_rows(tiny):
    cfg, params, pred = tiny
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 1, cfg.hidden_size))
    ctx = M.SelectContext(1, params["layers"][1], x, x, x)
    idx = BatchSelector(pred, "union").neurons(ctx).idx
    assert idx.shape == (pred.mlp_k[1],) and len(np.unique(np.asarray(idx))) == pred.mlp_k[1]
    # identical rows: the union is the single row's own top-K
    same = jnp.broadcast_to(x[:1], x.shape)
    ctx1 = M.SelectContext(1, params["layers"][1], same[:1], same[:1], same[:1])
    ctx3 = M.SelectContext(1, params["layers"][1], same, same, same)
    np.testing.assert_array_equal(np.asarray(BatchSelector(pred, "union").neurons(ctx3).idx),
                                  np.asarray(pred.neurons(ctx1).idx))


def test_per_row_rows_are_independent(tiny):
    """per-row: each row of a B=2 step equals that row decoded alone with its own gathered top-K."""
    cfg, params, pred = tiny
    tok, pos, cache = prefill(cfg, params, 2)
    both = step(params, cfg, BatchSelector(pred, "per-row"), tok, pos, cache)
    for r in range(2):
        one_cache = jax.tree_util.tree_map(lambda a: a[r:r + 1] if a.ndim >= 2 else a, cache)
        alone = step(params, cfg, pred, tok[r:r + 1], pos[r:r + 1], one_cache)
        np.testing.assert_allclose(np.asarray(both[r]), np.asarray(alone[0]), atol=1e-4)


def test_oracle_union_masks_are_shared_by_rows(tiny):
    cfg, params, _ = tiny
    orc = OracleSelector((cfg.ffn_size // 4,) * cfg.num_layers, (cfg.num_heads // 2,) * cfg.num_layers,
                         cfg.ffn_size, cfg.num_heads)
    imp = jax.random.uniform(jax.random.PRNGKey(0), (3, 5, cfg.ffn_size))
    ctx = M.SelectContext(0, params["layers"][0], None, imp)
    keep_u = BatchSelector(orc, "union").neurons(ctx).from_importance(imp)
    keep_r = BatchSelector(orc, "per-row").neurons(ctx).from_importance(imp)
    assert bool(jnp.all(keep_u == keep_u[:1])) and not bool(jnp.all(keep_r == keep_r[:1]))
    assert bool(jnp.all(keep_u.sum(-1) == cfg.ffn_size // 4)) and bool(jnp.all(keep_r.sum(-1) == cfg.ffn_size // 4))


def test_generate_batch_with_union_selector(tiny):
    """The jitted generation loop runs a batch of 3 prompts through the union path."""
    from dejavu_jax.generate import generate

    cfg, params, pred = tiny
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11]]
    out = generate(params, cfg.replace(eos_token_id=None), prompts, max_new_tokens=4,
                   selector=wrap_selector(pred, batch_select="union"), ops=OPS)
    assert [len(t) for t in out.tokens] == [4, 4, 4]
    assert all(0 <= t < cfg.vocab_size for row in out.tokens for t in row)


def test_wrap_selector_errors():
    cfg = TINY["opt"]
    thr = ThresholdSelector(jnp.zeros(2), jnp.zeros(2), (False, False), (False, False))
    assert wrap_selector(None) is None
    assert wrap_selector(thr) is thr  # per-row by construction; unchanged without TP
    with pytest.raises(SparsityError, match="no per-shard top-K"):
        wrap_selector(thr, tp=2)
    orc = OracleSelector((8, 8), (2, 2), cfg.ffn_size, cfg.num_heads)
    with pytest.raises(SparsityError, match="unknown batch selection"):
        BatchSelector(orc, "rows")
    with pytest.raises(SparsityError, match="cannot be split into 3"):
        BatchSelector(orc, "union", blocks=3)


# ---------------------------------------------------------------------------- union statistics
def test_union_stats_against_brute_force():
    rng = np.random.default_rng(1)
    R, T, N, k = 8, 5, 20, 4
    imp = rng.random((R, T, N)).astype(np.float32)
    for b in (1, 2, 4, 8):
        stats = {key: float(v) for key, v in union_stats(jnp.asarray(imp), k, b).items()}
        unions, recalls = [], []
        for g in range(R // b):
            rows = imp[g * b:(g + 1) * b]
            for t in range(T):
                tops = [set(np.argsort(-rows[i, t])[:k]) for i in range(b)]
                unions.append(len(set().union(*tops)) / N)
                norm = rows[:, t] / rows[:, t].mean(-1, keepdims=True)
                fixed = set(np.argsort(-norm.max(0))[:k])
                recalls.append(np.mean([len(top & fixed) / k for top in tops]))
        assert stats["union_density"] == pytest.approx(np.mean(unions), abs=1e-6)
        assert stats["recall_max"] == pytest.approx(np.mean(recalls), abs=1e-6)
        if b == 1:
            assert stats["recall_max"] == stats["recall_sum"] == stats["mass_recall_max"] == pytest.approx(1.0)
    assert expected_random_union(0.25, 2) == pytest.approx(0.4375)


def test_bench_sparse_rows_at_batch_two(tiny):
    """bench's sparse path at batch 2 (union and per-row) times the jitted loop without errors."""
    from dejavu_jax.bench import sparse_rows

    cfg, params, _ = tiny
    for how in ("union", "per-row"):
        rows = sparse_rows(cfg, params, densities=[(0.5, 0.5)], kernels=["xla"], rank=4, kv_modes=["exact"],
                           prompt_len=4, new_tokens=2, reps=1, bw=1.0, extras=False, batch=2, batch_select=how)
        assert len(rows) == 1 and "error" not in rows[0], rows
        assert rows[0]["decode_ms_per_token"] > 0


def test_generate_cli_batch_select_union(tiny_opt_ckpt, tmp_path, capsys):
    import json

    from dejavu_jax.generate import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the capital of france\nhello world, this is\n")
    rc = main(["--model", str(tiny_opt_ckpt), "--prompt-file", str(prompts), "--max-new-tokens", "3", "--mode",
               "oracle", "--mlp-density", "0.5", "--head-density", "0.5", "--batch-select", "union", "--json",
               "--no-chat"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["texts"]) == 2 and out["new_tokens"] >= 2


def test_union_stats_batches_equals_one_at_a_time():
    from dejavu_jax.batching import union_stats_batches

    imp = jax.random.uniform(jax.random.PRNGKey(2), (8, 3, 16))
    together = union_stats_batches(imp, 5, (1, 2, 8))
    for i, b in enumerate((1, 2, 8)):
        for key, v in union_stats(imp, 5, b).items():
            assert float(together[key][i]) == pytest.approx(float(v), abs=1e-6)

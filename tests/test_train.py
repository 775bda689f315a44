"""End to end on tiny random models: collect -> fit predictors -> sparse forward and generate."""

from __future__ import annotations

import gzip
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tokenizer
from dejavu_jax import model as M
from dejavu_jax.checkpoint import load_tokenizer, save_checkpoint
from dejavu_jax.config import ModelConfig
from dejavu_jax.sparse import (PredictorSelector, SparsityError, build_selector, load_predictors, predictor_form,
                               predictor_logits, topk_mask)
from pallas_kernels import get_ops
from train import collect as C
from train import fit_predictors as FP

VOCAB = 97
TINY = {
    "opt": ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                       ffn_size=64, max_positions=128, norm="layernorm", activation="relu", positions="learned",
                       position_offset=2, attn_bias=True, mlp_bias=True, eos_token_id=2, pad_token_id=1,
                       family="opt", name="tiny-opt"),
    "llama": ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         ffn_size=48, max_positions=128, norm="rmsnorm", activation="swiglu", positions="rope",
                         tie_embeddings=False, eos_token_id=2, pad_token_id=1, family="llama", name="tiny-llama"),
}
WORDS = "the capital of france is paris hello world this is a tiny test deja vu sparse decoding".split()


def write_docs(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=rng.integers(20, 60)))}) + "\n")
    return path


@pytest.fixture(scope="module", params=["opt", "llama"])
def ckpt(request, tmp_path_factory):
    cfg = TINY[request.param]
    params = M.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    params = jax.tree_util.tree_map(lambda a: a * 8.0 if a.ndim >= 2 else a, params)
    root = tmp_path_factory.mktemp(request.param)
    model_dir = save_checkpoint(root / "model", cfg, params, tokenizer=make_tokenizer(VOCAB))
    docs = write_docs(root / "docs.jsonl.gz")
    return cfg, params, model_dir, docs, root


def run_pipeline(ckpt, lookahead=True):
    cfg, params, model_dir, docs, root = ckpt
    data = root / "data"
    args = ["--model", str(model_dir), "--data", str(docs), "--out", str(data), "--max-tokens", "1200",
            "--seq-len", "32", "--shard-tokens", "400", "--batch-size", "8"]
    if not (data / "collect.json").exists():
        assert C.main(args) == 0
    pred_dir = root / ("predictors" if lookahead else "predictors_nola")
    if not pred_dir.exists():
        assert FP.main(["--data", str(data), "--model", str(model_dir), "--out", str(pred_dir), "--rank", "16",
                        "--epochs", "8" if lookahead else "2", "--batch-size", "128", "--lr-mlp", "1e-2", "--lr-heads", "1e-2",
                        "--mlp-density", "0.5", "--head-density", "0.5"]
                       + ([] if lookahead else ["--no-lookahead"])) == 0
    return data, pred_dir


def test_collect_shards_resume_and_labels(ckpt):
    cfg, params, model_dir, docs, root = ckpt
    data, _ = run_pipeline(ckpt)
    manifest, shards = C.load_collection(data)
    assert manifest["tokens"] == 1200 and len(shards) == 3
    block = np.concatenate([np.load(s / "block.npy") for s in shards], 1)
    neuron = np.concatenate([np.load(s / "neuron.npy") for s in shards], 1)
    head = np.concatenate([np.load(s / "head.npy") for s in shards], 1)
    assert block.dtype == np.float16 and block.shape == (cfg.num_layers, 1200, cfg.hidden_size)
    assert neuron.shape == (cfg.num_layers, 1200, cfg.ffn_size) and head.shape == (cfg.num_layers, 1200, cfg.num_heads)
    assert np.all(neuron >= 0) and np.all(head >= 0) and np.isfinite(block).all()
    # the stored rows are the model's own record for the first window
    tok = load_tokenizer(model_dir)  # the checkpoint's own tokenizer, as the CLI uses
    first = C.make_windows([tok(C.read_documents(docs)[0])["input_ids"]], 32)[0]
    rec: list = []
    M.forward(params, cfg, jnp.asarray(first)[None], jnp.arange(len(first))[None], record=rec)
    np.testing.assert_allclose(block[1, :len(first)], np.asarray(rec[1]["input"][0]), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(head[0, :len(first)], np.asarray(rec[0]["head_importance"][0]), rtol=2e-3, atol=2e-3)
    # resume: a removed shard is rebuilt identically, finished ones are skipped
    before = np.load(shards[1] / "neuron.npy")
    shutil.rmtree(shards[1])
    with pytest.raises(C.CollectError, match="incomplete"):
        C.load_collection(data)
    stamp = (shards[0] / "meta.json").stat().st_mtime_ns
    assert C.main(["--model", str(model_dir), "--data", str(docs), "--out", str(data), "--max-tokens", "1200",
                   "--seq-len", "32", "--shard-tokens", "400", "--batch-size", "8"]) == 0
    np.testing.assert_array_equal(np.load(shards[1] / "neuron.npy"), before)
    assert (shards[0] / "meta.json").stat().st_mtime_ns == stamp
    # other settings cannot resume into the same directory
    with pytest.raises(SystemExit):
        C.main(["--model", str(model_dir), "--data", str(docs), "--out", str(data), "--max-tokens", "1200",
                "--seq-len", "16"])


def test_fit_report_and_predictor_quality(ckpt):
    cfg, params, model_dir, docs, root = ckpt
    _, pred_dir = run_pipeline(ckpt)
    report = json.loads((pred_dir / "fit_report.json").read_text())
    assert (pred_dir / "fit_report.md").read_text().startswith("# Predictor fit")
    assert report["rank"] == 16 and report["lookahead"] is True
    for kind, n in (("mlp", cfg.ffn_size), ("heads", cfg.num_heads)):
        rec = report["recall"][kind]
        assert len(rec) == cfg.num_layers and all(0.0 <= r <= 1.0 for r in rec)
        k = report["mlp_k" if kind == "mlp" else "head_k"][0]
        assert np.mean(rec) > k / n, (kind, rec)  # better than a random choice of K
    preds = load_predictors(pred_dir, cfg, params)
    assert preds.rank == 16 and len(preds.params) == cfg.num_layers
    assert preds.params[0]["mlp"]["a"].shape == (cfg.hidden_size, 16)
    # gated MLPs get the magnitude form by default, ReLU MLPs the linear one; the checkpoint says which
    form = "linear" if cfg.activation == "relu" else "magnitude"
    assert report["mlp_predictor"] == preds.mlp_predictor == form
    assert predictor_form(preds.params[0]["mlp"]) == form


def test_sparse_forward_and_generate_with_predictors(ckpt):
    from dejavu_jax.generate import generate

    cfg, params, model_dir, docs, root = ckpt
    _, pred_dir = run_pipeline(ckpt)
    toks = jax.random.randint(jax.random.PRNGKey(5), (2, 24), 3, VOCAB)
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    dense, _ = M.forward(params, cfg, toks, pos)
    results = {}
    for mode in ("oracle", "predictor", "threshold"):
        sel = build_selector(cfg, params, mode=mode, mlp_density=0.5, head_density=0.5, predictors=pred_dir)
        logits, _ = M.forward(params, cfg, toks, pos, selector=sel)
        assert np.isfinite(np.asarray(logits)).all()
        results[mode] = float(jnp.mean(jnp.abs(logits - dense)))
    assert all(v > 0 for v in results.values()), results
    # predictor at density 1.0 is exactly dense
    full = build_selector(cfg, params, mode="predictor", predictors=pred_dir)
    np.testing.assert_allclose(M.forward(params, cfg, toks, pos, selector=full)[0], dense, atol=1e-5, rtol=1e-5)
    # generate: the gathered decode path gives the same greedy tokens as the masked one
    prompts = [[5, 9, 11, 17, 23, 8]]
    gat = build_selector(cfg, params, mode="predictor", mlp_density=0.5, head_density=0.5, predictors=pred_dir)
    msk = build_selector(cfg, params, mode="predictor", mlp_density=0.5, head_density=0.5, predictors=pred_dir,
                         gather=False)
    assert isinstance(gat, PredictorSelector) and gat.gather and not msk.gather
    a = generate(params, cfg, prompts, max_new_tokens=6, selector=gat, ops=get_ops("xla"))
    b = generate(params, cfg, prompts, max_new_tokens=6, selector=msk, ops=None)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_lookahead_and_model_mismatch_errors(ckpt):
    cfg, params, model_dir, docs, root = ckpt
    data, pred_dir = run_pipeline(ckpt)
    with pytest.raises(SparsityError, match="trained with lookahead but the run asks for without"):
        build_selector(cfg, params, mode="predictor", mlp_density=0.5, predictors=pred_dir, lookahead=False)
    other = cfg.replace(ffn_size=cfg.ffn_size * 2)
    with pytest.raises(SparsityError, match="trained for another model"):
        build_selector(other, params, mode="predictor", mlp_density=0.5, predictors=pred_dir)
    other_params = M.init_params(cfg, jax.random.PRNGKey(42), jnp.float32)
    with pytest.raises(SparsityError, match="other weights"):
        build_selector(cfg, other_params, mode="predictor", mlp_density=0.5, predictors=pred_dir)
    with pytest.raises(SparsityError, match="no predictors"):
        build_selector(cfg, params, mode="predictor", mlp_density=0.5, predictors=root)
    with pytest.raises(C.CollectError, match="another model"):
        FP.fit_predictors(data, other, None, FP.FitConfig())


def test_no_lookahead_pipeline(ckpt):
    cfg, params, model_dir, docs, root = ckpt
    _, pred_dir = run_pipeline(ckpt, lookahead=False)
    sel = build_selector(cfg, params, mode="predictor", mlp_density=0.5, head_density=0.5, predictors=pred_dir,
                         lookahead=False)
    assert sel.lookahead is False
    toks = jax.random.randint(jax.random.PRNGKey(5), (1, 16), 3, VOCAB)
    logits, _ = M.forward(params, cfg, toks, jnp.arange(16)[None], selector=sel)
    assert np.isfinite(np.asarray(logits)).all()


def test_magnitude_init_is_exact_at_full_rank():
    # Predictor input = the MLP input itself (no lookahead): g and u are linear in norm(x), so the
    # least-squares init at rank D + 1 reproduces them and ranks neurons like the true |silu(g) u|.
    cfg = TINY["llama"]
    D, F, k = cfg.hidden_size, cfg.ffn_size, cfg.ffn_size // 4
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (512, D)) * 3.0, np.float32)
    scale = {"scale": 1.0 + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (D,))}
    w = jax.random.normal(jax.random.PRNGKey(2), (2 * F, D)) / np.sqrt(D)
    h = M.norm(scale, jnp.asarray(x), cfg)
    gu = h @ w.T
    truth = topk_mask(jnp.abs(jax.nn.silu(gu[:, :F]) * gu[:, F:]), k)
    recall = {}
    for rank in (4, D + 1):
        p = FP.magnitude_init(x, h, w, rank, k)
        assert p["a"].shape == (D, rank) and p["bg"].shape == p["bu"].shape == (rank, F)
        recall[rank] = float(jnp.mean(jnp.sum(topk_mask(predictor_logits(p, jnp.asarray(x)), k) & truth, -1) / k))
    assert recall[D + 1] > 0.98 and recall[4] < recall[D + 1], recall


def test_mlp_predictor_choice_and_old_linear_format(ckpt):
    cfg, params, model_dir, docs, root = ckpt
    data, _ = run_pipeline(ckpt)
    base = ["--data", str(data), "--model", str(model_dir), "--rank", "8", "--epochs", "1", "--batch-size", "128"]
    if cfg.activation == "relu":  # no gate: the magnitude form is refused with a readable error
        with pytest.raises(SystemExit):
            FP.main(base + ["--out", str(root / "p_mag"), "--mlp-predictor", "magnitude"])
        with pytest.raises(ValueError, match="needs a gated MLP"):
            FP.FitConfig(mlp_predictor="magnitude").mlp_form(cfg)
        return
    out = root / "p_linear"
    assert FP.main(base + ["--out", str(out), "--mlp-predictor", "linear"]) == 0
    # a checkpoint written before the form was recorded: no "mlp_predictor" key, linear params
    conf = json.loads((out / "predictor_config.json").read_text())
    assert conf.pop("mlp_predictor") == "linear"
    (out / "predictor_config.json").write_text(json.dumps(conf))
    preds = load_predictors(out, cfg, params)
    assert preds.mlp_predictor == "linear" and set(preds.params[0]["mlp"]) == {"a", "b"}
    sel = build_selector(cfg, params, mode="predictor", mlp_density=0.5, predictors=preds)
    toks = jax.random.randint(jax.random.PRNGKey(5), (1, 12), 3, VOCAB)
    logits, _ = M.forward(params, cfg, toks, jnp.arange(12)[None], selector=sel)
    assert np.isfinite(np.asarray(logits)).all()


def test_collect_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(C.CollectError, match=r"bad.jsonl:2: malformed row: not valid JSON"):
        C.read_documents(bad)
    bad.write_text('{"body": "no text"}\n')
    with pytest.raises(C.CollectError, match="no string field 'text'"):
        C.read_documents(bad)
    with pytest.raises(C.CollectError, match="does not exist"):
        C.read_documents(tmp_path / "missing.jsonl.gz")
    with pytest.raises(C.CollectError, match="not a predictor-data directory"):
        C.load_collection(tmp_path)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        FP.FitConfig(rank=0)


def test_sparse_eval_sweep_and_report(ckpt):
    """Sparse eval of every mode through dejavu_jax.eval, then the quality-vs-density report."""
    from dejavu_jax import report as R

    cfg, params, model_dir, docs, root = ckpt
    _, pred_dir = run_pipeline(ckpt)
    out_dir = root / "sweep"
    # a small grid: every compiled (selector, shape) pair costs seconds on a 2-core CPU
    assert R.main(["sweep", "--model", str(model_dir), "--predictors", str(pred_dir), "--tasks", "c4,copa",
                   "--modes", "dense,predictor,threshold", "--limit", "1", "--context-length", "64",
                   "--mlp-densities", "0.5", "--head-densities", "1", "--batch-size", "2",
                   "--out-dir", str(out_dir), "--no-progress"]) == 0
    summary = json.loads((out_dir / "quality_vs_density.json").read_text())
    assert (out_dir / "quality_vs_density.png").stat().st_size > 1000
    assert set(summary["curves"]) == {"ppl_c4", "mean_accuracy"}
    dense = summary["dense"]["ppl_c4"]
    assert np.isfinite(dense) and dense > 1
    for mode in ("predictor", "threshold"):
        pts = dict(summary["curves"]["ppl_c4"]["mlp"][mode])
        assert set(pts) == {0.5} and all(np.isfinite(v) for v in pts.values())
    assert "| predictor | 0.5 | 1 |" in (out_dir / "quality_vs_density.md").read_text()
    # plot alone from the written JSONs, and its bad input
    evals = sorted(out_dir.glob("eval_*.json"))
    assert len(evals) == 1 + 2
    png, js, md = R.plot(R.load_points(evals), root / "again")
    assert png.is_file() and json.loads(js.read_text())["dense"]["ppl_c4"] == dense
    with pytest.raises(R.ReportError, match="not a dejavu_jax.eval JSON"):
        R.point_from_eval({"foo": 1}, "x.json")
    with pytest.raises(R.ReportError, match=r"densities must be in \(0, 1\]"):
        R.parse_densities("0.5,1.5")

"""The latency benchmark's bookkeeping (bytes read per token) and a CPU run of its CLI."""

from __future__ import annotations

import json

import pytest

from dejavu_jax.bench import decode_weight_bytes, main as bench_main, parse_densities, predictor_bytes
from dejavu_jax.config import preset


def test_dense_bytes_are_every_weight_but_the_positions():
    cfg = preset("opt-6.7b")
    pos_embed = (cfg.max_positions + cfg.position_offset) * cfg.hidden_size
    # One embedding row and one position row are read; the tied embedding is read whole as the head.
    expected = (cfg.num_params() - pos_embed + cfg.hidden_size + cfg.hidden_size) * 2
    assert abs(decode_weight_bytes(cfg, 2) - expected) / expected < 1e-3
    assert 13.2e9 < decode_weight_bytes(cfg, 2) < 13.4e9


def test_sparse_bytes_shrink_with_density():
    cfg = preset("opt-6.7b")
    exact = decode_weight_bytes(cfg, 2, 0.25, 0.5, kv_exact=True)
    lazy = decode_weight_bytes(cfg, 2, 0.25, 0.5, kv_exact=False)
    D, F = cfg.hidden_size, cfg.ffn_size
    # lazy reads half of the K/V rows that exact reads: the difference is half of the K/V weights.
    assert exact - lazy == cfg.num_layers * (2 * 16 * 128 * D) * 2
    assert lazy < exact < decode_weight_bytes(cfg, 2)
    assert predictor_bytes(cfg, 128, 2) == cfg.num_layers * 128 * (2 * D + F + 32) * 2


def test_parse_densities():
    assert parse_densities("0.25:0.5,1:1") == [(0.25, 0.5), (1.0, 1.0)]
    with pytest.raises(ValueError, match="expected MLP:HEADS"):
        parse_densities("0.25")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        parse_densities("0:0.5")


def test_cli_dense_and_sparse_on_cpu(tiny_opt_ckpt, tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench_main(["--model", str(tiny_opt_ckpt), "--dtype", "fp32", "--prompt-len", "8", "--new-tokens", "4",
                       "--reps", "1", "--baselines", "none", "--sparse", "0.5:0.5", "--kernels", "xla",
                       "--kv-modes", "exact", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    impls = [r["impl"] for r in result["rows"]]
    assert impls[:2] == ["bandwidth floor (dense weights / copy bandwidth)", "dejavu_jax dense"]
    sparse = [r for r in result["rows"] if "mlp_density" in r]
    assert {r["variant"] for r in sparse} == {"predictor+lookahead", "predictor, no lookahead",
                                             "fixed indices (no predictor)"}
    assert all("error" not in r and r["decode_ms_per_token"] > 0 for r in sparse)
    assert (out / "bench.png").stat().st_size > 0 and "x floor" in (out / "bench.md").read_text()


def test_cli_rejects_bad_flags(tiny_opt_ckpt, tmp_path, capsys):
    for argv, match in [(["--sparse", "2:0.5"], "in (0, 1]"), (["--kernels", "cuda"], "unknown kernels"),
                        (["--new-tokens", "0"], "must be >= 1"), (["--prompt-len", "500"], "exceeds the model's")]:
        with pytest.raises(SystemExit):
            bench_main(["--model", str(tiny_opt_ckpt), "--baselines", "none", "--out", str(tmp_path), *argv])
        assert match in capsys.readouterr().err

"""The latency benchmark's bookkeeping (bytes read per token) and a CPU run of its CLI."""

from __future__ import annotations

import json

import pytest

from dejavu_jax import bench as B
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
    # lazy reads the K/V rows (and biases) of 16 of the 32 KV heads plus ceil(32 / W) = 2 refreshed
    # round-robin at the default window W = 16: 14 heads fewer than exact.
    kv_head = 2 * 128 * D + 2 * 128  # one KV head's K and V rows and biases, in elements
    assert exact - lazy == cfg.num_layers * 14 * kv_head * 2
    assert lazy < exact < decode_weight_bytes(cfg, 2)
    # W = 32 refreshes one head per step; W = 1 every head (capped at KV): exact's bytes.
    assert decode_weight_bytes(cfg, 2, 0.25, 0.5, kv_exact=False, lazy_window=32) == lazy - cfg.num_layers * kv_head * 2
    assert decode_weight_bytes(cfg, 2, 0.25, 0.5, kv_exact=False, lazy_window=1) == exact
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
                                             "fixed indices (no predictor)",
                                             "predictor+lookahead, [D, r] predictor layout"}
    assert all("error" not in r and r["decode_ms_per_token"] > 0 for r in sparse)
    assert (out / "bench.png").stat().st_size > 0 and "x floor" in (out / "bench.md").read_text()


def test_cli_per_block_mlp_topk(tiny_opt_ckpt, tmp_path):
    """--mlp-topk-block: the main predictor rows rank MLP neurons per block; the extras add one top-K per layer."""
    out = tmp_path / "bench"
    assert bench_main(["--model", str(tiny_opt_ckpt), "--dtype", "fp32", "--prompt-len", "8", "--new-tokens", "4",
                       "--reps", "1", "--baselines", "none", "--sparse", "0.5:0.5", "--kernels", "pallas",
                       "--kv-modes", "lazy", "--mlp-topk-block", "16", "--out", str(out)]) == 0
    sparse = [r for r in json.loads((out / "bench.json").read_text())["rows"] if "mlp_density" in r]
    assert all("error" not in r for r in sparse)
    by_variant = {r["variant"]: r for r in sparse}
    # --fused-step auto: the Pallas kernels fuse the attention inputs (Ops.fused_step: the interpreted
    # fused kernel end to end, after XLA's norm) in the main rows; the unfused step, the fused one with
    # the norm inside its kernel and the MLP norm inside the up kernel run as extras.
    main = "predictor+lookahead, MLP top-K per 16 rows, fused step"
    assert [r["variant"] for r in sparse if r["main"]] == [main]
    assert by_variant["predictor+lookahead, one MLP top-K per layer"]["mlp_topk_block"] == 0
    assert by_variant["predictor, no lookahead"]["mlp_topk_block"] == 16
    assert not by_variant["predictor+lookahead, MLP top-K per 16 rows, unfused step"]["main"]
    # ... and the fused step with the norm and ring write inside its kernel (Ops.fused_norm on).
    assert not by_variant["predictor+lookahead, MLP top-K per 16 rows, fused step, attention norm inside"]["main"]
    assert not by_variant[f"{main}, MLP norm inside the up kernel"]["main"]
    # Ops.topk_pair off (heads and MLP blocks ranked in separate launches), beside the default.
    assert not by_variant[f"{main}, top-K of heads and MLP in two launches"]["main"]
    # --fused-step off: the unfused step is the main row and the fused one the extra.
    out_off = tmp_path / "bench-off"
    assert bench_main(["--model", str(tiny_opt_ckpt), "--dtype", "fp32", "--prompt-len", "8", "--new-tokens", "2",
                       "--reps", "1", "--baselines", "none", "--sparse", "0.5:0.5", "--kernels", "pallas",
                       "--kv-modes", "lazy", "--mlp-topk-block", "16", "--fused-step", "off", "--no-extras",
                       "--out", str(out_off)]) == 0
    rows_off = [r for r in json.loads((out_off / "bench.json").read_text())["rows"] if "mlp_density" in r]
    assert [r["variant"] for r in rows_off] == ["predictor+lookahead, MLP top-K per 16 rows"]


def test_cli_rejects_bad_flags(tiny_opt_ckpt, tmp_path, capsys):
    for argv, match in [(["--sparse", "2:0.5"], "in (0, 1]"), (["--kernels", "cuda"], "unknown kernels"),
                        (["--new-tokens", "0"], "must be >= 1"), (["--prompt-len", "500"], "exceeds the model's")]:
        with pytest.raises(SystemExit):
            bench_main(["--model", str(tiny_opt_ckpt), "--baselines", "none", "--out", str(tmp_path), *argv])
        assert match in capsys.readouterr().err


def test_batch_sweep_writes_dense_and_sparse_rows_per_batch(tiny_opt_ckpt, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert bench_main(["--model", str(tiny_opt_ckpt), "--dtype", "fp32", "--prompt-len", "4", "--new-tokens", "2",
                       "--reps", "1", "--baselines", "none", "--batches", "1,2", "--sparse", "0.5:0.5",
                       "--kernels", "xla", "--kv-modes", "exact", "--out", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["complete"] and result["batches"] == [1, 2]
    assert not (out / "bench.json").exists()
    by_batch = {b: [r for r in result["rows"] if r["batch"] == b] for b in (1, 2)}
    for b, rows in by_batch.items():
        assert [("mlp_density" in r) for r in rows] == [False, True]  # dense, then the one sparse point
        for r in rows:
            assert "error" not in r
            assert r["tokens_per_s"] == pytest.approx(b / r["decode_ms_per_token"] * 1e3)
            assert r["floor_ms_per_step"] > 0 and r["decode_temp_bytes"] >= 0
    # union at B=2 reads the sparse weights once for both rows; the reference union density is 1-(1-d)^2
    assert by_batch[2][1]["union_density_if_independent"] == pytest.approx(0.75)
    assert "union_density_if_independent" not in by_batch[1][1]
    assert by_batch[2][0]["kv_bytes_per_step"] == 2 * by_batch[1][0]["kv_bytes_per_step"]
    md = (out / "sweep.md").read_text()
    assert "| 2 | sparse xla, mlp 0.5, heads 0.5 |" in md and "| 1 | dense |" in md and "INCOMPLETE" not in md
    assert (out / "sweep.png").stat().st_size > 0


def test_memory_estimate_refuses_a_run_that_cannot_fit(tiny_opt_ckpt, tmp_path, capsys, monkeypatch):
    import dejavu_jax.bench as B

    cfg = preset("opt-66b")
    est = B.peak_bytes_estimate(cfg, "float16", batch=1, prompt_len=128, new_tokens=128, rank=128)
    assert 131e9 < est["weights"] < 133e9  # fp16 OPT-66B: over the 0.75 default allocator share of 141 GB
    assert est["total"] == est["weights"] + est["kv_caches"] + est["predictors"]
    # the predictors read per token, plus their transposed decode-step copies (same sizes)
    assert est["predictors"] == 2 * B.predictor_bytes(cfg, 128, 2)
    # two caches: k and v per layer, the valid mask [1, 256] and the int32 write index
    assert est["kv_caches"] == 2 * (64 * 2 * 9216 * 256 * 2 + 256 + 4)
    B.check_fits(est["total"], "it", None)  # CPU: no limit reported, nothing checked
    B.check_fits(est["total"], "it", {"bytes_limit": 150 << 30, "bytes_in_use": 0})
    with pytest.raises(B.DeviceMemoryError, match="XLA_CLIENT_MEM_FRACTION"):
        B.check_fits(est["total"], "it", {"bytes_limit": 104 << 30, "bytes_in_use": 0})

    monkeypatch.setattr(B, "device_memory", lambda device=None: {"bytes_limit": 4096, "bytes_in_use": 0})
    with pytest.raises(SystemExit) as exc:
        bench_main(["--model", str(tiny_opt_ckpt), "--baselines", "none", "--prompt-len", "8", "--new-tokens", "4",
                    "--out", str(tmp_path / "b")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "weights + KV caches + predictors need" in err and "XLA_CLIENT_MEM_FRACTION" in err
    assert not (tmp_path / "b").exists()


def test_bench_jax_refuses_decode_temporaries_beyond_free_memory(monkeypatch):
    import jax
    import jax.numpy as jnp

    import dejavu_jax.bench as B
    from dejavu_jax import model as M

    cfg = preset("opt-125m").replace(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                                     ffn_size=64, vocab_size=64, max_positions=64)
    params = M.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    row = B.bench_jax(cfg, params, prompt_len=4, new_tokens=2, reps=1)
    assert row["decode_temp_bytes"] > 0  # the CPU backend reports it, so the check below is not vacuous
    monkeypatch.setattr(B, "device_memory", lambda device=None: {"bytes_limit": 1 << 40,
                                                                 "bytes_in_use": (1 << 40) - 1})
    with pytest.raises(B.DeviceMemoryError, match="decode program's temporaries"):
        B.bench_jax(cfg, params, prompt_len=4, new_tokens=2, reps=1)


def test_scaling_table_speedup_and_efficiency():
    def result(tp, dense_ms, sparse_ms):
        return {"tp": tp, "rows": [
            {"impl": "bandwidth floor (dense weights / copy bandwidth)", "decode_ms_per_token": 10.0 / tp},
            {"impl": "dejavu_jax dense", "prefill_ms": 1.0, "decode_ms_per_token": dense_ms},
            {"impl": "sparse", "mlp_density": 0.25, "head_density": 0.5, "prefill_ms": 1.0,
             "decode_ms_per_token": sparse_ms},
            {"impl": "transformers eager", "error": ["timed out after 9 s"]}]}

    table = B.scaling_table([result(2, 6.0, 4.0), result(1, 10.0, 6.0)]).splitlines()
    assert table[0].startswith("| implementation | TP=1 ms/token | TP=2 ms/token | TP=2 speedup | TP=2 efficiency")
    assert table[2] == "| dejavu_jax dense | 10.000 | 6.000 | 1.67x | 83% |"
    assert table[3] == "| sparse, mlp 0.25, heads 0.5 | 6.000 | 4.000 | 1.50x | 75% |"
    assert len(table) == 4  # the floor and failed rows are not scaled
    with pytest.raises(ValueError, match="TP=1"):
        B.scaling_table([result(2, 6.0, 4.0)])


def test_torch_baselines_past_their_timeout_become_an_error_row():
    rows = B.run_torch_baselines("opt-125m", "fp32", 8, 4, "eager", timeout=1)
    assert rows[-1]["impl"] == "transformers (eager)" and rows[-1]["error"] == ["timed out after 1 s"]


def test_plot_draws_the_finished_transformers_rows(tmp_path):
    from dejavu_jax.bench import plot_sparse, torch_lines

    rows = [{"impl": "dejavu_jax dense", "decode_ms_per_token": 4.0},
            {"impl": "transformers eager", "decode_ms_per_token": 11.8},
            {"impl": "transformers static-compile", "error": "timed out after 300 s"}]
    assert torch_lines(rows) == {"transformers eager": 11.8}
    sparse = [{"main": True, "kernels": "pallas", "kv_mode": "lazy", "mlp_density": 0.25,
               "decode_ms_per_token": 2.4, "floor_ms_per_token": 1.2}]
    plot_sparse(sparse, 4.0, 3.2, "t", tmp_path / "bench.png", baselines=torch_lines(rows))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Conversion round trips and the errors a user sees for bad input."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import save_hf_dir
from convert.__main__ import convert, main as convert_main
from convert.hf import ConversionError, load_hf
from dejavu_jax import model as M
from dejavu_jax.checkpoint import CheckpointError, load_checkpoint, load_tokenizer


def _logits(cfg, params, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(M.forward(params, cfg, jnp.asarray(tokens), positions)[0])


@pytest.mark.parametrize("name,safe", [("opt-pre", True), ("opt-post", False), ("llama-gqa", True),
                                       ("llama-mha", False)])
def test_round_trip_safetensors_and_bin(tmp_path, name, safe):
    hf_dir = tmp_path / "hf"
    model = save_hf_dir(hf_dir, name, safe=safe)
    assert any(hf_dir.glob("*.safetensors" if safe else "*.bin"))
    out = convert(str(hf_dir), tmp_path / "ckpt", progress=False)
    cfg, params = load_checkpoint(out, jnp.float32)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 11))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(_logits(cfg, params, tokens) - ref).max() <= 1e-4
    # Loading back gives bit-identical parameters to converting in memory.
    cfg2, params2, _ = load_hf(str(hf_dir), progress=False)
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(params["layers"][1]["down"]), params2["layers"][1]["down"])
    tok = load_tokenizer(out)
    assert tok is not None and tok.decode(tok("hello world")["input_ids"]) == "hello world"


def test_random_preset_and_dtype(tmp_path):
    out = convert(None, tmp_path / "r", preset="opt-125m", dtype="bf16", progress=False)
    cfg, params = load_checkpoint(out, jnp.bfloat16)
    assert cfg.name == "opt-125m" and params["layers"][0]["q"].shape == (12, 64, 768)
    assert params["embed"].dtype == jnp.bfloat16


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(str(tmp_path / "nope"), tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert(str(tmp_path / "empty"), tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a dejavu_jax checkpoint"):
        load_checkpoint(tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type(tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf_dir(hf_dir, "opt-pre")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="unsupported model_type 'gpt_neox'"):
        convert(str(hf_dir), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_tensor(tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf_dir(hf_dir, "opt-pre")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["ffn_dim"] = 80  # the weights have 64
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"tensor model\.decoder\.layers\.0\.fc1\.(weight|bias) has shape \(64,( 32)?\), expected \(80,( 32)?\)"):
        convert(str(hf_dir), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    """An error while writing the params (after config.json was written) leaves no directory behind."""
    hf_dir = tmp_path / "hf"
    save_hf_dir(hf_dir, "opt-pre")
    import dejavu_jax.checkpoint as ckpt

    def broken_save(path, params):
        (path / "partial").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_params", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert(str(hf_dir), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_missing_tensor_is_reported(tmp_path):
    hf_dir = tmp_path / "hf"
    model = save_hf_dir(hf_dir, "llama-gqa")
    state = {k: v for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    for f in hf_dir.glob("*.safetensors"):
        f.unlink()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, hf_dir / "model.safetensors")
    with pytest.raises(ConversionError, match="layer 1: up is incomplete"):
        convert(str(hf_dir), tmp_path / "out", progress=False)


def test_cli_errors_are_readable(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert_main([str(tmp_path / "missing"), str(tmp_path / "out")])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "ok"
    assert convert_main(["--preset", "opt-125m", str(out), "--dtype", "bf16"]) == 0
    with pytest.raises(SystemExit):
        convert_main(["--preset", "opt-125m", str(out)])
    assert "already exists" in capsys.readouterr().err

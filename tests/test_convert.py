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
                                       ("llama-mha", False), ("llama-rope3", True), ("mistral-swa", True),
                                       ("qwen2-bias", False), ("qwen3-qknorm", True), ("qwen3-yarn", True)])
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
    assert cfg.family == model.config.model_type and cfg.max_positions == (64 if name == "mistral-swa" else 96)
    if name == "qwen2-bias":  # the q/k/v biases arrived; the missing out bias is zeros
        assert np.abs(np.asarray(params["layers"][0]["kv_bias"])).max() > 0.1
        assert not np.asarray(params["layers"][0]["out_bias"]).any()
    if name == "qwen3-qknorm":  # the per-head q/k norm scales arrived (randomised away from 1)
        assert cfg.qk_norm and params["layers"][1]["k_norm"]["scale"].shape == (16,)
        assert np.abs(np.asarray(params["layers"][1]["q_norm"]["scale"]) - 1.0).max() > 0.1


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


def test_rope_scaling(tmp_path):
    """Linear, Llama 3.1-style ("llama3") and YaRN RoPE scaling become per-frequency divisors (and, for
    YaRN, a cos/sin scale) that the checkpoint's config.json keeps; other kinds are refused by name,
    and leave nothing behind."""
    from convert.hf import rope_scaling
    from dejavu_jax.config import ModelConfig, preset
    from dejavu_jax.sparse import model_fingerprint

    assert rope_scaling({"rope_type": "linear", "factor": 2.0}, 8, 1e4, 96) == ((2.0,) * 4, 1.0)
    assert rope_scaling({"rope_type": "default"}, 8, 1e4, 96) == (None, 1.0)
    # Llama-3.1-8B's setting at Dh=128 against transformers' own llama3 frequencies: 29 wavelengths
    # kept, 29 slowed 8x, 6 blended between.
    from transformers import LlamaConfig, Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    f, attention = rope_scaling(scaling, 128, 5e5, 131072)
    f = np.array(f)
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_theta=5e5,
                     rope_scaling=scaling)
    inv_freq = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0].double().numpy()
    np.testing.assert_allclose(1.0 / 5e5 ** (np.arange(0, 128, 2) / 128) / f, inv_freq, rtol=1e-6)
    assert (f == 1.0).sum() == 29 and (f == 8.0).sum() == 29 and np.all(np.diff(f) >= 0) and attention == 1.0
    # YaRN as Qwen3 documents it for 128k tokens, and DeepSeek's mscale form, against transformers.
    for yarn in ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                 {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
                  "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2}):
        f, attention = rope_scaling(dict(yarn, rope_theta=1e6), 128, 1e6, 131072)
        hf = Qwen3Config(hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072,
                         rope_parameters=dict(yarn, rope_theta=1e6))
        inv_freq, hf_attention = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
        np.testing.assert_allclose(1.0 / 1e6 ** (np.arange(0, 128, 2) / 128) / np.array(f),
                                   inv_freq.double().numpy(), rtol=1e-6)
        assert attention == pytest.approx(hf_attention, rel=1e-12) and attention != 1.0
        assert f[0] == 1.0 and f[-1] == pytest.approx(yarn["factor"])  # fast kept, slow interpolated

    hf_dir = tmp_path / "hf"
    save_hf_dir(hf_dir, "llama-rope3")
    cfg = load_checkpoint(convert(str(hf_dir), tmp_path / "ckpt", progress=False), jnp.float32)[0]
    assert cfg.rope_freq_factors[0] == 1.0 and cfg.rope_freq_factors[2:] == (4.0, 4.0)
    assert 1.0 < cfg.rope_freq_factors[1] < 4.0 and ModelConfig.load(tmp_path / "ckpt" / "config.json") == cfg
    # Predictors fitted before the fields existed still match their model (fingerprints pinned then).
    assert model_fingerprint(preset("smollm2-135m")) == "e5fa2aefc55b8d98"
    with pytest.raises(ValueError, match="rope_freq_factors must be 4 positive divisors"):
        cfg.replace(rope_freq_factors=(1.0, 2.0))
    with pytest.raises(ValueError, match="rope_attention_factor must be positive and needs positions='rope'"):
        preset("opt-125m").replace(rope_attention_factor=1.1)

    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "longrope", "factor": 4.0, "rope_theta": 10000.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="rope scaling 'longrope' is not supported"):
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

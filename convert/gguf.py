"""GGUF files (llama.cpp) -> dejavu_jax config, float32 params and a transformers tokenizer.

Tensors are read and dequantized with the `gguf` package (any type it can dequantize: F32, F16,
BF16, Q4_0/Q4_1/Q8_0, K-quants, ...), checked against the shapes the metadata implies, renamed to
Hugging Face Llama names and handed to `convert.hf.hf_tensors_to_params`, so the Llama layout
rules live in one place. Architectures: "llama" (Llama, Mistral, SmolLM2, ...), "qwen2" (the same
with q/k/v biases) and "qwen3" (per-head q/k norms instead of the biases).

Two GGUF conventions to undo:
  * Shapes are listed in ggml's `ne` order (fastest axis first), i.e. reversed from numpy's. A
    Hugging Face `[out, in]` matrix appears as `ne = [in, out]`; error messages show both.
  * For "llama" files, llama.cpp's converter permutes the rows of Q and K inside each head so that its RoPE can rotate
    interleaved pairs (0,1), (2,3), ...; our RoPE (like Hugging Face's) rotates the half-split pairs
    (i, i + Dh/2). `unpermute_rows` restores the Hugging Face row order.

The tokenizer is rebuilt by transformers from the GGUF metadata (vocab, merges, special tokens,
chat template) so it can be saved with `save_pretrained` beside the converted params.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from convert.hf import ConversionError, hf_tensors_to_params, yarn_freq_factors, yarn_mscale
from dejavu_jax.config import ModelConfig
from dejavu_jax.model import Params, check_params

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_MISSING = object()


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------
def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` over `path`, with readable errors for missing or malformed files."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise ConversionError(f"{path} is not a file (expected a .gguf model file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConversionError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors for truncated files
        raise ConversionError(f"could not read GGUF file {path}: {type(e).__name__}: {e}") from e


def metadata(reader, key: str, default: Any = _MISSING) -> Any:
    """One metadata value (str, number, bool or list); `default` if absent, else a ConversionError."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ConversionError(f"GGUF metadata has no {key!r} (required for the conversion)")
        return default
    return field.contents()


def config_from_gguf(reader, name: str = "") -> ModelConfig:
    """`<arch>.*` metadata (llama, qwen2 or qwen3) -> ModelConfig. Raises ConversionError for anything we
    cannot represent."""
    arch = metadata(reader, "general.architecture", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"unsupported GGUF architecture {arch!r} (general.architecture); "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    get = lambda key, default=_MISSING: metadata(reader, f"{arch}.{key}", default)  # noqa: E731
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ConversionError("GGUF models whose value heads differ in width from key heads are not supported")
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ConversionError(f"partial RoPE ({arch}.rope.dimension_count={rope_dims} < head_dim={head_dim}) "
                              f"is not supported")
    # RoPE scaling as per-frequency divisors (ModelConfig.rope_freq_factors): llama.cpp stores Llama
    # 3.1-style scaling as a rope_freqs tensor of divisors, linear scaling and YaRN in the metadata.
    scaling = get("rope.scaling.type", "none") or "none"
    factor = float(get("rope.scaling.factor", 0.0) or 1.0)
    theta = float(get("rope.freq_base", 10000.0))
    if scaling not in ("none", "linear", "yarn") or (scaling == "none" and factor != 1.0):
        raise ConversionError(f"RoPE scaling {scaling!r} ({arch}.rope.scaling.*) is not supported (plain, linear, "
                              f"YaRN and Llama 3.1-style rope_freqs only)")
    attention_factor = 1.0
    if scaling == "yarn":
        # DeepSeek's log multiplier and explicit cos/sin scales change YaRN's scale in ways llama.cpp
        # handles per architecture; the plain YaRN of Qwen and Llama derives everything from the factor.
        if float(get("rope.scaling.yarn_log_multiplier", 0.0)) != 0.0 or any(
                float(get(f"rope.scaling.{k}", 1.0)) != 1.0 for k in ("attn_factor", "yarn_attn_factor")):
            raise ConversionError(f"YaRN with an explicit cos/sin scale ({arch}.rope.scaling.attn_factor, "
                                  f"yarn_attn_factor or yarn_log_multiplier) is not supported")
        original = int(get("rope.scaling.original_context_length"))
        factors = np.array(yarn_freq_factors(head_dim, theta, factor, original,
                                             float(get("rope.scaling.yarn_beta_fast", 32.0)),
                                             float(get("rope.scaling.yarn_beta_slow", 1.0))))
        attention_factor = yarn_mscale(factor)
    else:
        factors = np.full(head_dim // 2, factor if scaling == "linear" else 1.0)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if int(np.prod(freqs.shape)) != head_dim // 2:
            raise ConversionError(f"GGUF tensor rope_freqs.weight has {int(np.prod(freqs.shape))} values; RoPE at "
                                  f"head_dim={head_dim} needs {head_dim // 2}")
        factors = factors * dequantize_tensor(freqs).reshape(-1)
    rope_freq_factors = None if np.all(factors == 1.0) else tuple(float(f) for f in factors)
    if get("expert_count", 0):
        raise ConversionError("mixture-of-experts GGUF models are not supported")
    tensor_names = {t.name for t in reader.tensors}
    vocab = get("vocab_size", None)
    if vocab is None:  # older files: the vocab size is the token list's length
        tokens = metadata(reader, "tokenizer.ggml.tokens", None)
        if tokens is None:
            raise ConversionError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens)
    tok_id = lambda key: metadata(reader, f"tokenizer.ggml.{key}_token_id", None)  # noqa: E731
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, ffn_size=int(get("feed_forward_length")),
        max_positions=int(get("context_length", 2048)), norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), activation="swiglu", positions="rope",
        rope_theta=theta, rope_freq_factors=rope_freq_factors, rope_attention_factor=attention_factor,
        attn_bias="blk.0.attn_q.bias" in tensor_names, mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        pre_norm=True, final_norm=True, tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=tok_id("bos"), eos_token_id=tok_id("eos"), pad_token_id=tok_id("padding"),
        family=arch, name=name or str(metadata(reader, "general.name", "")),
    )


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------
def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. w [n_heads * Dh, ...] (Hugging Face row order out).

    llama.cpp stores, inside each head, the rows of the half-split pairs (i, i + Dh/2) next to each
    other (row 2i and 2i+1). Viewing a head's rows as [Dh/2, 2] (pair, member) and transposing to
    [2, Dh/2] puts the first members of all pairs first again.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    if rows % n_heads or head_dim % 2:
        raise ConversionError(f"cannot un-permute {rows} rows into {n_heads} heads of even width")
    paired = w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])  # [N, Dh/2, 2, ...]
    return paired.swapaxes(1, 2).reshape(w.shape)  # [N, 2, Dh/2, ...] -> [N*Dh, ...]


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (the inverse of `unpermute_rows`); used to write test files."""
    head_dim = w.shape[0] // n_heads
    halves = w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])  # [N, 2, Dh/2, ...]
    return halves.swapaxes(1, 2).reshape(w.shape)


def _tensor_table(cfg: ModelConfig) -> tuple[dict, dict]:
    """GGUF name -> (Hugging Face name, expected numpy shape, heads to un-permute or None).

    Returns (top-level table keyed by full name, per-layer table keyed by the suffix after "blk.N.").
    """
    D, F, H, KV, Dh, V = (cfg.hidden_size, cfg.ffn_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.vocab_size)
    # llama.cpp permutes Q/K rows for its "llama" architecture only (Qwen2 and Qwen3 files keep Hugging
    # Face's half-split rotary order).
    q_heads, k_heads = (H, KV) if cfg.family == "llama" else (None, None)
    top = {
        "token_embd.weight": ("model.embed_tokens.weight", (V, D), None),
        "output_norm.weight": ("model.norm.weight", (D,), None),
        "output.weight": ("lm_head.weight", (V, D), None),
    }
    layer = {
        "attn_q.weight": ("self_attn.q_proj.weight", (H * Dh, D), q_heads),
        "attn_k.weight": ("self_attn.k_proj.weight", (KV * Dh, D), k_heads),
        "attn_v.weight": ("self_attn.v_proj.weight", (KV * Dh, D), None),
        "attn_output.weight": ("self_attn.o_proj.weight", (D, H * Dh), None),
        "attn_norm.weight": ("input_layernorm.weight", (D,), None),
        "ffn_norm.weight": ("post_attention_layernorm.weight", (D,), None),
        "ffn_gate.weight": ("mlp.gate_proj.weight", (F, D), None),
        "ffn_up.weight": ("mlp.up_proj.weight", (F, D), None),
        "ffn_down.weight": ("mlp.down_proj.weight", (D, F), None),
    }
    if cfg.attn_bias:
        layer.update({
            "attn_q.bias": ("self_attn.q_proj.bias", (H * Dh,), q_heads),
            "attn_k.bias": ("self_attn.k_proj.bias", (KV * Dh,), k_heads),
            "attn_v.bias": ("self_attn.v_proj.bias", (KV * Dh,), None),
        })
        if cfg.family != "qwen2":  # Qwen2 has no out bias (hf_tensors_to_params fills zeros)
            layer["attn_output.bias"] = ("self_attn.o_proj.bias", (D,), None)
    if cfg.qk_norm:
        layer.update({
            "attn_q_norm.weight": ("self_attn.q_norm.weight", (Dh,), None),
            "attn_k_norm.weight": ("self_attn.k_norm.weight", (Dh,), None),
        })
    if cfg.mlp_bias:
        layer.update({
            "ffn_gate.bias": ("mlp.gate_proj.bias", (F,), None),
            "ffn_up.bias": ("mlp.up_proj.bias", (F,), None),
            "ffn_down.bias": ("mlp.down_proj.bias", (D,), None),
        })
    return top, layer


_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def _ne(shape: tuple[int, ...]) -> list[int]:
    return list(reversed(shape))


def plan_tensors(reader, cfg: ModelConfig) -> list[tuple[Any, str, int | None]]:
    """Check every GGUF tensor's name and shape against cfg before any dequantization.

    Returns [(reader tensor, Hugging Face name, heads to un-permute or None)] in file order.
    """
    top, layer_table = _tensor_table(cfg)
    plan, seen = [], set()
    for t in reader.tensors:
        m = _LAYER.fullmatch(t.name)
        entry = hf_name = None
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            if layer >= cfg.num_layers:
                raise ConversionError(f"GGUF tensor {t.name} is for layer {layer}, but the metadata says "
                                      f"{cfg.num_layers} layers")
            entry = layer_table.get(suffix)
            hf_name = entry and f"model.layers.{layer}.{entry[0]}"
        elif t.name in top:
            entry = top[t.name]
            hf_name = entry[0]
        if entry is None:
            if t.name == "rope_freqs.weight":  # read into the config (config_from_gguf)
                continue
            raise ConversionError(f"unexpected GGUF tensor {t.name} for a {cfg.family} model")
        expected = entry[1]
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ne order -> numpy order
        if shape != expected:
            raise ConversionError(
                f"GGUF tensor {t.name} has shape ne={_ne(shape)} (numpy {shape}), but the metadata implies "
                f"ne={_ne(expected)} (numpy {expected}); the file's metadata and tensors disagree")
        plan.append((t, hf_name, entry[2]))
        seen.add(t.name)
    required = ["token_embd.weight", "output_norm.weight"]
    required += [f"blk.{i}.{s}" for i in range(cfg.num_layers) for s in layer_table]
    missing = [n for n in required if n not in seen]
    if missing:
        raise ConversionError(f"GGUF file lacks tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return plan


def dequantize_tensor(t) -> np.ndarray:
    """One reader tensor -> float32 numpy array in numpy axis order."""
    import gguf

    try:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ConversionError(f"GGUF tensor {t.name}: {e}") from e
    return np.asarray(data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))


def iter_gguf_tensors(plan) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, float32 array in Hugging Face layout) for a checked plan."""
    for t, hf_name, heads in plan:
        w = dequantize_tensor(t)
        if heads is not None:
            w = unpermute_rows(w, heads)
        yield hf_name, w


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def tokenizer_from_gguf(path: str | Path):
    """A transformers tokenizer (with the chat template, if any) rebuilt from the GGUF metadata."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent.absolute()), gguf_file=path.name)
    except Exception as e:
        raise ConversionError(f"could not build a tokenizer from {path}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def load_gguf(path: str | Path, *, progress: bool = True, tokenizer: bool = True):
    """Read a Llama or Qwen2 GGUF file -> (ModelConfig, float32 numpy params, tokenizer or None).

    Every tensor is dequantized to float32 (Q4_1 SmolLM2-135M: ~0.5 GB). The params pass
    `check_params`. Raises ConversionError for missing/malformed files, other architectures, and
    tensors whose names or shapes disagree with the metadata.
    """
    path = Path(path)
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, name=path.stem)
    plan = plan_tensors(reader, cfg)
    params: Params = hf_tensors_to_params(cfg, iter_gguf_tensors(plan), total=len(plan), progress=progress)
    check_params(params, cfg)
    tok = None
    if tokenizer:
        if "tokenizer.ggml.model" in reader.fields:
            tok = tokenizer_from_gguf(path)
        else:
            warnings.warn(f"{path} has no tokenizer metadata; the conversion has no tokenizer")
    return cfg, params, tok

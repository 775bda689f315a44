"""Hugging Face OPT / Llama / Mistral / Qwen2 / Qwen3 directories (safetensors or pytorch .bin shards) ->
dejavu_jax params.

transformers is used for the config only; tensors are read with safetensors (or torch for .bin),
renamed with one table per family, re-laid out (head-major attention, neuron-major MLP, W2
transposed) and checked against `param_shapes(cfg)` one by one.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from dejavu_jax.config import ModelConfig
from dejavu_jax.model import Params, check_params, param_shapes

SUPPORTED = ("opt", "llama", "mistral", "qwen2", "qwen3")


class ConversionError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
def config_from_hf(hf) -> ModelConfig:
    """transformers PretrainedConfig (or its dict) -> ModelConfig. Raises for unsupported models."""
    d = hf if isinstance(hf, dict) else hf.to_dict()
    model_type = d.get("model_type")
    if model_type == "opt":
        if d.get("activation_function", "relu") != "relu":
            raise ConversionError(f"OPT with activation {d['activation_function']!r} is not supported (relu only)")
        if not d.get("enable_bias", True) or not d.get("layer_norm_elementwise_affine", True):
            raise ConversionError("OPT without biases or without affine LayerNorm is not supported")
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        pre_norm = d.get("do_layer_norm_before", True)
        wed = d.get("word_embed_proj_dim") or hidden
        return ModelConfig(
            vocab_size=d["vocab_size"], hidden_size=hidden, num_layers=d["num_hidden_layers"], num_heads=heads,
            num_kv_heads=heads, head_dim=hidden // heads, ffn_size=d["ffn_dim"],
            max_positions=d["max_position_embeddings"], norm="layernorm", norm_eps=1e-5, activation="relu",
            positions="learned", position_offset=2, attn_bias=True, mlp_bias=True, pre_norm=pre_norm,
            final_norm=pre_norm and not d.get("_remove_final_layer_norm", False),
            word_embed_dim=None if wed == hidden else wed, tie_embeddings=d.get("tie_word_embeddings", True),
            bos_token_id=d.get("bos_token_id"), eos_token_id=_first(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"), family="opt", name=d.get("_name_or_path", "") or "",
        )
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):  # one architecture: RMSNorm, RoPE, GQA, SwiGLU
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConversionError(f"partial RoPE (partial_rotary_factor={d['partial_rotary_factor']}) is not supported")
        max_positions = d["max_position_embeddings"]
        freq_factors, attention_factor = rope_scaling(rope, head_dim, theta, max_positions)
        window = d.get("sliding_window")
        windowed = model_type == "mistral" or d.get("use_sliding_window") or \
            "sliding_attention" in (d.get("layer_types") or ())
        if windowed and window and window < max_positions:
            # Sliding-window attention is full attention while the sequence fits in the window, and
            # this model only has full attention: its context stops at the window.
            max_positions = int(window)
        return ModelConfig(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=head_dim,
            ffn_size=d["intermediate_size"], max_positions=max_positions, norm="rmsnorm",
            norm_eps=d.get("rms_norm_eps", 1e-6), activation="swiglu", positions="rope", rope_theta=theta,
            rope_freq_factors=freq_factors, rope_attention_factor=attention_factor,
            # Qwen2 always has q/k/v biases (and no out bias: the converter fills zeros).
            attn_bias=model_type == "qwen2" or bool(d.get("attention_bias")), mlp_bias=bool(d.get("mlp_bias")),
            qk_norm=model_type == "qwen3",  # Qwen3 normalises every query and key head before RoPE
            pre_norm=True, final_norm=True, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=_first(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"), family=model_type, name=d.get("_name_or_path", "") or "",
        )
    raise ConversionError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


ROPE_SCALINGS = ("default", "linear", "llama3", "yarn")


def rope_scaling(rope: dict, head_dim: int, theta: float, max_positions: int
                 ) -> tuple[tuple[float, ...] | None, float]:
    """A Hugging Face `rope_scaling` / `rope_parameters` dict -> (one divisor per rotary frequency or
    None for plain RoPE, the cos/sin scale): ModelConfig.rope_freq_factors and .rope_attention_factor.
    Only YaRN scales cos and sin; transformers' attention_factor is 1 for the other kinds."""
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if kind == "default":
        return None, 1.0
    if kind == "linear":  # positions divided by the factor = every frequency divided by it
        return (float(rope["factor"]),) * (head_dim // 2), 1.0
    if kind == "llama3":
        factor, low, high = (float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        context = float(rope["original_max_position_embeddings"])
        inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        # Frequencies whose wavelength exceeds context / low are slowed by `factor`, those below
        # context / high are kept, and in between the two blend linearly in context / wavelength.
        blend = np.clip((context * inv_freq / (2 * np.pi) - low) / (high - low), 0.0, 1.0)
        scaled = (1.0 - blend) * inv_freq / factor + blend * inv_freq
        return tuple(float(f) for f in inv_freq / scaled), 1.0
    if kind == "yarn":
        original = int(rope.get("original_max_position_embeddings") or max_positions)
        factor = float(rope.get("factor") or max_positions / original)
        if rope.get("attention_factor") is not None:
            attention = float(rope["attention_factor"])
        elif rope.get("mscale") and rope.get("mscale_all_dim"):  # DeepSeek's form
            attention = yarn_mscale(factor, float(rope["mscale"])) / yarn_mscale(factor, float(rope["mscale_all_dim"]))
        else:
            attention = yarn_mscale(factor)
        divisors = yarn_freq_factors(head_dim, theta, factor, original, float(rope.get("beta_fast") or 32.0),
                                     float(rope.get("beta_slow") or 1.0), bool(rope.get("truncate", True)))
        return divisors, attention
    raise ConversionError(f"Llama rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's cos/sin scale for a context stretched `factor` times (the paper's 0.1 ln s + 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * float(np.log(factor)) + 1.0


def yarn_freq_factors(head_dim: int, theta: float, factor: float, original: int, beta_fast: float = 32.0,
                      beta_slow: float = 1.0, truncate: bool = True) -> tuple[float, ...]:
    """YaRN ("NTK-by-parts") as per-frequency divisors. A frequency that turns more than beta_fast
    times over the original context is kept, one that turns fewer than beta_slow times is divided by
    `factor`, and the rotary dimensions between the two blend linearly."""
    def dim_turning(turns: float) -> float:  # the rotary dimension whose frequency turns `turns` times
        return head_dim * np.log(original / (turns * 2 * np.pi)) / (2 * np.log(theta))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0.0), min(high, head_dim - 1.0)
    if low == high:
        high += 0.001
    kept = 1.0 - np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    # inv_freq * (kept + (1 - kept) / factor), as a divisor of inv_freq
    return tuple(float(f) for f in 1.0 / (kept + (1.0 - kept) / factor))


# --------------------------------------------------------------------------------------------
# Tensor sources
# --------------------------------------------------------------------------------------------
def iter_hf_tensors(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, float32 numpy array) for every tensor in a HF directory's weight shards."""
    st_files = sorted(glob.glob(str(directory / "*.safetensors")))
    if st_files:
        from safetensors import safe_open

        for path in st_files:
            # The "flax" framework reads bf16 too (numpy has no bfloat16).
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    yield name, np.asarray(f.get_tensor(name), dtype=np.float32)
        return
    bin_files = sorted(glob.glob(str(directory / "pytorch_model*.bin")))
    if bin_files:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - torch is present wherever tests run
            raise ConversionError("reading pytorch .bin weights needs torch (pip install torch)") from e
        for path in bin_files:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for name, t in state.items():
                yield name, t.float().numpy()
        return
    raise ConversionError(f"no weights in {directory}: expected *.safetensors or pytorch_model*.bin")


# --------------------------------------------------------------------------------------------
# Name and layout tables
# --------------------------------------------------------------------------------------------
# Each table maps a HF tensor name (prefix "model." stripped; per-layer names after "layers.N.") to
# (destination path in our tree, layout transform). A destination ending in an int is one slice of a
# stacked tensor (kv: axis 0; up / up_bias: axis 1).
Rules = dict[str, tuple[tuple, Callable[[np.ndarray], np.ndarray]]]


def _same(w):
    return w


def _opt_rules(cfg: ModelConfig) -> tuple[Rules, Rules]:
    H, Dh = cfg.num_heads, cfg.head_dim
    heads = lambda w: w.reshape(H, Dh, -1)  # [H*Dh, D] -> [H, Dh, D]  # noqa: E731
    top = {
        "decoder.embed_tokens.weight": (("embed",), _same),
        "decoder.embed_positions.weight": (("pos_embed",), _same),
        "decoder.project_in.weight": (("project_in",), lambda w: w.T),  # [D, E] -> [E, D]
        "decoder.project_out.weight": (("project_out",), lambda w: w.T),
        "decoder.final_layer_norm.weight": (("final_norm", "scale"), _same),
        "decoder.final_layer_norm.bias": (("final_norm", "bias"), _same),
        "lm_head.weight": (("lm_head",), _same),
    }
    layer = [
        ("self_attn.q_proj.weight", ("q",), heads),
        ("self_attn.q_proj.bias", ("q_bias",), lambda b: b.reshape(H, Dh)),
        ("self_attn.k_proj.weight", ("kv", 0), heads),
        ("self_attn.v_proj.weight", ("kv", 1), heads),
        ("self_attn.k_proj.bias", ("kv_bias", 0), lambda b: b.reshape(H, Dh)),
        ("self_attn.v_proj.bias", ("kv_bias", 1), lambda b: b.reshape(H, Dh)),
        ("self_attn.out_proj.weight", ("out",), lambda w: w.T.reshape(H, Dh, -1)),
        ("self_attn.out_proj.bias", ("out_bias",), lambda b: b),
        ("self_attn_layer_norm.weight", ("attn_norm", "scale"), lambda w: w),
        ("self_attn_layer_norm.bias", ("attn_norm", "bias"), lambda w: w),
        ("fc1.weight", ("up", 0), lambda w: w),  # [F, D]: already neuron-major
        ("fc1.bias", ("up_bias", 0), lambda b: b),
        ("fc2.weight", ("down",), lambda w: w.T),  # [D, F] -> [F, D]
        ("fc2.bias", ("down_bias",), lambda b: b),
        ("final_layer_norm.weight", ("mlp_norm", "scale"), lambda w: w),
        ("final_layer_norm.bias", ("mlp_norm", "bias"), lambda w: w),
    ]
    return top, {name: (dest, fn) for name, dest, fn in layer}


def _llama_rules(cfg: ModelConfig) -> tuple[Rules, Rules]:
    H, KV, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    top = {
        "embed_tokens.weight": (("embed",), _same),
        "norm.weight": (("final_norm", "scale"), _same),
        "lm_head.weight": (("lm_head",), _same),
    }
    layer = [
        ("self_attn.q_proj.weight", ("q",), lambda w: w.reshape(H, Dh, -1)),
        ("self_attn.k_proj.weight", ("kv", 0), lambda w: w.reshape(KV, Dh, -1)),
        ("self_attn.v_proj.weight", ("kv", 1), lambda w: w.reshape(KV, Dh, -1)),
        ("self_attn.q_proj.bias", ("q_bias",), lambda b: b.reshape(H, Dh)),
        ("self_attn.k_proj.bias", ("kv_bias", 0), lambda b: b.reshape(KV, Dh)),
        ("self_attn.v_proj.bias", ("kv_bias", 1), lambda b: b.reshape(KV, Dh)),
        ("self_attn.o_proj.weight", ("out",), lambda w: w.T.reshape(H, Dh, -1)),
        ("self_attn.o_proj.bias", ("out_bias",), lambda b: b),
        ("self_attn.q_norm.weight", ("q_norm", "scale"), lambda w: w),
        ("self_attn.k_norm.weight", ("k_norm", "scale"), lambda w: w),
        ("input_layernorm.weight", ("attn_norm", "scale"), lambda w: w),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), lambda w: w),
        ("mlp.gate_proj.weight", ("up", 0), lambda w: w),
        ("mlp.up_proj.weight", ("up", 1), lambda w: w),
        ("mlp.gate_proj.bias", ("up_bias", 0), lambda b: b),
        ("mlp.up_proj.bias", ("up_bias", 1), lambda b: b),
        ("mlp.down_proj.weight", ("down",), lambda w: w.T),
        ("mlp.down_proj.bias", ("down_bias",), lambda b: b),
    ]
    return top, {name: (dest, fn) for name, dest, fn in layer}


def _strip_prefix(name: str) -> str:
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def hf_tensors_to_params(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], *,
                         total: int | None = None, dtype=np.float32, progress: bool = True) -> Params:
    """Assemble our parameter pytree from (HF name, array) pairs, checking every shape."""
    shapes = param_shapes(cfg)
    top_rules, layer_rules = _opt_rules(cfg) if cfg.family == "opt" else _llama_rules(cfg)
    params: Params = {"layers": [{} for _ in range(cfg.num_layers)]}
    stacked_filled: dict[tuple[int, str], set[int]] = {}  # (layer, key) -> slices seen
    layer_marker = "layers."

    def target(tree: dict, shape_tree: dict, dest: tuple, value: np.ndarray, label: str, layer: int = -1):
        key, rest = dest[0], dest[1:]
        if key not in shape_tree:
            raise ConversionError(f"{label}: the config has no parameter {key!r} for it")
        expected = shape_tree[key]
        if isinstance(expected, dict):  # norm {"scale", "bias"}
            sub = tree.setdefault(key, {})
            return target(sub, expected, rest, value, label, layer)
        if rest:  # one slice of a stacked tensor along its stacking axis
            axis = 0 if key in ("kv", "kv_bias") else 1
            if key not in tree:
                tree[key] = np.zeros(expected, dtype)
            slice_shape = tuple(s for i, s in enumerate(expected) if i != axis)
            if value.shape != slice_shape:
                raise ConversionError(f"tensor {label} has shape {value.shape}, expected {slice_shape} "
                                      f"(from the config) for {key}[{rest[0]}]")
            index = (slice(None),) * axis + (rest[0],)
            tree[key][index] = value
            stacked_filled.setdefault((layer, key), set()).add(rest[0])
            return
        if value.shape != tuple(expected):
            raise ConversionError(f"tensor {label} has shape {value.shape}, expected {tuple(expected)} "
                                  f"(from the config) for {key}")
        tree[key] = value.astype(dtype)

    for name, array in tqdm(tensors, total=total, desc="converting", unit="tensor", disable=not progress):
        short = _strip_prefix(name)
        if short in top_rules:
            dest, fn = top_rules[short]
            if dest == ("lm_head",) and cfg.tie_embeddings:
                continue  # tied: the embedding is the head
            # Reshape failures (wrong sizes) surface as the expected-shape error below.
            target(params, shapes, dest, _safe(fn, array), name)
        elif short.startswith(("decoder." + layer_marker, layer_marker)):
            rest = short.split(layer_marker, 1)[1]
            index_str, suffix = rest.split(".", 1)
            layer = int(index_str)
            if layer >= cfg.num_layers:
                raise ConversionError(f"tensor {name} is for layer {layer}, but the config has {cfg.num_layers}")
            if suffix not in layer_rules:
                if suffix.endswith("rotary_emb.inv_freq"):
                    continue
                raise ConversionError(f"unexpected tensor {name} for a {cfg.family} model")
            dest, fn = layer_rules[suffix]
            target(params["layers"][layer], shapes["layers"][layer], dest, _safe(fn, array), name, layer)
        elif short.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise ConversionError(f"unexpected tensor {name} for a {cfg.family} model")
    if cfg.family == "qwen2":  # q/k/v have biases, o_proj has none
        for lp in params["layers"]:
            lp.setdefault("out_bias", np.zeros(cfg.hidden_size, dtype))
    for (layer, key), seen in stacked_filled.items():
        n = shapes["layers"][layer][key][0 if key in ("kv", "kv_bias") else 1]
        if len(seen) != n:
            raise ConversionError(f"layer {layer}: {key} is incomplete (got parts {sorted(seen)} of {n}); "
                                  f"a k/v or gate/up tensor is missing")
    check_params(params, cfg)
    return params


def _safe(fn, array):
    try:
        return fn(array)
    except ValueError:
        return array  # a reshape that cannot apply: let the shape check name the tensor


def resolve_source(source: str) -> Path:
    """A local HF directory, or a hub id downloaded when the network allows."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{source} is a file; expected a Hugging Face model directory (or a .gguf file)")
        return path
    if source.count("/") == 1 and not source.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as e:
            raise ConversionError(f"{source!r} is not a local directory and could not be fetched from the "
                                  f"Hugging Face hub ({type(e).__name__}: {e})") from e
    raise ConversionError(f"model directory {source} does not exist")


def load_hf(source: str, *, progress: bool = True) -> tuple[ModelConfig, Params, Path]:
    """Read a HF OPT/Llama directory (or hub id) -> (config, float32 numpy params, directory)."""
    directory = resolve_source(source)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{directory} has no config.json: not a Hugging Face model directory")
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
    tensors = list(iter_hf_tensors(directory))
    params = hf_tensors_to_params(cfg, iter(tensors), total=len(tensors), progress=progress)
    return cfg, params, directory


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


def tokenizer_files(directory: Path) -> dict[str, Path]:
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


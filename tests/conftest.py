"""Shared fixtures: tiny random Hugging Face models (the torch parity oracle) and their conversions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

TINY_CONFIGS = {
    # pre-LayerNorm OPT, like 125m..66b
    "opt-pre": dict(kind="opt", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    ffn_dim=64, max_position_embeddings=96, do_layer_norm_before=True, word_embed_proj_dim=32),
    # post-LayerNorm OPT with project_in/out, like 350m
    "opt-post": dict(kind="opt", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     ffn_dim=64, max_position_embeddings=96, do_layer_norm_before=False, word_embed_proj_dim=16),
    "llama-gqa": dict(kind="llama", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=96,
                      tie_word_embeddings=False),
    "llama-mha": dict(kind="llama", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=48, max_position_embeddings=96,
                      tie_word_embeddings=True),
    # Llama 3.1-style RoPE scaling; the 4 rotary frequencies (Dh=8) are kept, blended, scaled, scaled.
    "llama-rope3": dict(kind="llama", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=96,
                        tie_word_embeddings=True,
                        rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=64)),
    # Not in tiny_pair (same architecture as llama-gqa): converted round trips only.
    # Mistral's sliding window (64) below max_position_embeddings caps our context at 64.
    "mistral-swa": dict(kind="mistral", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=96, sliding_window=64),
    # Qwen2: q/k/v biases (randomised: transformers initialises them to zero), no out bias, tied head.
    "qwen2-bias": dict(kind="qwen2", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=96,
                       tie_word_embeddings=True),
    # Qwen3: RMSNorm over every query and key head before RoPE (scales randomised), and heads wider
    # than hidden_size / num_attention_heads (H * Dh = 64 != 32), as in the real Qwen3 sizes.
    "qwen3-qknorm": dict(kind="qwen3", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=48, max_position_embeddings=96,
                         tie_word_embeddings=False),
    # Not in tiny_pair: YaRN (frequencies kept, blended and interpolated 4x over an original context
    # of 24; cos and sin scaled by 1 + 0.1 ln 4). Converted round trips only.
    "qwen3-yarn": dict(kind="qwen3", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=48, max_position_embeddings=96,
                       tie_word_embeddings=False,
                       rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=24)),
}
PAIR_CONFIGS = ["opt-pre", "opt-post", "llama-gqa", "llama-mha", "llama-rope3", "qwen3-qknorm"]


@pytest.fixture(autouse=True, scope="session")
def full_fp32_matmuls_on_gpu():
    """GPUs run fp32 matmuls as TF32 by default (~1e-3 relative error): the fp32 comparisons here
    (sparse vs dense, lazy vs exact KV, kernels vs references) are meant at full fp32. No effect on CPU."""
    if jax.default_backend() != "gpu":
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield


def make_hf_model(name: str, seed: int = 0):
    """A tiny random transformers model (fp32, eval mode) with weights large enough to give varied tokens."""
    import torch
    import transformers

    spec = dict(TINY_CONFIGS[name])
    kind = spec.pop("kind")
    torch.manual_seed(seed)
    if kind == "opt":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(**spec, init_std=0.2, eos_token_id=2,
                                                                   bos_token_id=2, pad_token_id=1))
    else:
        prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
        config = getattr(transformers, prefix + "Config")(**spec, initializer_range=0.2, eos_token_id=2, bos_token_id=1)
        model = getattr(transformers, prefix + "ForCausalLM")(config)
        with torch.no_grad():
            for tensor_name, tensor in model.named_parameters():
                if tensor_name.endswith(".bias"):
                    tensor.normal_(0.0, 0.2)
                elif tensor_name.endswith(("q_norm.weight", "k_norm.weight")):
                    tensor.copy_(1.0 + 0.3 * torch.randn_like(tensor))
    return model.eval()


def hf_to_jax(model):
    """Convert an in-memory transformers model with our converter -> (cfg, params as jnp fp32)."""
    from convert.hf import config_from_hf, hf_tensors_to_params

    cfg = config_from_hf(model.config)
    tensors = ((k, v.detach().float().numpy()) for k, v in model.state_dict().items())
    params = hf_tensors_to_params(cfg, tensors, progress=False)
    return cfg, jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="session", params=PAIR_CONFIGS)
def tiny_pair(request):
    """(name, torch model, cfg, params) for each tiny family variant."""
    model = make_hf_model(request.param)
    cfg, params = hf_to_jax(model)
    return request.param, model, cfg, params


def make_tokenizer(vocab_size: int = 97):
    """A real byte-level BPE tokenizer trained offline on a few sentences (transformers fast tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the capital of france is paris", "hello world, this is a tiny test", "deja vu sparse decoding"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 3, special_tokens=["<unk>", "<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60])
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def save_hf_dir(path, name: str = "opt-pre", safe: bool = True):
    """save_pretrained a tiny model (safetensors or pytorch .bin) with a tokenizer; returns the model."""
    import torch

    model = make_hf_model(name)
    model.save_pretrained(path)
    if not safe:  # transformers 5 always writes safetensors; write the legacy pytorch .bin layout by hand
        for f in path.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    make_tokenizer(model.config.vocab_size).save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-opt"
    save_hf_dir(path)
    return path


@pytest.fixture(scope="session")
def tiny_opt_ckpt(tiny_opt_dir, tmp_path_factory):
    """The tiny OPT converted to a dejavu_jax checkpoint directory (fp32)."""
    from convert.__main__ import convert

    return convert(str(tiny_opt_dir), tmp_path_factory.mktemp("ckpt") / "tiny-opt", progress=False)

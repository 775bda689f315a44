"""Hugging Face transformers baselines for `dejavu_jax.bench`, run in their own process.

Running torch in a separate process keeps its allocator and JAX's from competing for the GPU, and
lets each baseline see the whole device. Prints one JSON object per line on stdout.

    python -m dejavu_jax.bench_torch --preset opt-6.7b --dtype fp16 --prompt-len 128 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def hf_config_for(cfg):
    """Our ModelConfig -> a transformers config of the same shape."""
    from transformers import LlamaConfig, OPTConfig, Qwen3Config

    if cfg.family == "opt":
        return OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, ffn_dim=cfg.ffn_size,
                         max_position_embeddings=cfg.max_positions, do_layer_norm_before=cfg.pre_norm,
                         word_embed_proj_dim=cfg.embed_dim, eos_token_id=cfg.eos_token_id,
                         bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id)
    # Qwen3 is Llama with per-head q/k norms; Qwen2's q/k/v biases are Llama's attention_bias.
    return (Qwen3Config if cfg.qk_norm else LlamaConfig)(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.ffn_size, max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attn_bias)


def time_generate(model, input_ids, new_tokens: int, reps: int, sync) -> dict:
    """Median wall time of generate(new_tokens) and generate(1); decode ms/token from the difference."""
    def run(n):
        sync()
        t0 = time.perf_counter()
        model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up (and torch.compile's graph capture)
        run(new_tokens)
    full = statistics.median(run(new_tokens) for _ in range(reps))
    first = statistics.median(run(1) for _ in range(reps))
    return {"prefill_ms": first * 1e3, "decode_ms_per_token": (full - first) / (new_tokens - 1) * 1e3,
            "total_s": full}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dejavu_jax.bench_torch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default="eager,static-compile",
                   help="comma list of eager, static-compile; 'copy' alone measures only the copy bandwidth")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from dejavu_jax.config import preset

    cfg = preset(args.preset)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = [v for v in args.variants.split(",") if v != "copy"]
    if device == "cuda":
        print(json.dumps({"impl": "torch device copy", "copy_bandwidth_gbs": copy_bandwidth_gbs()}), flush=True)
    if not variants:  # only the copy bandwidth was asked for
        return 0
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config_for(cfg), torch_dtype=dtype).eval()
    input_ids = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for variant in variants:
        if variant == "static-compile":
            # transformers compiles the forward itself (CUDA graphs, fullgraph) when generate runs with a
            # static cache on a GPU; wrapping it in torch.compile by hand breaks its cache updates.
            model.generation_config.cache_implementation = "static"
        elif variant != "eager":
            raise SystemExit(f"unknown variant {variant!r}")
        with torch.inference_mode():
            result = time_generate(model, input_ids, args.new_tokens, args.reps, sync)
        compiled = bool(getattr(model, "_compiled_call", None))
        print(json.dumps({"impl": f"transformers {variant}", "torch": torch.__version__, "compiled": compiled,
                          **result}), flush=True)
    return 0


def copy_bandwidth_gbs(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """cudaMemcpy device-to-device bandwidth, counting bytes read plus bytes written."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times) / 1e9


if __name__ == "__main__":
    sys.exit(main())

"""Batch-1 decode latency: our JAX decoder next to transformers and the bandwidth floor, in one run.

    python -m dejavu_jax.bench --preset opt-6.7b --dtype fp16 --prompt-len 128 --new-tokens 128
    python -m dejavu_jax.bench --model checkpoints/opt-125m --baselines none

Prefill and decode are reported separately. Decode ms/token is the time of the jitted decode loop
(`new_tokens` steps, EOS disabled) divided by the steps. The floor is the bytes one decode step
must read (every weight once) over the device copy bandwidth measured in the same run.
Writes `bench.json` and `bench.md` into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch baselines share the GPU after us

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.config import ModelConfig, preset
from dejavu_jax.generate import Generator

REPO_ROOT = Path(__file__).resolve().parent.parent


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written (as REFERENCE.md does)."""
    x = jnp.ones((nbytes // 2,), jnp.float16)
    copy = jax.jit(lambda a: a + jnp.float16(1))
    copy(x).block_until_ready()
    t = _median_time(lambda: copy(x), reps)
    return 2 * nbytes / t / 1e9


def decode_weight_bytes(cfg: ModelConfig, itemsize: int, mlp_density: float = 1.0, head_density: float = 1.0,
                        kv_exact: bool = True) -> int:
    """Bytes of weights one batch-1 decode step reads (one embedding row; the whole LM head)."""
    D, F, H, KV, Dh, E = cfg.hidden_size, cfg.ffn_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    k_neurons = max(1, round(mlp_density * F))
    k_heads = max(1, round(head_density * H))
    kv_heads = KV if kv_exact else max(1, round(head_density * KV))
    per_layer = (2 * k_heads * Dh * D + 2 * kv_heads * Dh * D + (cfg.up_rows + 1) * k_neurons * D)
    per_layer_bias = (k_heads * Dh + 2 * KV * Dh + D) * cfg.attn_bias + (k_neurons * cfg.up_rows + D) * cfg.mlp_bias
    per_layer += per_layer_bias + 4 * D  # norms
    total = cfg.num_layers * per_layer + cfg.vocab_size * E + E + D  # LM head (tied or not) + embedding row
    if cfg.has_projections:
        total += 2 * E * D
    return total * itemsize


def bench_jax(cfg: ModelConfig, params, *, prompt_len: int, new_tokens: int, batch: int = 1, selector=None,
              ops=None, reps: int = 5) -> dict:
    """Prefill ms and decode ms/token of our jitted path (compile excluded, medians of reps)."""
    cfg = cfg.replace(eos_token_id=None)  # decode exactly new_tokens steps
    gen = Generator(cfg, selector=selector, ops=ops)
    dtype = params["layers"][0]["up"].dtype
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    valid = jnp.ones((batch, prompt_len), bool)
    max_len = -(-(prompt_len + new_tokens) // 64) * 64
    key = jax.random.PRNGKey(0)
    new_cache = lambda: M.init_cache(cfg, batch, max_len, dtype)  # noqa: E731

    t0 = time.perf_counter()
    logits, cache, pos = gen.prefill(params, tokens, valid, new_cache())
    out, _, cache = gen.decode(params, gen._sel_dynamic, cache, logits, pos, key, max_new_tokens=new_tokens)
    out.block_until_ready()
    compile_s = time.perf_counter() - t0

    caches = [new_cache() for _ in range(reps)]
    prefill_times = []
    for c in caches:
        t0 = time.perf_counter()
        logits, c2, pos = gen.prefill(params, tokens, valid, c)
        logits.block_until_ready()
        prefill_times.append(time.perf_counter() - t0)
    decode_times = []
    for _ in range(reps):
        logits, cache, pos = gen.prefill(params, tokens, valid, new_cache())
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        out, _, cache = gen.decode(params, gen._sel_dynamic, cache, logits, pos, key, max_new_tokens=new_tokens)
        out.block_until_ready()
        decode_times.append(time.perf_counter() - t0)
    return {"prefill_ms": statistics.median(prefill_times) * 1e3,
            "decode_ms_per_token": statistics.median(decode_times) / new_tokens * 1e3,
            "compile_s": compile_s}


def run_torch_baselines(preset_name: str, dtype: str, prompt_len: int, new_tokens: int, variants: str,
                        timeout: int = 1200) -> list[dict]:
    cmd = [sys.executable, "-m", "dejavu_jax.bench_torch", "--preset", preset_name, "--dtype", dtype,
           "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--variants", variants]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        rows.append({"impl": f"transformers ({variants})", "error": proc.stderr.strip().splitlines()[-1:]})
    return rows


def markdown_table(rows: list[dict], floor_ms: float) -> str:
    lines = ["| implementation | prefill ms | decode ms/token | x floor |", "|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | failed: {r['error']} | | |")
            continue
        lines.append(f"| {r['impl']} | {r.get('prefill_ms', float('nan')):.2f} | {r['decode_ms_per_token']:.3f} | "
                     f"{r['decode_ms_per_token'] / floor_ms:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dejavu_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="random weights at a preset's shapes (e.g. opt-6.7b)")
    src.add_argument("--model", help="a checkpoint directory")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--baselines", default="eager,static-compile",
                   help="comma list of transformers variants to time (eager, static-compile) or 'none'")
    p.add_argument("--out", default="results/bench", help="directory for bench.json and bench.md")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dejavu_jax.checkpoint import load_checkpoint, parse_dtype

    dtype = parse_dtype(args.dtype)
    for name in ("prompt_len", "new_tokens", "batch", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        if args.preset:
            cfg = preset(args.preset)
            params = M.init_params(cfg, jax.random.PRNGKey(0), dtype)
        else:
            cfg, params = load_checkpoint(args.model, dtype)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if args.prompt_len + args.new_tokens > cfg.max_positions:
        parser.error(f"prompt-len + new-tokens exceeds the model's {cfg.max_positions} positions")
    device = jax.devices()[0].device_kind
    bw = copy_bandwidth_gbs()
    weight_bytes = decode_weight_bytes(cfg, jnp.dtype(dtype).itemsize)
    floor_ms = weight_bytes / (bw * 1e9) * 1e3
    print(f"{cfg.name or args.model} on {device}: {weight_bytes / 1e9:.2f} GB of weights per token, "
          f"copy bandwidth {bw:.0f} GB/s -> floor {floor_ms:.3f} ms/token", flush=True)
    rows = [{"impl": "bandwidth floor (dense weights / copy bandwidth)", "decode_ms_per_token": floor_ms}]
    jax_row = bench_jax(cfg, params, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
                        reps=args.reps)
    rows.append({"impl": "dejavu_jax dense", **jax_row})
    print(json.dumps(rows[-1]), flush=True)
    del params
    if args.baselines != "none" and args.preset:
        if args.batch != 1:
            print("transformers baselines run at batch 1 only; skipped", file=sys.stderr)
        else:
            for r in run_torch_baselines(args.preset, args.dtype, args.prompt_len, args.new_tokens, args.baselines):
                print(json.dumps(r), flush=True)
                if "copy_bandwidth_gbs" in r:  # cudaMemcpy beats an XLA copy: the stricter floor
                    bw = max(bw, r["copy_bandwidth_gbs"])
                    floor_ms = weight_bytes / (bw * 1e9) * 1e3
                    rows[0]["decode_ms_per_token"] = floor_ms
                else:
                    rows.append(r)
    result = {"model": cfg.name or args.model, "device": device, "dtype": args.dtype, "batch": args.batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "copy_bandwidth_gbs": bw,
              "weight_bytes_per_token": weight_bytes, "floor_ms_per_token": floor_ms, "rows": rows,
              "jax": jax.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(rows, floor_ms)
    header = (f"{result['model']}, {args.dtype}, batch {args.batch}, prompt {args.prompt_len}, "
              f"{args.new_tokens} new tokens, {device}, jax {jax.__version__}\n\n")
    (out / "bench.md").write_text(header + table + "\n")
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

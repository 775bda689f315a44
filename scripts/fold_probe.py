"""Probe: the pre-norms folded into the projections (`model.fold_norms`) against the model as it is,
dense decode, in one process, alternating rounds. GPU only.

The dense step normalises the residual in two launches (statistics, then normalise) before the Q/K/V
and up matmuls. Folded, the matmuls read the raw residual and the statistics are applied in their
epilogue (`model.PreNorm`): one launch fewer per norm on the critical path, if XLA fuses the
epilogue. Random weights at the preset's shapes with random norm scales and biases; before timing,
greedy tokens and first-step logits of the two forms are compared.

    python scripts/fold_probe.py --preset opt-6.7b --out DIR  ->  DIR/fold.{json,md} (+ DIR/hlo_*.txt with --hlo)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dejavu_jax import bench as B  # noqa: E402
from dejavu_jax import model as M  # noqa: E402
from dejavu_jax.checkpoint import parse_dtype  # noqa: E402
from dejavu_jax.config import preset  # noqa: E402
from dejavu_jax.generate import Generator  # noqa: E402
from dejavu_jax.sparse import init_sparse_cache  # noqa: E402


def random_norms(params, key):
    """Norm scales 1 + 0.1 N(0, 1) and biases 0.1 N(0, 1) (init_params makes scales exactly one)."""
    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        if "norm" not in name:
            return a
        k = jax.random.fold_in(key, abs(hash(name)) % (1 << 30))
        noise = 0.1 * jax.random.normal(k, a.shape, jnp.float32)
        return ((1.0 if name.endswith("['scale']") else 0.0) + noise).astype(a.dtype)
    return jax.tree_util.tree_map_with_path(leaf, params)


def compare(cfg, plain, folded, prompt_len: int, steps: int) -> dict:
    """Greedy tokens and first-step logits of the two parameter forms."""
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    valid = jnp.ones_like(tokens, bool)
    cfg = cfg.replace(eos_token_id=None)
    gen = Generator(cfg)
    dtype = plain["layers"][0]["up"].dtype
    outs = {}
    for name, params in (("plain", plain), ("folded", folded)):
        cache = init_sparse_cache(cfg, 1, B.cache_len(prompt_len, steps), dtype)
        logits, cache, pos = gen.prefill(params, tokens, valid, cache)
        out, _, _ = gen.decode(params, gen._sel_dynamic, cache, logits, pos, jax.random.PRNGKey(0),
                               max_new_tokens=steps)
        outs[name] = (np.asarray(logits, np.float32), np.asarray(out))
    (la, ta), (lb, tb) = outs["plain"], outs["folded"]
    return {"first_logits_max_abs_diff": float(np.abs(la - lb).max()), "first_logits_max_abs": float(np.abs(la).max()),
            "greedy_tokens_equal": int((ta == tb).sum()), "greedy_tokens": int(ta.size)}


def write_hlo(cfg, params, path: Path, prompt_len: int, steps: int) -> None:
    gen = Generator(cfg.replace(eos_token_id=None))
    dtype = params["layers"][0]["up"].dtype
    tokens = jnp.ones((1, prompt_len), jnp.int32)
    cache = init_sparse_cache(cfg, 1, B.cache_len(prompt_len, steps), dtype)
    logits, cache, pos = gen.prefill(params, tokens, jnp.ones_like(tokens, bool), cache)
    compiled = gen.decode.lower(params, gen._sel_dynamic, cache, logits, pos, jax.random.PRNGKey(0),
                                max_new_tokens=steps).compile()
    path.write_text(compiled.as_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="opt-6.7b")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--hlo", action="store_true", help="write both decode loops' optimized HLO")
    p.add_argument("--out", default="results/fold-probe")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = preset(args.preset)
    dtype = parse_dtype(args.dtype)
    bw = B.copy_bandwidth_gbs()
    plain = random_norms(M.init_params(cfg, jax.random.PRNGKey(0), dtype), jax.random.PRNGKey(5))
    folded = M.fold_norms(plain, cfg)
    jax.block_until_ready(folded)
    floor_ms = B.decode_weight_bytes(cfg, jnp.dtype(dtype).itemsize) / (bw * 1e9) * 1e3
    result = {"preset": args.preset, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "copy_bandwidth_gbs": bw, "floor_ms_per_token": floor_ms,
              "check": compare(cfg, plain, folded, args.prompt_len, 32), "rounds": []}
    M.FOLD_MATMUL_F32 = False
    result["check_f16_matmul_output"] = compare(cfg, plain, folded, args.prompt_len, 32)
    print(json.dumps(result["check"]), json.dumps(result["check_f16_matmul_output"]), flush=True)
    if args.hlo:
        write_hlo(cfg, folded, out / "hlo_folded_f16.txt", args.prompt_len, args.new_tokens)
    forms = {"plain": (plain, True), "folded": (folded, True), "folded, f16 matmul output": (folded, False)}
    for r in range(args.rounds):
        for name, (params, f32_out) in forms.items():
            M.FOLD_MATMUL_F32 = f32_out
            row = B.bench_jax(cfg, params, prompt_len=args.prompt_len, new_tokens=args.new_tokens, reps=args.reps)
            row.update(round=r, form=name, x_floor=row["decode_ms_per_token"] / floor_ms)
            print(json.dumps(row), flush=True)
            result["rounds"].append(row)
    (out / "fold.json").write_text(json.dumps(result, indent=1) + "\n")
    ms = {f: [r["decode_ms_per_token"] for r in result["rounds"] if r["form"] == f] for f in forms}
    lines = [f"# Norms folded into the projections: {args.preset} {args.dtype} dense decode, {result['device']}, "
             f"jax {jax.__version__}", "",
             f"floor {floor_ms:.3f} ms/token at {bw:.0f} GB/s (XLA copy); check: {json.dumps(result['check'])}", "",
             "| form | ms/token by round | median | x floor |", "|---|---|---|---|"]
    for f, v in ms.items():
        med = statistics.median(v)
        lines.append(f"| {f} | {' / '.join(f'{x:.3f}' for x in v)} | {med:.3f} | {med / floor_ms:.3f} |")
    (out / "fold.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

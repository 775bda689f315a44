"""Where does a decode step's time go? GPU kernel time per token, by kernel, from a profiler trace.

Random weights at a preset's shapes; for dense decode (XLA; optionally the gathered kernels with every
row selected) and for sparse decode (random predictors with lookahead, or fixed indices), traces `--tokens` decode steps of the jitted while-loop and sums each
kernel name's device time per token. Writes profile.json and profile.md to --out. `--kv-mode lazy`
gives the sparse runs the lazy KV cache (`sparse.init_sparse_cache`): each gathered step recomputes
the selected KV heads' K/V over the W-token window and writes them into the cache
(`gathered_window_kv_update`: with --kernels pallas one kernel, in place; with xla a window einsum and
two scatters); dense decode keeps the exact cache either way.

  python scripts/profile_decode.py --preset opt-6.7b --sparse 0.25:0.5 --kernels pallas --out $OUT/profile
  python scripts/profile_decode.py --preset opt-6.7b --sparse 0.25:0.5 --kv-mode lazy --out $OUT/profile-lazy
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dejavu_jax import bench  # noqa: E402
from dejavu_jax import model as M  # noqa: E402
from dejavu_jax.checkpoint import parse_dtype  # noqa: E402
from dejavu_jax.config import preset  # noqa: E402
from dejavu_jax.generate import Generator  # noqa: E402
from dejavu_jax.sparse import KV_MODES, init_sparse_cache, step_fuses_attention_inputs  # noqa: E402
from pallas_kernels import get_ops  # noqa: E402
from pallas_kernels.microbench import _device_events  # noqa: E402


def kernel_family(name: str) -> str:
    """Group kernel names that differ only by XLA's numbering (fusion.123 -> fusion)."""
    return re.sub(r"[._]\d+$", "", re.sub(r"(_\d+)+$", "", name))[:60]


def profile(cfg, params, *, selector, ops, tokens: int, prompt_len: int, kv_mode: str = "exact",
            hlo_path: Path | None = None) -> dict:
    """Kernel time per token of `tokens` decode steps; kv_mode "lazy" builds the cache as
    bench.bench_jax does (the lazy recompute runs only for gathered steps: a sparse selector).
    hlo_path: also write the decode loop's optimized HLO there (which ops each fusion holds)."""
    gen = Generator(cfg.replace(eos_token_id=None), selector=selector, ops=ops)
    dtype = params["layers"][0]["up"].dtype
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    valid = jnp.ones((1, prompt_len), bool)
    max_len = bench.cache_len(prompt_len, tokens)
    key = jax.random.PRNGKey(0)

    def run(_, hlo_path=None):
        logits, cache, pos = gen.prefill(params, prompt, valid,
                                         init_sparse_cache(cfg, 1, max_len, dtype, kv_mode=kv_mode))
        jax.block_until_ready(cache)
        args = (params, gen._sel_dynamic, cache, logits, pos, key)
        if hlo_path is not None:
            hlo_path.write_text(gen.decode.lower(*args, max_new_tokens=tokens).compile().as_text())
        return gen.decode(*args, max_new_tokens=tokens)[0]

    jax.block_until_ready(run(None, hlo_path))  # compile
    calls = _device_events(lambda: run(None), (), 1)
    if not calls:
        return {"error": "no GPU events in the trace (CPU backend or no CUPTI)"}
    events = calls[0]
    # The prefill's kernels come first, then a host sync; the decode loop's kernels follow. The
    # decode part is what comes after the largest gap.
    gaps = [events[i][1] - events[i - 1][1] - events[i - 1][2] for i in range(1, len(events))]
    start = int(np.argmax(gaps)) + 1 if gaps else 0
    decode = events[start:]
    span_ms = (decode[-1][1] + decode[-1][2] - decode[0][1]) / 1e6 / tokens
    busy_ms = sum(e[2] for e in decode) / 1e6 / tokens
    per = {}
    for name, _, dur in decode:
        fam = kernel_family(name)
        t, n = per.get(fam, (0.0, 0))
        per[fam] = (t + dur / 1e3 / tokens, n + 1)
    top = sorted(per.items(), key=lambda kv: -kv[1][0])
    return {"span_ms_per_token": span_ms, "kernel_ms_per_token": busy_ms,
            "kernels_per_token": len(decode) / tokens,
            "by_kernel": [{"kernel": k, "us_per_token": round(t, 2), "launches_per_token": n / tokens}
                          for k, (t, n) in top]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="opt-6.7b")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--sparse", default="0.25:0.5", help="MLP:HEADS density for the sparse profiles")
    p.add_argument("--kernels", default="pallas")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--mlp-topk-block", type=int, default=0,
                   help="the predictor run ranks MLP neurons per block of this many (0: one top-K per layer)")
    p.add_argument("--kv-mode", default="exact", choices=KV_MODES,
                   help="KV cache of the sparse runs (dense decode always uses the exact cache)")
    p.add_argument("--tokens", type=int, default=16, help="decode steps traced")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--fused-step", choices=bench.FUSED_STEP_CHOICES, default="auto",
                   help="the sparse runs take the lazy step's attention inputs from one launch "
                        "(pallas_kernels.Ops.fused_step; auto: the backend's default)")
    p.add_argument("--dense-kernels", action="store_true",
                   help="also profile dense decode through the gathered kernels (every row selected)")
    p.add_argument("--top", type=int, default=25, help="kernels listed per profile")
    p.add_argument("--hlo", action="store_true", help="also write each run's optimized decode HLO (hlo_<i>.txt)")
    p.add_argument("--out", default="results/profile")
    args = p.parse_args(argv)
    cfg = preset(args.preset)
    dtype = parse_dtype(args.dtype)
    params = M.init_params(cfg, jax.random.PRNGKey(0), dtype)
    mlp_d, head_d = (float(v) for v in args.sparse.split(":"))
    ops = get_ops(args.kernels, fused_step=bench.FUSED_STEP_CHOICES[args.fused_step])
    kv = f", kv {args.kv_mode}" + (", fused step" if step_fuses_attention_inputs(cfg, args.kv_mode, ops) else "")
    runs = {"dense": (None, None, "exact"),
            f"sparse {args.kernels} predictor {args.sparse}{kv}, MLP top-K block {args.mlp_topk_block}": (
                bench.random_predictor_selector(cfg, jax.random.PRNGKey(1), mlp_density=mlp_d, head_density=head_d,
                                                rank=args.rank, dtype=dtype, mlp_topk_block=args.mlp_topk_block),
                ops, args.kv_mode),
            f"sparse {args.kernels} fixed indices {args.sparse}{kv}": (
                bench.fixed_index_selector(cfg, mlp_density=mlp_d, head_density=head_d), ops, args.kv_mode)}
    if args.dense_kernels:
        runs[f"dense through the {args.kernels} gathered kernels (every row selected){kv}"] = (
            bench.all_rows_selector(cfg), ops, args.kv_mode)
    result = {"preset": args.preset, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
              "tokens": args.tokens, "kv_mode": args.kv_mode, "profiles": {}}
    lines = [f"# Decode step profile: {args.preset} {args.dtype}, {result['device']}, jax {jax.__version__}", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, (sel, run_ops, kv_mode)) in enumerate(runs.items()):
        r = profile(cfg, params, selector=sel, ops=run_ops, tokens=args.tokens, prompt_len=args.prompt_len,
                    kv_mode=kv_mode, hlo_path=out / f"hlo_{i}.txt" if args.hlo else None)
        result["profiles"][name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "by_kernel"}), flush=True)
        if "error" in r:
            lines += [f"## {name}", "", r["error"], ""]
            continue
        lines += [f"## {name}: span {r['span_ms_per_token']:.3f} ms/token, kernels {r['kernel_ms_per_token']:.3f} "
                  f"ms/token, {r['kernels_per_token']:.0f} launches/token", "",
                  "| kernel | us/token | launches/token |", "|---|---|---|"]
        lines += [f"| `{k['kernel']}` | {k['us_per_token']:.1f} | {k['launches_per_token']:.0f} |"
                  for k in r["by_kernel"][:args.top]]
        lines.append("")
    (out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

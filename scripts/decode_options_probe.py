"""Time dense and sparse decode under several sets of the decode loop's XLA compiler options, in one
process (they are per-jit options, so no restart per set, unlike XLA_FLAGS in device_xla_flags.sh).

    python3 scripts/decode_options_probe.py --preset opt-6.7b --out DIR \
        --set exhaustive='{"xla_gpu_exhaustive_tiling_search": true}'

Each --set NAME=JSON is laid over generate.DECODE_COMPILER_OPTIONS (a value of null removes that
key); the set "shipped" (DECODE_COMPILER_OPTIONS as is) always runs first and again last, so the
spread between its two runs is the noise. Sparse rows: random rank-128 predictors with lookahead,
the Pallas kernels, lazy KV, MLP top-K per 128 rows (`--sparse` densities MLP:HEADS; empty: dense
only). Writes DIR/decode_options.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dejavu_jax import bench as B  # noqa: E402
from dejavu_jax import model as M  # noqa: E402
from dejavu_jax.config import preset  # noqa: E402
from dejavu_jax.generate import DECODE_COMPILER_OPTIONS  # noqa: E402
from pallas_kernels import get_ops  # noqa: E402
from pallas_kernels.microbench import write_rows  # noqa: E402


def option_set(text: str) -> tuple[str, dict]:
    """NAME=JSON -> (NAME, DECODE_COMPILER_OPTIONS with JSON's keys laid over it; null drops a key)."""
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--set takes NAME=JSON, got {text!r}")
    try:
        changes = json.loads(body)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--set {name}: {e}") from e
    if not isinstance(changes, dict):
        raise argparse.ArgumentTypeError(f"--set {name}: JSON must be an object of option -> value")
    options = dict(DECODE_COMPILER_OPTIONS)
    for key, value in changes.items():
        if value is None:
            options.pop(key, None)
        else:
            options[key] = value
    return name, options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="opt-6.7b")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--sparse", default="0.25:0.5", help="MLP:HEADS density points, comma separated")
    p.add_argument("--set", dest="sets", type=option_set, action="append", default=[], metavar="NAME=JSON")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = preset(args.preset)
    dtype = {"fp16": jnp.float16, "bf16": jnp.bfloat16}[args.dtype]
    params = M.init_params(cfg, jax.random.PRNGKey(0), dtype)
    points = [tuple(float(v) for v in d.split(":")) for d in args.sparse.split(",") if d]
    sets = [("shipped", dict(DECODE_COMPILER_OPTIONS)), *args.sets, ("shipped again", dict(DECODE_COMPILER_OPTIONS))]
    ops = get_ops("pallas")
    runs = [("dense", None, None, "exact")]  # (label, selector, ops, KV mode), the same for every set
    for mlp_d, head_d in points:
        sel = B.random_predictor_selector(cfg, jax.random.PRNGKey(1), mlp_density=mlp_d, head_density=head_d,
                                          rank=128, dtype=dtype, mlp_topk_block=128)
        runs.append((f"sparse {mlp_d}:{head_d}", sel, ops, "lazy"))
    rows = []
    for name, options in sets:
        for what, sel, run_ops, kv_mode in runs:
            row = {"set": name, "decode": what}
            try:
                row.update(B.bench_jax(cfg, params, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                       selector=sel, ops=run_ops, reps=args.reps, kv_mode=kv_mode,
                                       decode_options=options))
                row["decode_ms_per_token"] = round(row["decode_ms_per_token"], 4)
                row["compile_s"] = round(row["compile_s"], 1)
            except Exception as e:  # a set XLA refuses is reported, the others still run
                row["error"] = B.error_text(e)
            print(json.dumps(row), flush=True)
            rows.append(row)
    device = jax.devices()[0].device_kind
    write_rows(args.out, "decode_options", f"Decode loop XLA options, {args.preset} {args.dtype}, {device}",
               ["set", "decode", "decode_ms_per_token", "compile_s", "error"], rows, device=device,
               jax=jax.__version__, sets={name: options for name, options in sets})
    print((args.out / "decode_options.md").read_text())


if __name__ == "__main__":
    main()

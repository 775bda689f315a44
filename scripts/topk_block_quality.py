"""What does ranking MLP neurons per block (SparsityConfig.mlp_topk_block) cost in quality?

Perplexity of the embedded SmolLM2-135M (or --model) with the MLP top-K taken over the whole layer
(block 0) and per block of B neurons, for the oracle (true importances: the rule's own cost) and the
predictors, at each MLP density; heads dense. One `python -m dejavu_jax.eval` run per point, its
JSON kept in --out (an existing JSON is reused, so an interrupted run resumes), then table.md:

  python scripts/topk_block_quality.py --out results/topk_block_quality
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dejavu_jax import eval as E  # noqa: E402


def point_name(mode: str, density: float | None = None, block: int = 0) -> str:
    return "dense" if mode == "dense" else f"{mode}_mlp{density:g}_block{block}"


def perplexities(path: Path) -> dict[str, float]:
    """task -> token perplexity of one eval JSON."""
    tasks = json.loads(path.read_text())["tasks"]
    return {t: m["token_perplexity"] for t, m in tasks.items() if "token_perplexity" in m}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--modes", default="oracle,predictor")
    p.add_argument("--densities", default="0.5,0.25", help="MLP densities")
    p.add_argument("--blocks", default="0,64,128,256", help="mlp_topk_block values (0: one top-K per layer)")
    p.add_argument("--tasks", default="wikitext2,c4")
    p.add_argument("--limit", default="8", help="windows per perplexity task")
    p.add_argument("--context-length", default="1024")
    p.add_argument("--out", default="results/topk_block_quality")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--tasks", args.tasks, "--limit", args.limit, "--context-length", args.context_length, "--no-progress"]
    if args.model:
        common += ["--model", args.model]
    densities = [float(d) for d in args.densities.split(",")]
    blocks = [int(b) for b in args.blocks.split(",")]
    points = [("dense", None, 0)] + [(m, d, b) for m in args.modes.split(",") for d in densities for b in blocks]
    for mode, density, block in points:
        path = out / f"{point_name(mode, density, block)}.json"
        if path.exists():
            continue
        extra = [] if mode == "dense" else ["--mode", mode, "--mlp-density", str(density), "--head-density", "1.0",
                                            "--mlp-topk-block", str(block)]
        if E.main(common + extra + ["--out", str(path)]) != 0:
            print(f"eval failed for {path.name}", file=sys.stderr)
            return 1

    dense = perplexities(out / "dense.json")
    tasks = list(dense)
    title = f"Per-block MLP top-K: perplexity ({', '.join(tasks)}; limit {args.limit}, context {args.context_length})"
    lines = [f"# {title}",
             "", "Each cell: token perplexity (change vs one top-K per layer at the same mode and density).", "",
             "| mode | MLP density | block | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks),
             "| dense | 1 | - | " + " | ".join(f"{dense[t]:.3f}" for t in tasks) + " |"]
    for mode in args.modes.split(","):
        for density in densities:
            base = perplexities(out / f"{point_name(mode, density, 0)}.json")
            for block in blocks:
                ppl = perplexities(out / f"{point_name(mode, density, block)}.json")
                cells = [f"{ppl[t]:.3f}" + ("" if block == 0 else f" ({100 * (ppl[t] / base[t] - 1):+.1f}%)")
                         for t in tasks]
                lines.append(f"| {mode} | {density:g} | {block or 'one top-K'} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

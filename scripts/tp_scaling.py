"""Tensor-parallel scaling: ms/token of the same bench at TP=1, 2, ... side by side.

    python scripts/tp_scaling.py results/tp/opt66b-tp1/bench.json results/tp/opt66b-tp2/bench.json

Prints a markdown table per model (speedup over TP=1 and efficiency t1 / (TP x t_TP)); --out also
writes it to a file. The inputs must be runs of one model with the same dtype, prompt and tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from dejavu_jax.bench import scaling_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="bench.json files (one per TP degree, TP=1 among them)")
    p.add_argument("--out", help="also write the markdown here")
    args = p.parse_args(argv)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in args.results:
        try:
            r = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"cannot read {path}: {e}")
        groups[(r["model"], r["dtype"], r["prompt_len"], r["new_tokens"], r.get("batch", 1))].append(r)
    parts = []
    for (model, dtype, prompt, new, batch), results in groups.items():
        degrees = sorted(r.get("tp", 1) for r in results)
        if len(set(degrees)) != len(degrees):
            p.error(f"{model}: two results with the same TP degree {degrees}")
        try:
            table = scaling_table(results)
        except ValueError as e:
            p.error(f"{model}: {e}")
        parts.append(f"{model}, {dtype}, batch {batch}, prompt {prompt}, {new} new tokens, "
                     f"{results[0]['device']}, TP = {', '.join(map(str, degrees))}\n\n{table}\n")
    text = "\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

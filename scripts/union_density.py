"""How fast does the union of per-row top-K sets grow with the decode batch size? (oracle, real text)

    python scripts/union_density.py                      # SmolLM2-135M, 32 C4 docs x 128 tokens
    python scripts/union_density.py --rows 16 --tokens 64 --densities 0.1,0.25,0.5 --out /tmp/ud

A batch of B sequences decoding together reads one shared set of weight rows per step (the
gathered kernels take one index set). Each row wants its own top-K neurons / heads (true
importances from a dense forward: |SiLU(gate)*up| or |ReLU| per neuron, output L2 norm per head).
For each batch size b, the R sequences are grouped into R/b batches; at every token position
(= decode step, with that document's real context) we measure
  union_density  |union of the b rows' top-K sets| / N: what an exact union must read,
  recall_max/sum fraction of each row's top-K inside a fixed-size union (top-K of the max / sum
                 of per-row mean-normalised importances): what `--batch-select union` keeps,
averaged over batches, positions and layers (per-layer values are in the JSON).
Writes union_density.json, union_density.md and union_density.png into --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dejavu_jax import model as M  # noqa: E402
from dejavu_jax.batching import expected_random_union, k_for_density, union_stats_batches  # noqa: E402

C4_FILE = "c4/c4_eval350.jsonl.gz"
STATS = ("union_density", "recall_max", "recall_sum", "mass_recall_max")


def read_documents(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"no C4 documents at {path} (pass --data DIR holding {C4_FILE})")
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{i + 1}: not a C4 row with a 'text' field ({e})") from None
    return docs


def token_rows(tokenizer, docs: Sequence[str], rows: int, tokens: int) -> np.ndarray:
    """The first `tokens` tokens of the first `rows` documents that are at least that long -> [rows, tokens]."""
    out = []
    for text in docs:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == rows:
            return np.asarray(out, np.int32)
    raise ValueError(f"only {len(out)} documents have >= {tokens} tokens; lower --tokens or --rows")


def importances(params, cfg, tokens: np.ndarray, chunk: int, progress: bool):
    """Per-layer true importances: neurons [L] x [R, T, F] float16, heads [L] x [R, T, H] float32."""
    from tqdm import tqdm

    @jax.jit
    def run(params, toks):
        rec: list = []
        pos = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
        M.forward(params, cfg, toks, pos, record=rec, return_hidden=True)
        return [r["neuron_importance"].astype(jnp.float16) for r in rec], [r["head_importance"] for r in rec]

    neurons = [[] for _ in range(cfg.num_layers)]
    heads = [[] for _ in range(cfg.num_layers)]
    for i in tqdm(range(0, len(tokens), chunk), desc="dense forward", disable=not progress):
        n, h = run(params, jnp.asarray(tokens[i:i + chunk]))
        for layer in range(cfg.num_layers):
            neurons[layer].append(np.asarray(n[layer]))
            heads[layer].append(np.asarray(h[layer]))
    return [np.concatenate(x) for x in neurons], [np.concatenate(x) for x in heads]


def measure(imps: list[np.ndarray], densities: Sequence[float], batches: Sequence[int], progress: bool,
            what: str) -> dict:
    """{density: {"k": K, stat: {"mean": [per batch], "per_layer": [[per batch] per layer]}}}."""
    from tqdm import tqdm

    n = imps[0].shape[-1]
    result = {}
    for d in densities:
        k = k_for_density(d, n)
        fn = jax.jit(lambda x, k=k: union_stats_batches(x, k, tuple(batches)))
        per_layer = {s: [] for s in STATS}
        for imp in tqdm(imps, desc=f"{what} density {d}", disable=not progress):
            stats = fn(jnp.asarray(imp, jnp.float32))
            for s in STATS:
                per_layer[s].append(np.asarray(stats[s]).tolist())
        result[str(d)] = {"k": k, "n": n, **{s: {"mean": np.mean(per_layer[s], axis=0).tolist(),
                                                 "per_layer": per_layer[s]} for s in STATS}}
    return result


def markdown(res: dict) -> str:
    b = res["batches"]
    lines = [f"Union density on {res['model']}: {res['rows']} C4 documents x {res['tokens']} tokens "
             f"(oracle importances, mean over {res['num_layers']} layers and all positions).", "",
             "union = fraction of rows an exact union of every row's top-K must read; "
             "recall = fraction of each row's own top-K kept by a fixed-size union (top-K of the max / sum "
             "of per-row normalised importances); random = 1-(1-d)^b for independent random rows.", ""]
    lines.append("| site | density (K/N) | stat | " + " | ".join(f"b={x}" for x in b) + " |")
    lines.append("|---|---|---|" + "---|" * len(b))
    for site in ("neurons", "heads"):
        for d, r in res[site].items():
            label = f"{d} ({r['k']}/{r['n']})"
            for stat, name in (("union_density", "union"), ("recall_max", "recall, max"),
                               ("recall_sum", "recall, sum"), ("mass_recall_max", "mass recall, max")):
                vals = " | ".join(f"{v:.3f}" for v in r[stat]["mean"])
                lines.append(f"| {site} | {label} | {name} | {vals} |")
            rand = " | ".join(f"{expected_random_union(r['k'] / r['n'], x):.3f}" for x in b)
            lines.append(f"| {site} | {label} | random union | {rand} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = res["batches"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for col, site in enumerate(("neurons", "heads")):
        for i, (d, r) in enumerate(res[site].items()):
            c = f"C{i}"
            axes[0, col].plot(b, r["union_density"]["mean"], "o-", color=c, label=f"exact union, d={d} (K={r['k']})")
            axes[0, col].plot(b, [expected_random_union(r["k"] / r["n"], x) for x in b], ":", color=c,
                              label=f"independent random rows, d={d}")
            axes[1, col].plot(b, r["recall_max"]["mean"], "o-", color=c, label=f"fixed-K union (max), d={d}")
            axes[1, col].plot(b, r["recall_sum"]["mean"], "s--", color=c, label=f"fixed-K union (sum), d={d}")
        axes[0, col].set_title(f"{site}: {res['model']}", fontsize=9)
        axes[0, col].set_ylabel("union density (fraction read)")
        axes[1, col].set_ylabel("per-row top-K recall at fixed K")
        axes[1, col].set_xlabel("batch size")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(b)
            ax.set_xticklabels([str(x) for x in b])
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_atomic(path: Path, text: str | None = None, writer=None) -> None:
    """Write to a temporary sibling, then rename: no half-written result files."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        if writer is not None:
            writer(Path(tmp))
        else:
            Path(tmp).write_text(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(model_dir: str | None, data: Path, rows: int, tokens: int, densities: Sequence[float],
        batches: Sequence[int], chunk: int = 8, progress: bool = True) -> dict:
    from dejavu_jax.checkpoint import load_checkpoint, load_tokenizer

    from dejavu_jax.default_model import model_dir_or_default

    model_dir = str(model_dir_or_default(model_dir, progress))
    t0 = time.perf_counter()
    cfg, params = load_checkpoint(model_dir, jnp.float32)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files")
    toks = token_rows(tokenizer, read_documents(data / C4_FILE), rows, tokens)
    neurons, heads = importances(params, cfg, toks, chunk, progress)
    return {"model": cfg.name or str(model_dir),
            "data": f"{C4_FILE} (held-out stand-in, first docs >= {tokens} tokens)",
            "rows": rows, "tokens": tokens, "num_layers": cfg.num_layers, "batches": list(batches),
            "densities": list(densities),
            "neurons": measure(neurons, densities, batches, progress, "neurons"),
            "heads": measure(heads, densities, batches, progress, "heads"),
            "seconds": round(time.perf_counter() - t0, 1), "jax": jax.__version__}


def parse_list(text: str, kind, what: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be a comma list of numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"--{what} is empty")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/union_density.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="../shared/data", help="data directory, relative to the repo root")
    p.add_argument("--rows", type=int, default=32, help="documents (sequences); a multiple of every batch size")
    p.add_argument("--tokens", type=int, default=128, help="tokens per document (= decode positions)")
    p.add_argument("--densities", default="0.25,0.5", help="top-K densities K/N, comma separated")
    p.add_argument("--batches", default="1,2,4,8,16,32", help="batch sizes, comma separated")
    p.add_argument("--chunk", type=int, default=8, help="documents per forward pass (memory)")
    p.add_argument("--out", default="results/union_density", help="output directory (relative to the cwd)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        densities = parse_list(args.densities, float, "densities")
        batches = parse_list(args.batches, int, "batches")
    except ValueError as e:
        p.error(str(e))
    if any(not 0 < d <= 1 for d in densities):
        p.error("--densities must be in (0, 1]")
    if args.rows < 1 or args.tokens < 1 or args.chunk < 1:
        p.error("--rows, --tokens and --chunk must be >= 1")
    bad = [b for b in batches if b < 1 or args.rows % b]
    if bad:
        p.error(f"batch sizes {bad} do not divide --rows {args.rows}")
    data = Path(args.data)
    data = data if data.is_absolute() else (REPO_ROOT / data).resolve()
    try:
        res = run(args.model, data, args.rows, args.tokens, densities, batches, args.chunk, not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "union_density.json", json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    write_atomic(out / "union_density.md", text)
    write_atomic(out / "union_density.png", writer=lambda tmp: plot(res, tmp))
    print(text)
    print(f"wrote {out}/union_density.{{json,md,png}} in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

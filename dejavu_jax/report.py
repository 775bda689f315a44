"""Quality vs density curves for the sparsity modes (dense / oracle / predictor / threshold).

    # evaluate a grid in one process (one model load), then plot
    python -m dejavu_jax.report sweep --predictors MODEL/predictors --tasks wikitext2 --limit 8 \
        --context-length 512 --out-dir results/sweep
    # or plot eval JSONs written by `python -m dejavu_jax.eval`
    python -m dejavu_jax.report plot results/eval_*.json --out results/quality_vs_density

Each eval JSON is one (mode, mlp_density, head_density) point. The plot has one column per sweep
(MLP density at head density 1; head density at MLP density 1) and one row per metric (each
perplexity task; mean zero-shot accuracy when accuracy tasks were run), one line per mode and the
dense value as a horizontal line. Writes PNG + JSON (+ a markdown table of every point).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from dejavu_jax.cli import HelpFormatter

MODES = ("dense", "oracle", "predictor", "threshold")
PPL_TASKS = ("wikitext2", "c4")
COLORS = {"oracle": "tab:green", "predictor": "tab:blue", "threshold": "tab:orange", "dense": "black"}


class ReportError(ValueError):
    pass


def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def point_from_eval(report: dict, source: str = "") -> dict[str, Any]:
    """One curve point from an eval report: mode, densities, perplexities, mean accuracy."""
    meta, tasks = report.get("meta"), report.get("tasks")
    if not isinstance(meta, dict) or not isinstance(tasks, dict):
        raise ReportError(f"{source or 'report'} is not a dejavu_jax.eval JSON (needs 'meta' and 'tasks')")
    mode = meta.get("mode", "dense")
    if mode not in MODES:
        raise ReportError(f"{source}: unknown mode {mode!r}")
    point = {"mode": mode, "mlp_density": float(meta.get("mlp_density", 1.0)),
             "head_density": float(meta.get("head_density", 1.0)), "source": source}
    if mode == "dense":
        point["mlp_density"] = point["head_density"] = 1.0
    for name, res in tasks.items():
        ppl = res.get("token_perplexity", res.get("perplexity"))
        if ppl is not None and name in PPL_TASKS:
            point[f"ppl_{name}"] = float(ppl)
    accs = {name: float(res["acc"]) for name, res in tasks.items() if "acc" in res}
    if accs:
        point["accuracy"] = accs
        point["mean_accuracy"] = sum(accs.values()) / len(accs)
    return point


def load_points(paths: Sequence[str | Path]) -> list[dict]:
    points = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ReportError(f"eval JSON {p} does not exist")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{p} is not valid JSON ({e.msg})") from None
        points.append(point_from_eval(data, str(p)))
    if not points:
        raise ReportError("no eval JSONs given")
    return points


def metrics_of(points: Sequence[dict]) -> list[str]:
    keys = [f"ppl_{t}" for t in PPL_TASKS if any(f"ppl_{t}" in p for p in points)]
    if any("mean_accuracy" in p for p in points):
        keys.append("mean_accuracy")
    if not keys:
        raise ReportError("the eval JSONs hold no perplexity (wikitext2, c4) and no accuracy results")
    return keys


def curves(points: Sequence[dict]) -> dict:
    """{metric: {sweep: {mode: [(density, value), ...]}}, "dense": {metric: value}}."""
    out: dict[str, Any] = {"dense": {}, "curves": {}}
    dense = [p for p in points if p["mode"] == "dense" or (p["mlp_density"] == 1.0 and p["head_density"] == 1.0)]
    for metric in metrics_of(points):
        vals = [p[metric] for p in dense if metric in p]
        if vals:
            out["dense"][metric] = vals[0]
        per_sweep: dict[str, dict[str, list]] = {"mlp": {}, "heads": {}}
        for p in points:
            if metric not in p or p["mode"] == "dense":
                continue
            if p["head_density"] == 1.0:
                per_sweep["mlp"].setdefault(p["mode"], []).append((p["mlp_density"], p[metric]))
            if p["mlp_density"] == 1.0:
                per_sweep["heads"].setdefault(p["mode"], []).append((p["head_density"], p[metric]))
        for sweep in per_sweep.values():
            for mode in sweep:
                sweep[mode] = sorted(set(sweep[mode]), reverse=True)
        out["curves"][metric] = per_sweep
    return out


def markdown(points: Sequence[dict], summary: dict) -> str:
    metrics = metrics_of(points)
    dense = summary["dense"]
    lines = ["# Quality vs density", "",
             "| mode | MLP density | head density | " + " | ".join(metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    order = {m: i for i, m in enumerate(MODES)}
    for p in sorted(points, key=lambda p: (order[p["mode"]], -p["mlp_density"], -p["head_density"])):
        cells = []
        for m in metrics:
            if m not in p:
                cells.append("-")
                continue
            v = p[m]
            rel = ""
            if m in dense and p["mode"] != "dense":
                if m.startswith("ppl"):
                    rel = f" ({100 * (v / dense[m] - 1):+.1f}%)"
                else:
                    rel = f" ({100 * (v - dense[m]):+.1f} pt)"
            cells.append(f"{v:.3f}{rel}" if m.startswith("ppl") else f"{v:.4f}{rel}")
        lines.append(f"| {p['mode']} | {p['mlp_density']:g} | {p['head_density']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(points: Sequence[dict], out: str | Path, title: str = "") -> tuple[Path, Path, Path]:
    """Write out.png, out.json and out.md. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = curves(points)
    metrics = list(summary["curves"])
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.4 * len(metrics)), squeeze=False)
    labels = {"mlp": "MLP density (heads dense)", "heads": "head density (MLP dense)"}
    for r, metric in enumerate(metrics):
        for c, sweep in enumerate(("mlp", "heads")):
            ax = axes[r][c]
            for mode, pts in summary["curves"][metric][sweep].items():
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-", color=COLORS.get(mode), label=mode)
            if metric in summary["dense"]:
                ax.axhline(summary["dense"][metric], color="black", ls="--", lw=1, label="dense")
            ax.set_xlabel(labels[sweep])
            ax.set_ylabel(metric.replace("ppl_", "perplexity ").replace("_", " "))
            ax.invert_xaxis()  # sparser to the right
            ax.grid(alpha=0.3)
            if metric.startswith("ppl"):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    png, js, md = out.with_suffix(".png"), out.with_suffix(".json"), out.with_suffix(".md")
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(png, buf.getvalue())
    _atomic_write(js, json.dumps({"title": title, "points": list(points), **summary}, indent=1) + "\n")
    _atomic_write(md, markdown(points, summary))
    return png, js, md


def parse_densities(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ReportError(f"densities must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in vals if not 0.0 < v <= 1.0]
    if bad or not vals:
        raise ReportError(f"densities must be in (0, 1], got {text!r}")
    return vals


def parse_limit(text: str) -> int | None:
    """--limit: a positive count, or 'all' (None: the full sets)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def sweep(model_dir: str | None, predictors: str | None, modes: Sequence[str], mlp_densities: Sequence[float],
          head_densities: Sequence[float], tasks: str, out_dir: str | Path, *, limit: int | None,
          context_length: int, dtype: str = "float32", batch_size: int = 8, lookahead: bool = True,
          progress: bool = True, data_dir: str | Path | None = None, max_batch_tokens: int = 16384,
          min_bucket: int = 32, min_scored: int = 8, matmul_precision: str | None = None) -> list[Path]:
    """Evaluate every (mode, density) point of the two sweeps in one process; writes eval JSONs.

    Texts are tokenized once for all points (one encode cache); each point still compiles its own
    scoring function per shape (the selector is part of the program), so min_bucket / min_scored
    (see `dejavu_jax.eval.evaluate`) bound the compilations per point.
    """
    import jax

    from dejavu_jax import eval as ev
    from dejavu_jax.checkpoint import load_checkpoint, load_tokenizer, parse_dtype
    from dejavu_jax.sparse import build_selector

    for m in modes:
        if m not in MODES:
            raise ReportError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    from dejavu_jax.default_model import model_dir_or_default

    model_dir = str(model_dir_or_default(model_dir))
    cfg, params = load_checkpoint(model_dir, parse_dtype(dtype))
    tokenizer = load_tokenizer(model_dir)
    settings = ev.EvalSettings(context_length=context_length, limit=limit, progress=progress,
                               data_dir=ev.resolve_repo_path(data_dir or ev.DEFAULT_DATA_DIR))
    encode_cache: dict = {}
    grid = [("dense", 1.0, 1.0)] if "dense" in modes else []
    for mode in [m for m in modes if m != "dense"]:
        grid += [(mode, d, 1.0) for d in mlp_densities if d < 1.0]
        grid += [(mode, 1.0, d) for d in head_densities if d < 1.0]
    written = []
    device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind} x{jax.device_count()}"
    for mode, md, hd in grid:
        out = Path(out_dir) / f"eval_{mode}_mlp{md:g}_head{hd:g}.json"
        if out.is_file():  # resume a partly finished sweep
            written.append(out)
            continue
        selector = build_selector(cfg, params, mode=mode, mlp_density=md, head_density=hd,
                                  predictors=predictors, lookahead=lookahead)
        t0 = time.time()
        print(f"[sweep] {mode} mlp {md:g} head {hd:g}", flush=True)
        report = ev.evaluate(params, cfg, tokenizer, tasks, settings, selector=selector, batch_size=batch_size,
                             max_batch_tokens=max_batch_tokens, min_bucket=min_bucket, min_scored=min_scored,
                             encode_cache=encode_cache)
        report["meta"] = {"model": str(model_dir), "config_name": cfg.name, "mode": mode, "mlp_density": md,
                          "head_density": hd, "predictors": predictors, "lookahead": lookahead, "dtype": dtype,
                          "device": device, "context_length": context_length, "stride": context_length,
                          "limit": limit, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens,
                          "min_bucket": min_bucket, "min_scored": min_scored,
                          "matmul_precision": matmul_precision,
                          "command": "python -m dejavu_jax.report sweep " + " ".join(sys.argv[2:]),
                          "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                          "wall_seconds": round(time.time() - t0, 1)}
        ev.write_report(report, out)
        written.append(out)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dejavu_jax.report", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("plot", formatter_class=HelpFormatter, help="plot eval JSONs (from dejavu_jax.eval or `report sweep`)")
    pp.add_argument("inputs", nargs="+", help="eval JSON files")
    pp.add_argument("--out", default="results/quality_vs_density", help="output path without suffix")
    pp.add_argument("--title", default="", help="plot title (none if empty)")
    sp = sub.add_parser("sweep", formatter_class=HelpFormatter, help="evaluate the density grid for each mode, then plot")
    sp.add_argument("--model", help="checkpoint directory (default: embedded SmolLM2-135M)")
    sp.add_argument("--predictors", help="predictors directory (predictor mode; threshold calibration)")
    sp.add_argument("--modes", default="dense,oracle,predictor,threshold", help="comma list of sparsity modes")
    sp.add_argument("--mlp-densities", default="1.0,0.75,0.5,0.35,0.25",
                    help="MLP densities of the grid (heads dense)")
    sp.add_argument("--head-densities", default="1.0,0.75,0.5", help="head densities of the grid (MLP dense)")
    sp.add_argument("--tasks", default="wikitext2", help="eval tasks (see python -m dejavu_jax.eval --help)")
    sp.add_argument("--limit", type=parse_limit, default=8,
                    help="windows per perplexity task / docs per zero-shot task; 'all' for the full sets")
    sp.add_argument("--context-length", type=int, default=512, help="tokens per window / max request length")
    sp.add_argument("--batch-size", type=int, default=8, help="max sequences per forward pass")
    sp.add_argument("--max-batch-tokens", type=int, default=16384,
                    help="max padded tokens per forward pass (see python -m dejavu_jax.eval --help)")
    from dejavu_jax.eval import add_jax_args, add_shape_args

    add_shape_args(sp)
    sp.add_argument("--data-dir", default=None, help="evaluation data (default: dejavu_jax.eval's, ../shared/data)")
    add_jax_args(sp)
    sp.add_argument("--dtype", default="float32", help="compute dtype of the model")
    sp.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=True,
                    help="predictor pairing: layer l's selection from layer l-1's input (must match training)")
    sp.add_argument("--out-dir", default="results/sweep", help="eval JSONs and the plot go here (resumable)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "plot":
            png, js, md = plot(load_points(args.inputs), args.out, args.title)
        else:
            from dejavu_jax.eval import apply_jax_args, check_shape_args

            check_shape_args(args)
            apply_jax_args(args)
            paths = sweep(args.model, args.predictors, args.modes.split(","), parse_densities(args.mlp_densities),
                          parse_densities(args.head_densities), args.tasks, args.out_dir, limit=args.limit,
                          context_length=args.context_length, dtype=args.dtype, batch_size=args.batch_size,
                          lookahead=args.lookahead, progress=not args.no_progress, data_dir=args.data_dir,
                          max_batch_tokens=args.max_batch_tokens, min_bucket=args.min_bucket,
                          min_scored=args.min_scored, matmul_precision=args.matmul_precision)
            title = f"{args.tasks}, {'all' if args.limit is None else args.limit} x {args.context_length} tokens"
            # every point in the folder, so sweeps run in parts (e.g. per mode) end in one plot
            everything = sorted(set(paths) | set(Path(args.out_dir).glob("eval_*.json")))
            png, js, md = plot(load_points(everything), Path(args.out_dir) / "quality_vs_density", title)
    except (ReportError, FileNotFoundError, ValueError) as e:  # TaskError is a ValueError
        parser.exit(2, f"error: {e}\n")
    print(md.read_text())
    print(f"wrote {png}, {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

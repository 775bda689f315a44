"""WikiText-2 perplexity of the embedded SmolLM2-135M-Instruct: our JAX model vs transformers torch.

    python scripts/wikitext_parity.py --windows 8
    python scripts/wikitext_parity.py --windows 40 --out results/wikitext_parity.json

Both sides score the same windows of the same tokens with the same weights:
  * JAX: the cached dejavu_jax checkpoint (`default_checkpoint()`, float32) through the project's
    evaluation code (`dejavu_jax.eval`: `perplexity_rows` windows, `Scorer` batches), i.e. exactly
    what `python -m dejavu_jax.eval --tasks wikitext2` computes.
  * torch: transformers' own GGUF loader on the same GGUF file (`AutoModelForCausalLM.from_pretrained(
    dir, gguf_file=...)`, float32), a weight path independent of ours.
Text: wiki.test.raw rebuilt into HF rows and joined with "\\n\\n" (MANIFEST.md); tokens without
special tokens, one prefix token (BOS) in front; disjoint windows of --context-length tokens
(stride = context length). Perplexity = exp(total NLL / scored tokens) over the first N windows.
Prints both numbers and their relative difference; --out writes JSON + a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))


def wikitext_rows(tokenizer, data_dir: str | Path, windows: int, context_length: int = 1024):
    """The first `windows` disjoint perplexity windows of WikiText-2 test -> (rows, total text tokens)."""
    from dejavu_jax import eval as ev
    from dejavu_jax import tasks

    text = tasks.load_text(tasks.TASKS["wikitext2"], ev.resolve_repo_path(data_dir))
    ids = ev.make_encoder(tokenizer)([text])[0]
    rows = ev.perplexity_rows(ids, ev.prefix_token_id(tokenizer), context_length, context_length, windows)
    return rows, len(ids)


def jax_logprob_sums(params, cfg, rows, *, batch_size: int = 1, progress: bool = True) -> np.ndarray:
    """Per-window sum of scored target log-probs from our JAX model (the eval module's Scorer)."""
    from dejavu_jax.eval import Scorer

    lp, _ = Scorer(params, cfg, batch_size=batch_size).score(rows, desc="jax", progress=progress)
    return lp


def torch_logprob_sums(model, rows, *, progress: bool = True) -> np.ndarray:
    """Per-window sum of scored target log-probs from a transformers torch causal LM."""
    import torch
    from tqdm.auto import tqdm

    out = np.zeros(len(rows), np.float64)
    with torch.no_grad():
        for i, r in enumerate(tqdm(rows, desc="torch", unit="seq", disable=not progress)):
            logits = model(torch.as_tensor(r.inputs[None].astype(np.int64))).logits[0].float()  # [T, V]
            logp = torch.log_softmax(logits, dim=-1)
            picked = logp.gather(-1, torch.as_tensor(r.targets.astype(np.int64))[:, None])[:, 0]
            out[i] = float(picked[r.score_from:].double().sum())
    return out


def load_torch_gguf(gguf_path: Path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()


def parity(windows: int, *, data_dir: str | Path = "../shared/data", context_length: int = 1024,
           checkpoint: str | Path | None = None, gguf_path: str | Path | None = None, torch_model=None,
           batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of the first `windows` WikiText-2 windows from both implementations."""
    import jax.numpy as jnp

    from dejavu_jax.checkpoint import load_checkpoint, load_tokenizer
    from dejavu_jax.default_model import default_checkpoint, default_gguf_path

    gguf_path = Path(gguf_path) if gguf_path is not None else default_gguf_path()
    checkpoint = Path(checkpoint) if checkpoint is not None else default_checkpoint(progress)
    cfg, params = load_checkpoint(checkpoint, jnp.float32)
    tokenizer = load_tokenizer(checkpoint)
    rows, total = wikitext_rows(tokenizer, data_dir, windows, context_length)
    scored = sum(len(r) - r.score_from for r in rows)

    t0 = time.perf_counter()
    jax_lp = jax_logprob_sums(params, cfg, rows, batch_size=batch_size, progress=progress)
    jax_s = time.perf_counter() - t0
    model = torch_model if torch_model is not None else load_torch_gguf(gguf_path)
    t0 = time.perf_counter()
    torch_lp = torch_logprob_sums(model, rows, progress=progress)
    torch_s = time.perf_counter() - t0

    ppl_jax = math.exp(-jax_lp.sum() / scored)
    ppl_torch = math.exp(-torch_lp.sum() / scored)
    per_window = [{"window": i, "ppl_jax": math.exp(-a / (len(r) - r.score_from)),
                   "ppl_torch": math.exp(-b / (len(r) - r.score_from))}
                  for i, (a, b, r) in enumerate(zip(jax_lp, torch_lp, rows))]
    return {"windows": len(rows), "context_length": context_length, "tokens_scored": scored,
            "tokens_total": total, "ppl_jax": ppl_jax, "ppl_torch": ppl_torch,
            "rel_diff": abs(ppl_jax - ppl_torch) / ppl_torch, "jax_seconds": jax_s, "torch_seconds": torch_s,
            "gguf": gguf_path.name, "checkpoint": str(checkpoint), "per_window": per_window}


def markdown(res: dict) -> str:
    lines = [f"WikiText-2 test, first {res['windows']} windows of {res['context_length']} tokens "
             f"({res['tokens_scored']} of {res['tokens_total']} tokens), {res['gguf']}, float32", "",
             "| implementation | perplexity | seconds |", "|---|---|---|",
             f"| dejavu_jax (JAX) | {res['ppl_jax']:.4f} | {res['jax_seconds']:.1f} |",
             f"| transformers (torch, GGUF loader) | {res['ppl_torch']:.4f} | {res['torch_seconds']:.1f} |", "",
             f"relative difference: {100 * res['rel_diff']:.4f}%"]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="WikiText-2 perplexity of the embedded SmolLM2-135M-Instruct computed by dejavu_jax (JAX) and "
                    "by transformers torch on the same windows; prints both and their relative difference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--windows", type=int, default=4, help="number of leading windows to score")
    p.add_argument("--context-length", type=int, default=1024, help="tokens per window (= stride)")
    p.add_argument("--data-dir", default="../shared/data", help="data root (relative paths: from the repo root)")
    p.add_argument("--checkpoint", help="dejavu_jax checkpoint (default: the cached embedded model)")
    p.add_argument("--gguf", help="GGUF file for the torch side (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per JAX batch")
    p.add_argument("--out", help="write JSON here and a markdown table beside it (.md)")
    args = p.parse_args(argv)
    if args.windows < 1:
        p.error(f"--windows must be >= 1, got {args.windows}")
    if args.context_length < 2:
        p.error(f"--context-length must be >= 2, got {args.context_length}")
    try:
        res = parity(args.windows, data_dir=args.data_dir, context_length=args.context_length,
                     checkpoint=args.checkpoint, gguf_path=args.gguf, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    print(markdown(res), end="")
    if args.out:
        out = Path(args.out)
        _atomic_write(out, json.dumps(res, indent=2) + "\n")
        _atomic_write(out.with_suffix(".md"), markdown(res))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

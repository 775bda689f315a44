"""Quality evaluation: WikiText-2 / C4 perplexity and the Deja Vu paper's zero-shot tasks.

    python -m dejavu_jax.eval --model CKPT --tasks wikitext2,c4,cb,copa,lambada_openai,openbookqa,piqa,rte,winogrande

Full sets (about 1.18M tokens with the SmolLM2 tokenizer: wikitext2 305k, c4 183k, lambada 415k,
piqa 130k, winogrande 54k, rte 44k, openbookqa 28k, cb 17k, copa 3k) on one GPU:

    python -m dejavu_jax.eval --model CKPT --tasks all --batch-size 64 --max-batch-tokens 65536

Dense and sparse models are scored by the same code: `--mode oracle|predictor|threshold` builds a
`Selector` (dejavu_jax.sparse) that `model.forward` applies at every layer.

How scores are computed
- Every number comes from `Scorer.score`: rows of (input tokens, target tokens, first scored
  position) are sorted by length, packed into batches of B rows right-padded to a bucketed length
  T (a power of two >= 32; B = min(--batch-size, --max-batch-tokens // T), a short last batch
  padded to a power of two rows), and run through one jitted function per (B, T, K) shape, so it
  compiles a handful of times per task, not per batch. Padding is masked (`valid`), positions
  come from `positions_from_valid`. The output layer runs only at the K positions (a power of
  two >= 8 covering the longest scored span in the batch) whose next token is scored, in chunks,
  so [B, T, vocab] logits never exist.
- Zero-shot requests (context, continuation) are tokenized as lm-eval-harness does: trailing
  spaces of the context move to the continuation, the continuation's tokens are those of
  tok(context + continuation) after tok(context), no special tokens, an empty context becomes the
  prefix token (BOS, else EOS), and the sequence is left-truncated to the last context-length + 1
  tokens. loglikelihood = sum of log p(continuation tokens); is_greedy = every continuation token
  is the argmax.
- Perplexity: the task's text is tokenized once (no special tokens) and a prefix token (BOS, else
  EOS) is put in front, so every text token is predicted. Window k predicts the targets
  [k*stride, min((k+1)*stride, N)) with as much preceding context as fits in --context-length
  tokens. stride == context length (the default) gives disjoint windows: lm-eval's rolling
  loglikelihood (and GPTQ / Deja Vu style) evaluation; a smaller stride gives every token more
  context (the Hugging Face perplexity guide's sliding window).
  token_perplexity = exp(NLL / scored tokens); word_perplexity = exp(NLL / whitespace words of the
  original text) and bits_per_byte = NLL / (UTF-8 bytes * ln 2), as lm-eval reports for WikiText.
  `--limit N` scores only the first N windows; words and bytes then count the decoded scored tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dejavu_jax import tasks as tasks_lib
from dejavu_jax.cli import HelpFormatter
from dejavu_jax.tasks import Answer, Example, Request, Task, TaskError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = "../shared/data"
ALL_TASKS = ",".join(tasks_lib.TASKS)
MODES = ("dense", "oracle", "predictor", "threshold")

Encoder = Callable[[Sequence[str]], list[list[int]]]


def resolve_repo_path(path: str | Path) -> Path:
    """Relative paths are taken from the repository root (not the cwd), absolute ones as they are."""
    path = Path(path)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def bucket_length(n: int, minimum: int = 64) -> int:
    """The padded sequence length for a row of n tokens: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, (n - 1)).bit_length())


# --------------------------------------------------------------------------------------------
# Scoring rows of tokens
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence to score: targets[i] is predicted from inputs[: i + 1]; positions >= score_from count."""

    inputs: np.ndarray  # [T] int32
    targets: np.ndarray  # [T] int32
    score_from: int

    def __len__(self) -> int:
        return len(self.inputs)


def _row_scores(params, tokens, valid, gather_idx, gather_targets, gather_mask, *, cfg, selector, chunk):
    """Per-row sum of target log-probabilities and all-greedy flags at the scored positions.

    tokens [B, T] int32, valid [B, T] bool; gather_idx, gather_targets [B, K] int32 and gather_mask
    [B, K] bool name the K <= T positions per row whose next token is scored (the output layer runs
    only there: zero-shot rows score a few tokens out of T).
    Returns (logprob_sum [B] f32, greedy [B] bool).
    """
    import jax
    import jax.numpy as jnp

    from dejavu_jax.model import forward, positions_from_valid, unembed

    positions = positions_from_valid(valid)
    h, _ = forward(params, cfg, tokens, positions, valid=valid, selector=selector, return_hidden=True)  # [B,T,D]
    h = jnp.take_along_axis(h, gather_idx[..., None], axis=1)  # [B, K, D]
    B, K, D = h.shape
    c = min(chunk, K)
    # The output layer runs over chunks of c positions: [B, c, V] logits at a time, not [B, K, V].
    h_chunks = h.reshape(B, K // c, c, D).swapaxes(0, 1)  # [K/c, B, c, D]
    t_chunks = gather_targets.reshape(B, K // c, c).swapaxes(0, 1)  # [K/c, B, c]

    def one_chunk(args):
        h_c, t_c = args
        logits = unembed(params, cfg, h_c)  # [B, c, V] f32
        target_logit = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
        return logprob, jnp.argmax(logits, axis=-1) == t_c

    logprob, greedy = jax.lax.map(one_chunk, (h_chunks, t_chunks))  # [K/c, B, c]
    logprob = logprob.swapaxes(0, 1).reshape(B, K)
    greedy = greedy.swapaxes(0, 1).reshape(B, K)
    return (jnp.sum(jnp.where(gather_mask, logprob, 0.0), axis=-1),
            jnp.all(greedy | ~gather_mask, axis=-1))


@dataclasses.dataclass
class ScoreStats:
    rows: int = 0
    tokens: int = 0  # real input tokens run through the model
    padded_tokens: int = 0  # tokens including padding (rows * bucket length, padding rows included)
    seconds: float = 0.0
    compile_seconds: float = 0.0  # time inside calls that traced + compiled a new shape (dispatch is async)
    shapes: set = dataclasses.field(default_factory=set)  # (B, T) shapes compiled or reused


class Scorer:
    """Batched, jitted scoring of `Row`s with one model (dense, or sparse through `selector`)."""

    def __init__(self, params, cfg, *, selector=None, batch_size: int = 32, max_batch_tokens: int = 16384,
                 min_bucket: int = 32, min_scored: int = 8, chunk: int = 256):
        import jax

        self.params, self.cfg = params, cfg
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.min_bucket, self.min_scored = min_bucket, min_scored
        self._fn = jax.jit(functools.partial(_row_scores, cfg=cfg, selector=selector, chunk=chunk))
        self.stats = ScoreStats()

    def rows_per_batch(self, length: int) -> int:
        return max(1, min(self.batch_size, self.max_batch_tokens // length))

    def score(self, rows: Sequence[Row], *, desc: str = "scoring", progress: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:
        """rows -> (logprob_sum [N] float64, greedy [N] bool), in the order given."""
        import jax
        from tqdm.auto import tqdm

        n = len(rows)
        out_lp, out_greedy = np.zeros(n, np.float64), np.zeros(n, bool)
        # Longest first: the largest shapes compile (and run out of memory, if they do) right away.
        order = sorted(range(n), key=lambda i: -len(rows[i]))
        t0 = time.perf_counter()
        pending = None  # the previous batch: fetched after the next one is dispatched
        bar = tqdm(total=n, desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)
        tokens_done = 0

        def collect(item):
            nonlocal tokens_done
            idx, lp, gr, ntok = item
            lp, gr = jax.device_get((lp, gr))
            out_lp[idx] = lp[: len(idx)]
            out_greedy[idx] = gr[: len(idx)]
            tokens_done += ntok
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - t0, 1e-9):.0f}")

        start = 0
        while start < n:
            T = bucket_length(len(rows[order[start]]), self.min_bucket)
            B = self.rows_per_batch(T)
            idx = np.array(order[start: start + B])
            start += B
            # A short last batch is padded to a power of two rows, not to B: less wasted compute for
            # at most log2(B) extra shapes.
            B = min(B, bucket_length(len(idx), 1))
            scored = max(len(rows[i]) - rows[i].score_from for i in idx)
            K = min(T, bucket_length(scored, self.min_scored))
            tokens = np.zeros((B, T), np.int32)
            valid = np.zeros((B, T), bool)
            valid[:, 0] = True  # padding rows get one "real" token so no row is fully masked
            g_idx = np.zeros((B, K), np.int32)
            g_tgt = np.zeros((B, K), np.int32)
            g_mask = np.zeros((B, K), bool)
            ntok = 0
            for b, i in enumerate(idx):
                r = rows[i]
                L = len(r)
                tokens[b, :L], valid[b, :L] = r.inputs, True
                # the last K positions of the row (all scored ones are among them)
                pos = np.arange(L - K, L)
                ok = pos >= max(r.score_from, 0)
                pos = np.maximum(pos, 0)
                g_idx[b], g_tgt[b], g_mask[b] = pos, np.where(ok, r.targets[pos], 0), ok
                ntok += L
            new_shape = (B, T, K) not in self.stats.shapes
            t_call = time.perf_counter()
            lp, gr = self._fn(self.params, tokens, valid, g_idx, g_tgt, g_mask)
            if new_shape:  # the call returns once compiled; execution itself is asynchronous
                self.stats.compile_seconds += time.perf_counter() - t_call
            self.stats.shapes.add((B, T, K))
            self.stats.padded_tokens += B * T
            if pending is not None:
                collect(pending)
            pending = (idx, lp, gr, ntok)
        if pending is not None:
            collect(pending)
        bar.close()
        self.stats.rows += n
        self.stats.tokens += tokens_done
        self.stats.seconds += time.perf_counter() - t0
        return out_lp, out_greedy


# --------------------------------------------------------------------------------------------
# Tokenization (lm-eval conventions)
# --------------------------------------------------------------------------------------------
def make_encoder(tokenizer, cache: dict[str, list[int]] | None = None) -> Encoder:
    """A batch encoder without special tokens (what lm-eval does for causal models).

    cache: a dict (text -> ids) shared by the encoders of one tokenizer, so a sweep that scores
    the same tasks at many sparsity points tokenizes each text once (~3 s for all nine tasks).
    Callers must not mutate the returned lists.
    """

    def encode_now(texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    if cache is None:
        return encode_now

    def encode(texts: Sequence[str]) -> list[list[int]]:
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        cache.update(zip(missing, encode_now(missing)))
        return [cache[t] for t in texts]

    return encode


def prefix_token_id(tokenizer, cfg=None) -> int:
    """The token an empty context (and the start of a perplexity text) is conditioned on: BOS, else EOS."""
    for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None),
                getattr(cfg, "bos_token_id", None), getattr(cfg, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to use as the prefix token")


def request_rows(requests: Sequence[Request], encode: Encoder, prefix_id: int, max_length: int) -> list[Row]:
    """(context, continuation) pairs -> rows whose scored targets are the continuation tokens."""
    contexts, continuations = [], []
    for ctx, cont in requests:
        n_spaces = len(ctx) - len(ctx.rstrip())
        if n_spaces:  # trailing spaces belong to the continuation (word-boundary tokenization)
            ctx, cont = ctx[:-n_spaces], ctx[-n_spaces:] + cont
        contexts.append(ctx)
        continuations.append(cont)
    nonempty = [i for i, c in enumerate(contexts) if c]
    ctx_enc = dict(zip(nonempty, encode([contexts[i] for i in nonempty])))
    whole_enc = dict(zip(nonempty, encode([contexts[i] + continuations[i] for i in nonempty])))
    empty = [i for i, c in enumerate(contexts) if not c]
    cont_only = dict(zip(empty, encode([continuations[i] for i in empty])))
    rows = []
    for i in range(len(requests)):
        if i in ctx_enc:
            c_ids = ctx_enc[i]
            cont_ids = whole_enc[i][len(c_ids):]
        else:
            c_ids, cont_ids = [prefix_id], cont_only[i]
        full = (c_ids + cont_ids)[-(max_length + 1):]
        inputs, targets = np.array(full[:-1], np.int32), np.array(full[1:], np.int32)
        rows.append(Row(inputs, targets, max(0, len(inputs) - len(cont_ids))))
    return rows


def loglikelihoods(scorer: Scorer, encode: Encoder, requests: Sequence[Request], *, prefix_id: int,
                   max_length: int, desc: str = "loglikelihood", progress: bool = True) -> list[Answer]:
    """lm-eval's `loglikelihood`: [(sum log p(continuation | context), is_greedy)] per request."""
    rows = request_rows(requests, encode, prefix_id, max_length)
    lp, greedy = scorer.score(rows, desc=desc, progress=progress)
    return [(float(a), bool(g)) for a, g in zip(lp, greedy)]


def evaluate_examples(task: Task, examples: Sequence[Example],
                      loglikelihood_fn: Callable[[list[Request]], list[Answer]]) -> dict[str, Any]:
    """Flatten the examples' requests, score them in one call, regroup, and compute the task metrics."""
    flat = [r for ex in examples for r in ex.requests]
    answers = loglikelihood_fn(flat)
    grouped, k = [], 0
    for ex in examples:
        grouped.append(answers[k: k + len(ex.requests)])
        k += len(ex.requests)
    return tasks_lib.score_examples(task, examples, grouped)


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------
def perplexity_rows(token_ids: Sequence[int], prefix_id: int, context_length: int, stride: int,
                    limit: int | None = None) -> list[Row]:
    """Windows over [prefix] + text tokens; each text token is scored exactly once (module docstring)."""
    if stride < 1 or stride > context_length:
        raise ValueError(f"stride must be in [1, context length = {context_length}], got {stride}")
    t = np.asarray(token_ids, np.int32)
    s = np.concatenate([np.array([prefix_id], np.int32), t])  # s[j] is the input that predicts t[j]
    n = len(t)
    rows = []
    for k, first in enumerate(range(0, n, stride)):
        if limit is not None and k >= limit:
            break
        end = min(first + stride, n)
        begin = max(0, end - context_length)
        rows.append(Row(s[begin:end], t[begin:end], first - begin))
    return rows


def perplexity(scorer: Scorer, encode: Encoder, text: str, *, prefix_id: int, context_length: int,
               stride: int | None = None, limit: int | None = None, desc: str = "perplexity",
               progress: bool = True, decode: Callable[[list[int]], str] | None = None) -> dict[str, Any]:
    """Token- and word-level perplexity and bits per byte of `text` (see the module docstring)."""
    stride = stride or context_length
    ids = encode([text])[0]
    rows = perplexity_rows(ids, prefix_id, context_length, stride, limit)
    lp, _ = scorer.score(rows, desc=desc, progress=progress)
    nll = -float(lp.sum())
    scored = sum(len(r) - r.score_from for r in rows)
    if scored == len(ids):
        counted = text
    elif decode is not None:
        counted = decode(list(ids[:scored]))
    else:
        counted = None
    out = {"token_perplexity": math.exp(nll / scored), "nll": nll, "tokens_scored": scored,
           "tokens_total": len(ids), "windows": len(rows)}
    if counted is not None:
        words, nbytes = len(counted.split()), len(counted.encode("utf-8"))
        out.update(word_perplexity=math.exp(nll / words), bits_per_byte=nll / (nbytes * math.log(2)),
                   words=words, bytes=nbytes)
    return out


# --------------------------------------------------------------------------------------------
# Running tasks
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalSettings:
    context_length: int = 2048
    stride: int | None = None  # None = context_length
    limit: int | None = None
    data_dir: str | Path = DEFAULT_DATA_DIR
    progress: bool = True


def run_task(task: Task, scorer: Scorer, tokenizer, settings: EvalSettings, prefix_id: int,
             encode_cache: dict | None = None) -> dict[str, Any]:
    """Load, score and summarise one task; returns its metrics plus n, seconds and throughput."""
    encode = make_encoder(tokenizer, encode_cache)
    data_dir = resolve_repo_path(settings.data_dir)
    before = dataclasses.replace(scorer.stats, shapes=set(scorer.stats.shapes))
    t0 = time.perf_counter()
    if task.kind == "perplexity":
        text = tasks_lib.load_text(task, data_dir)
        res = perplexity(scorer, encode, text, prefix_id=prefix_id, context_length=settings.context_length,
                         stride=settings.stride, limit=settings.limit, desc=task.name, progress=settings.progress,
                         decode=lambda ids: tokenizer.decode(ids))
        res["n"] = res["windows"]
        res["context_length"] = settings.context_length
        res["stride"] = settings.stride or settings.context_length
    else:
        examples = tasks_lib.load_examples(task, data_dir, settings.limit)
        ll_fn = functools.partial(loglikelihoods, scorer, encode, prefix_id=prefix_id,
                                  max_length=settings.context_length, desc=task.name, progress=settings.progress)
        res = evaluate_examples(task, examples, ll_fn)
        res["n"] = len(examples)
        res["requests"] = sum(len(e.requests) for e in examples)
    seconds = time.perf_counter() - t0
    tokens = scorer.stats.tokens - before.tokens
    compile_s = scorer.stats.compile_seconds - before.compile_seconds
    score_s = scorer.stats.seconds - before.seconds
    res.update(seconds=seconds, compile_seconds=compile_s, tokens=tokens,
               tokens_per_s=tokens / max(score_s, 1e-9),
               tokens_per_s_excl_compile=tokens / max(score_s - compile_s, 1e-9),
               padding_fraction=1 - tokens / max(scorer.stats.padded_tokens - before.padded_tokens, 1))
    if task.note:
        res["note"] = task.note
    return res


def evaluate(params, cfg, tokenizer, task_names: str | Sequence[str], settings: EvalSettings, *,
             selector=None, batch_size: int = 32, max_batch_tokens: int = 16384, min_bucket: int = 32,
             min_scored: int = 8, encode_cache: dict | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the tasks; returns {"tasks": {name: metrics}, "total_seconds": ...}.

    min_bucket / min_scored: the smallest padded row length and scored-span bucket (`Scorer`);
    larger values mean fewer distinct shapes, i.e. fewer compilations (each sparsity point of a
    sweep compiles anew) for some padding compute. encode_cache: see `make_encoder`.
    """
    task_list = tasks_lib.get_tasks(task_names)
    data_dir = resolve_repo_path(settings.data_dir)
    for task in task_list:  # fail before any compute when a file is missing
        tasks_lib.task_path(task, data_dir)
    scorer = Scorer(params, cfg, selector=selector, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                    min_bucket=min_bucket, min_scored=min_scored)
    prefix_id = prefix_token_id(tokenizer, cfg)
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for task in task_list:
        res = run_task(task, scorer, tokenizer, settings, prefix_id, encode_cache)
        results[task.name] = res
        log(f"{task.name}: {format_metrics(task.name, res)}  (n={res['n']}, {res['seconds']:.1f} s of which "
            f"compile {res['compile_seconds']:.1f} s; {res['tokens_per_s_excl_compile']:.0f} tok/s excl. compile)")
    total = time.perf_counter() - t0
    log(f"total: {total:.1f} s for {len(task_list)} task(s), {scorer.stats.tokens} tokens, "
        f"{len(scorer.stats.shapes)} compiled shapes ({scorer.stats.compile_seconds:.1f} s compiling)")
    return {"tasks": results, "total_seconds": total, "total_tokens": scorer.stats.tokens,
            "compile_seconds": scorer.stats.compile_seconds, "compiled_shapes": sorted(scorer.stats.shapes)}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
METRIC_ORDER = ("acc", "acc_norm", "f1", "perplexity", "token_perplexity", "word_perplexity", "bits_per_byte")


def format_metrics(name: str, res: dict) -> str:
    parts = []
    for m in METRIC_ORDER:
        if m in res:
            v = res[m]
            parts.append(f"{m} {v:.4f}" if m in ("acc", "acc_norm", "f1", "bits_per_byte") else f"{m} {v:.3f}")
    return ", ".join(parts)


def markdown_table(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# Evaluation: {meta['model']} ({meta['mode']})", "",
             f"Command: `{meta['command']}`", "",
             f"Device: {meta['device']}; dtype {meta['dtype']}; context length {meta['context_length']}, "
             f"stride {meta['stride']}; limit {meta['limit']}; total {report['total_seconds']:.1f} s", "",
             "| task | n | metrics | seconds (compile) | tokens/s excl. compile |", "|---|---|---|---|---|"]
    for name, res in report["tasks"].items():
        label = "c4 (held-out train docs, stand-in for validation)" if name == "c4" else name
        lines.append(f"| {label} | {res['n']} | {format_metrics(name, res)} | {res['seconds']:.1f} "
                     f"({res.get('compile_seconds', 0.0):.1f}) | {res.get('tokens_per_s_excl_compile', 0.0):.0f} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """JSON (with per-example predictions) and a markdown table next to it (same stem, .md)."""
    out = Path(out)
    md = out.with_suffix(".md")
    _atomic_write(out, json.dumps(report, indent=1) + "\n")
    _atomic_write(md, markdown_table(report))
    return out, md


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_shape_args(p: argparse.ArgumentParser) -> None:
    """--min-bucket / --min-scored (shared with `dejavu_jax.report sweep`)."""
    p.add_argument("--min-bucket", type=int, default=32,
                   help="smallest padded row length (a power of two); e.g. 512 puts every zero-shot row in one "
                        "length bucket: fewer compilations, more padding compute")
    p.add_argument("--min-scored", type=int, default=8,
                   help="smallest bucket of scored positions per row (the output layer runs there); a value >= "
                        "the context length scores all T positions: one shape per length bucket")


def add_jax_args(p: argparse.ArgumentParser) -> None:
    """--matmul-precision / --compile-cache (shared with `dejavu_jax.report sweep`); see `apply_jax_args`."""
    p.add_argument("--matmul-precision", choices=("default", "high", "highest"), default="highest",
                   help="jax_default_matmul_precision; 'highest' keeps float32 matmuls in full float32 on GPUs "
                        "(no TF32), as transformers torch does by default")
    p.add_argument("--compile-cache", default=str(Path.home() / ".cache" / "dejavu_jax" / "jax_compile"),
                   help="persistent XLA compilation cache directory ('' to disable): repeated runs skip "
                        "recompiling the scoring function for each (batch, length) shape")


def apply_jax_args(args) -> None:
    """Set JAX's matmul precision and persistent compilation cache from `add_jax_args`' flags."""
    import jax

    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(args.compile_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def check_shape_args(args) -> None:
    for flag in ("min_bucket", "min_scored"):
        v = getattr(args, flag)
        if v < 1 or v & (v - 1):
            raise TaskError(f"--{flag.replace('_', '-')} must be a positive power of two, got {v}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dejavu_jax.eval",
        description="Perplexity (WikiText-2, C4) and zero-shot accuracy (lm-eval-harness formats) of a dense "
                    "or sparse dejavu_jax checkpoint. Writes JSON + a markdown table.",
        formatter_class=HelpFormatter)
    p.add_argument("--model", help="checkpoint directory (python -m convert ...); default: the SmolLM2-135M "
                                   "checkpoint of dejavu_jax.default_model")
    p.add_argument("--tasks", default=ALL_TASKS, help=f"comma-separated tasks or 'all'; valid: {ALL_TASKS}")
    p.add_argument("--limit", type=int, default=None,
                   help="first N documents per zero-shot task; first N windows per perplexity task")
    p.add_argument("--batch-size", type=int, default=32, help="max sequences per forward pass")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="max padded tokens per forward pass (rows = min(batch size, this // padded length))")
    add_shape_args(p)
    p.add_argument("--dtype", default="float32", help="parameter/activation dtype: float32, bfloat16, float16")
    p.add_argument("--context-length", "--max-length", dest="context_length", type=int, default=None,
                   help="tokens per window / max request length (default: min(2048, model max positions))")
    p.add_argument("--stride", type=int, default=None,
                   help="perplexity: new tokens scored per window (default: the context length, disjoint windows)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="evaluation data (relative to the repo root)")
    p.add_argument("--out", default=None, help="output JSON (default results/eval_<model>_<mode>.json; "
                                              "the markdown table goes next to it as .md)")
    p.add_argument("--mode", choices=MODES, default="dense", help="dense, or how sparse indices are chosen")
    p.add_argument("--mlp-density", type=float, default=1.0, help="fraction of MLP neurons kept (sparse modes)")
    p.add_argument("--head-density", type=float, default=1.0, help="fraction of attention heads kept (sparse modes)")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=True,
                   help="predictor pairing: layer l's selection from layer l-1's input (must match training)")
    p.add_argument("--mlp-topk-block", type=int, default=0, metavar="B",
                   help="predictor and oracle modes: rank the MLP neurons per block of B consecutive ones, "
                        "each block keeping its share of K (0 = one top-K over the layer)")
    p.add_argument("--predictors", default=None,
                   help="predictors/ directory (mode predictor; threshold mode reads its thresholds.json); "
                        "default MODEL/predictors")
    add_jax_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        task_list = tasks_lib.get_tasks(args.tasks)
        data_dir = resolve_repo_path(args.data_dir)
        for task in task_list:
            tasks_lib.task_path(task, data_dir)
        for flag in ("mlp_density", "head_density"):
            if not 0.0 < getattr(args, flag) <= 1.0:
                raise TaskError(f"--{flag.replace('_', '-')} must be in (0, 1], got {getattr(args, flag)}")
        if args.limit is not None and args.limit < 1:
            raise TaskError(f"--limit must be >= 1, got {args.limit}")
        check_shape_args(args)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax

    from dejavu_jax.checkpoint import CheckpointError, load_checkpoint, load_tokenizer, parse_dtype

    apply_jax_args(args)

    try:
        dtype = parse_dtype(args.dtype)
        from dejavu_jax.default_model import model_dir_or_default

        model_dir = model_dir_or_default(args.model)
        cfg, params = load_checkpoint(model_dir, dtype)
        tokenizer = load_tokenizer(model_dir)
        if tokenizer is None:
            raise CheckpointError(f"{model_dir} has no tokenizer files; evaluation needs the model's tokenizer")
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    selector = None
    if args.mode != "dense":
        try:
            from dejavu_jax.sparse import build_selector, default_predictors
        except ImportError as e:
            print(f"error: --mode {args.mode} needs dejavu_jax.sparse ({e})", file=sys.stderr)
            return 2
        # predictor mode reads the predictors; threshold mode reads thresholds.json from the same directory
        predictors = default_predictors(model_dir, args.predictors)
        try:
            selector = build_selector(cfg, params, mode=args.mode, mlp_density=args.mlp_density,
                                      head_density=args.head_density, predictors=predictors,
                                      lookahead=args.lookahead, mlp_topk_block=args.mlp_topk_block)
        except (ValueError, OSError) as e:
            print(f"error: --mode {args.mode}: {e}", file=sys.stderr)
            return 2

    context_length = args.context_length or min(2048, cfg.max_positions)
    if args.stride is not None and not 1 <= args.stride <= context_length:
        print(f"error: --stride must be in [1, {context_length}], got {args.stride}", file=sys.stderr)
        return 2
    settings = EvalSettings(context_length=context_length, stride=args.stride, limit=args.limit,
                            data_dir=data_dir, progress=not args.no_progress)
    tag = f"{model_dir.name}_{args.mode}" + ("" if args.mode == "dense" else f"_mlp{args.mlp_density:g}_head{args.head_density:g}")
    tag += f"_block{args.mlp_topk_block}" if args.mlp_topk_block else ""
    out = resolve_repo_path(args.out or f"results/eval_{tag}.json")
    device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind} x{jax.device_count()}"
    print(f"evaluating {model_dir} ({cfg.name or cfg.family}, {args.dtype}, mode {args.mode}) on {device}; "
          f"tasks {','.join(t.name for t in task_list)}; context {context_length}, limit {args.limit}", flush=True)
    try:
        report = evaluate(params, cfg, tokenizer, [t.name for t in task_list], settings, selector=selector,
                          batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                          min_bucket=args.min_bucket, min_scored=args.min_scored)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["meta"] = {
        "model": str(model_dir), "config_name": cfg.name, "mode": args.mode, "mlp_density": args.mlp_density,
        "head_density": args.head_density, "mlp_topk_block": args.mlp_topk_block,
        "predictors": args.predictors, "dtype": args.dtype, "device": device,
        "matmul_precision": args.matmul_precision,
        "context_length": context_length, "stride": args.stride or context_length, "limit": args.limit,
        "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
        "min_bucket": args.min_bucket, "min_scored": args.min_scored,
        "command": "python -m dejavu_jax.eval " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    json_path, md_path = write_report(report, out)
    print(markdown_table(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Collect predictor training data: run the dense model on C4 documents and save, per layer, the
residual streams the predictors read and the labels they learn.

    python -m train.collect --model MODEL_DIR --out DATA_DIR [--data C4.jsonl.gz] [--max-tokens N]

Per shard (`shard_00000/`, fp16 .npy, layer-major so one layer is one contiguous slice):
  block.npy   [L, N, D]  residual entering layer l (pre-norm)   -> predictor inputs
  mlp.npy     [L, N, D]  residual entering layer l's MLP        -> no-lookahead MLP input
  neuron.npy  [L, N, F]  |activation| (OPT: ReLU output, label = > 0; Llama: |SiLU(gate) * up|,
                         top-K labels derived at fit time for the chosen K)
  head.npy    [L, N, H]  L2 norm of each head's output before the out projection
  meta.json   token count
Both residuals are stored so that one collection serves both lookahead settings: which residual a
predictor reads is decided by `dejavu_jax.sparse.input_source`, the function inference uses too.

Documents are tokenized, cut into windows of --seq-len tokens and grouped deterministically into
shards of about --shard-tokens tokens until --max-tokens; a re-run skips finished shards (resume), and
each shard is written under a temporary name and renamed, so no half shard is ever left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dejavu_jax.cli import HelpFormatter
from dejavu_jax.config import ModelConfig
from dejavu_jax.model import Params, forward, positions_from_valid
from dejavu_jax.sparse import model_fingerprint, params_digest
from dejavu_jax.tasks import TaskError, read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/c4/c4_train_predictor500.jsonl.gz"
MANIFEST = "collect.json"
ARRAYS = ("block", "mlp", "neuron", "head")
FP16_MAX = 65504.0


class CollectError(ValueError):
    pass


def resolve_data_path(path: str | Path) -> Path:
    """Relative data paths are relative to the repository root (not the working directory)."""
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def read_documents(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts of a JSON-lines file (optionally gzipped) whose rows have a "text" field."""
    path = Path(path)
    if not path.is_file():
        raise CollectError(f"data file {path} does not exist")
    try:
        rows = read_jsonl(path, limit)  # the evaluation's reader: same file:line errors
    except TaskError as e:
        raise CollectError(str(e)) from None
    docs = []
    for n, row in rows:
        if not isinstance(row.get("text"), str):
            raise CollectError(f"{path}:{n}: row has no string field 'text'")
        docs.append(row["text"])
    if not docs:
        raise CollectError(f"{path} holds no documents")
    return docs


def make_windows(token_lists: Sequence[Sequence[int]], seq_len: int, min_len: int = 8) -> list[np.ndarray]:
    """Cut each document into non-overlapping windows of at most seq_len tokens (short tails dropped)."""
    rows = []
    for toks in token_lists:
        toks = np.asarray(toks, np.int32)
        for start in range(0, len(toks), seq_len):
            piece = toks[start:start + seq_len]
            if len(piece) >= min_len:
                rows.append(piece)
    return rows


def plan_shards(rows: Sequence[np.ndarray], max_tokens: int, shard_tokens: int) -> list[list[np.ndarray]]:
    """Deterministic grouping of windows into shards of ~shard_tokens tokens, max_tokens in all."""
    shards, current, in_shard, total = [], [], 0, 0
    for row in rows:
        if total >= max_tokens:
            break
        row = row[:max_tokens - total]
        current.append(row)
        in_shard += len(row)
        total += len(row)
        if in_shard >= shard_tokens:
            shards.append(current)
            current, in_shard = [], 0
    if current:
        shards.append(current)
    return shards


class _MlpInputTap:
    """A dense 'selector' that only records each layer's MLP input (the no-lookahead MLP predictor input)."""

    def __init__(self):
        self.mlp_inputs: list = []

    def heads(self, ctx):
        return None

    def neurons(self, ctx):
        self.mlp_inputs.append(ctx.mlp_input)
        return None


def make_record_fn(cfg: ModelConfig):
    """Jitted dense pass returning fp16 [L, B, T, ...] arrays: block, mlp, neuron, head."""

    def run(params, tokens, valid):
        rec: list = []
        tap = _MlpInputTap()
        forward(params, cfg, tokens, positions_from_valid(valid), valid=valid, selector=tap, record=rec,
                return_hidden=True)
        f16 = lambda xs: jnp.clip(jnp.stack(xs).astype(jnp.float32), -FP16_MAX, FP16_MAX).astype(jnp.float16)  # noqa: E731
        return {"block": f16([r["input"] for r in rec]), "mlp": f16(tap.mlp_inputs),
                "neuron": f16([r["neuron_importance"] for r in rec]), "head": f16([r["head_importance"] for r in rec])}

    return jax.jit(run)


def shard_dir(out: Path, i: int) -> Path:
    return out / f"shard_{i:05d}"


def shard_done(out: Path, i: int) -> bool:
    return (shard_dir(out, i) / "meta.json").is_file()


def write_manifest(out: Path, manifest: dict) -> None:
    """Create or check the collection manifest; a different model or windowing cannot resume here."""
    path = out / MANIFEST
    keys = ("model_fingerprint", "params_digest", "seq_len", "shard_tokens", "max_tokens", "data")
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in keys if old.get(k) != manifest.get(k)]
        if diff:
            raise CollectError(f"{out} holds data collected with other settings ({', '.join(diff)} differ: "
                               f"{ {k: old.get(k) for k in diff} } vs { {k: manifest.get(k) for k in diff} }); "
                               f"use another --out or delete it")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)


def collect(params: Params, cfg: ModelConfig, rows: Sequence[np.ndarray], out: str | Path, *, max_tokens: int,
            seq_len: int, shard_tokens: int = 8192, batch_size: int = 4, data_name: str = "",
            progress: bool = True) -> dict:
    """Run the dense model over `rows` (token windows) and write shards to `out`. Returns the manifest."""
    from dejavu_jax.checkpoint import atomic_directory

    if max_tokens < 1 or seq_len < 1 or shard_tokens < 1 or batch_size < 1:
        raise CollectError("max_tokens, seq_len, shard_tokens and batch_size must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(rows, max_tokens, shard_tokens)
    if not shards:
        raise CollectError("no token windows to collect (documents too short?)")
    manifest = {
        "model_fingerprint": model_fingerprint(cfg), "params_digest": params_digest(params),
        "model_name": cfg.name, "model_config": cfg.to_dict(), "seq_len": seq_len, "shard_tokens": shard_tokens,
        "max_tokens": max_tokens, "data": data_name, "num_shards": len(shards),
        "tokens": int(sum(len(r) for s in shards for r in s)), "arrays": list(ARRAYS),
        "neuron_label": "relu_output>0" if cfg.activation == "relu" else "abs(silu(gate)*up), top-K at fit time",
        "head_label": "output L2 norm, top-K at fit time",
    }
    write_manifest(out, manifest)
    record = make_record_fn(cfg)
    todo = [i for i in range(len(shards)) if not shard_done(out, i)]
    bar = tqdm(total=sum(len(r) for i in todo for r in shards[i]), unit="tok", desc="collect", disable=not progress)
    for i in todo:
        parts = {k: [] for k in ARRAYS}
        rows_i = shards[i]
        for b in range(0, len(rows_i), batch_size):
            batch = rows_i[b:b + batch_size]
            tokens = np.zeros((batch_size, seq_len), np.int32)  # fixed shape: one compilation
            valid = np.zeros((batch_size, seq_len), bool)
            for r, row in enumerate(batch):
                tokens[r, :len(row)] = row
                valid[r, :len(row)] = True
            arrays = jax.device_get(record(params, jnp.asarray(tokens), jnp.asarray(valid)))
            for k in ARRAYS:
                parts[k].append(arrays[k][:, valid])  # [L, n_valid, X]: padding dropped
            bar.update(int(valid.sum()))
        with atomic_directory(shard_dir(out, i), overwrite=True) as tmp:
            n = 0
            for k in ARRAYS:
                a = np.concatenate(parts[k], axis=1)
                np.save(tmp / f"{k}.npy", a)
                n = a.shape[1]
            (tmp / "meta.json").write_text(json.dumps({"tokens": int(n)}) + "\n")
    bar.close()
    return manifest


def load_collection(directory: str | Path) -> tuple[dict, list[Path]]:
    """(manifest, finished shard dirs) of a collection; raises if it is missing or incomplete."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CollectError(f"{directory} is not a predictor-data directory (no {MANIFEST}); "
                           f"run `python -m train.collect` first")
    manifest = json.loads(path.read_text())
    shards = [shard_dir(directory, i) for i in range(manifest["num_shards"])]
    missing = [s.name for s in shards if not (s / "meta.json").is_file()]
    if missing:
        raise CollectError(f"{directory} is incomplete ({len(missing)} of {len(shards)} shards missing, "
                           f"e.g. {missing[0]}); re-run train.collect with the same flags to finish it")
    return manifest, shards


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.collect", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help="dejavu_jax checkpoint directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="JSON-lines (.gz) documents with a 'text' field; relative paths are from the repo root")
    p.add_argument("--out", required=True, help="output directory (re-running resumes it)")
    p.add_argument("--max-tokens", type=int, default=100_000, help="token budget over all shards")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--shard-tokens", type=int, default=8192, help="tokens per shard")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--max-docs", type=int, default=None, help="read only the first N documents")
    p.add_argument("--dtype", default="float32", help="compute dtype of the model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dejavu_jax.checkpoint import CheckpointError, load_checkpoint, load_tokenizer, parse_dtype

    try:
        from dejavu_jax.default_model import model_dir_or_default

        model_dir = model_dir_or_default(args.model)
        cfg, params = load_checkpoint(model_dir, parse_dtype(args.dtype))
        tok = load_tokenizer(model_dir)
        if tok is None:
            raise CollectError(f"{model_dir} has no tokenizer files; collection needs one")
        data = resolve_data_path(args.data)
        docs = read_documents(data, args.max_docs)
        ids = [tok(d)["input_ids"] for d in tqdm(docs, desc="tokenize", unit="doc")]
        rows = make_windows(ids, args.seq_len)
        manifest = collect(params, cfg, rows, args.out, max_tokens=args.max_tokens, seq_len=args.seq_len,
                           shard_tokens=args.shard_tokens, batch_size=args.batch_size, data_name=str(data))
    except (CollectError, CheckpointError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps({k: manifest[k] for k in ("model_name", "tokens", "num_shards", "seq_len")}))
    print(f"wrote {manifest['num_shards']} shards ({manifest['tokens']} tokens) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

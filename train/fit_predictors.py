"""Fit the low-rank predictors (one per layer and site) on data from `train.collect`.

    python -m train.fit_predictors --data DATA_DIR --model MODEL_DIR [--rank 128] [--out MODEL_DIR/predictors]

Predictor: residual / RMS -> [D, r] -> [r, N] scores, no bias, no nonlinearity (Deja Vu's shape), except
for gated (SwiGLU) MLPs, whose default `--mlp-predictor magnitude` predicts the gate and up
pre-activations from one rank-r code and scores log|silu(g) u| (`dejavu_jax.sparse.predictor_logits`): it is
initialised training-free by reduced-rank least squares from the predictor input to the layer's exact
(gate, up) pre-activations (computed from the collected MLP inputs and the model weights), then fine-tuned
with the same loss. Labels:
  MLP, ReLU models: neuron fires (ReLU output > 0); MLP, SwiGLU models: neuron is among the top-K of
  |SiLU(gate) * up| for that token; heads: head is among the top-K output norms for that token.
K comes from --mlp-density / --head-density (the schedule the predictors are meant for; recall is
reported at that K). Loss: class-balanced BCE (positives weighted 1-w, negatives w, w = label mean),
optax AdamW, early stopping on validation recall@K (patience epochs without gain, or recall > --stop-recall).

Writes `predictors/` atomically: orbax params, predictor_config.json (rank, K schedule, lookahead,
per-layer recall, model fingerprint), thresholds.json (importance quantiles for the threshold
baseline), fit_report.json and fit_report.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dejavu_jax.cli import HelpFormatter
from dejavu_jax.config import ModelConfig
from dejavu_jax.sparse import (
    KINDS,
    MLP_PREDICTORS,
    THRESHOLDS_FILE,
    SparsityConfig,
    importance_quantiles,
    input_source,
    model_fingerprint,
    normalize_input,
    params_digest,
    predictor_logits,
    save_predictors,
    topk_mask,
    QUANTILE_LEVELS,
)
from train.collect import CollectError, load_collection


@dataclasses.dataclass(frozen=True)
class FitConfig:
    rank: int = 128
    lookahead: bool = True
    mlp_density: float = 0.5
    head_density: float = 0.5
    mlp_predictor: str | None = None  # "linear" | "magnitude"; None: magnitude for gated MLPs, else linear
    lr_mlp: float | None = None  # None: 1e-3 (linear), 1e-4 (magnitude: fine-tuning a least-squares init)
    lr_heads: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 1024
    epochs: int = 20
    patience: int = 5
    stop_recall: float = 0.99
    val_fraction: float = 0.05
    seed: int = 0
    max_quantile_samples: int = 2_000_000

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        for name in ("mlp_density", "head_density"):
            d = getattr(self, name)
            if not (0.0 < d <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {d}")
        if not (0.0 < self.val_fraction < 0.5):
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.epochs < 0 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs must be >= 0, batch_size and patience >= 1")
        if self.mlp_predictor is not None and self.mlp_predictor not in MLP_PREDICTORS:
            raise ValueError(f"unknown MLP predictor {self.mlp_predictor!r}; choose one of {', '.join(MLP_PREDICTORS)}")

    def mlp_form(self, cfg: ModelConfig) -> str:
        """The MLP predictor form for this model (the default depends on whether the MLP is gated)."""
        gated = cfg.up_rows == 2
        form = self.mlp_predictor or ("magnitude" if gated else "linear")
        if form == "magnitude" and not gated:
            raise ValueError(f"the magnitude MLP predictor needs a gated MLP; {cfg.name or 'this model'} has a "
                             f"{cfg.activation} MLP (use --mlp-predictor linear)")
        return form

    def mlp_lr(self, form: str) -> float:
        return self.lr_mlp if self.lr_mlp is not None else (1e-3 if form == "linear" else 1e-4)


class LayerData:
    """The collected arrays of one layer (and the layer before, for the lookahead input)."""

    def __init__(self, shards: Sequence[Path]):
        self.shards = list(shards)
        self._cache: dict = {}

    def get(self, name: str, layer: int) -> np.ndarray:
        key = (name, layer)
        if key not in self._cache:
            parts = [np.load(s / f"{name}.npy", mmap_mode="r")[layer] for s in self.shards]
            self._cache = {k: v for k, v in self._cache.items() if k[1] >= layer - 1}  # keep memory bounded
            self._cache[key] = np.concatenate(parts, axis=0)
        return self._cache[key]


def predictor_input(data: LayerData, kind: str, layer: int, lookahead: bool) -> np.ndarray:
    site, j = input_source(kind, layer, lookahead)
    return data.get("block" if site == "block" else "mlp", j)


def make_labels(importance: np.ndarray, k: int, relu_mlp: bool) -> np.ndarray:
    """Boolean targets [N, n]: ReLU firing for OPT MLPs, else the top-k importances of each token."""
    if relu_mlp:
        return importance > 0
    return np.asarray(topk_mask(jnp.asarray(importance, jnp.float32), k))


def recall_precision(scores: jax.Array, labels: jax.Array, k: int) -> tuple[float, float]:
    """Recall and precision of the top-k scores against boolean labels (both [N, n])."""
    pred = topk_mask(scores, k)
    tp = jnp.sum(pred & labels)
    return float(tp / jnp.maximum(jnp.sum(labels), 1)), float(tp / jnp.maximum(jnp.sum(pred), 1))


def balanced_bce(logits: jax.Array, labels: jax.Array, w: jax.Array) -> jax.Array:
    """Deja Vu's class-balanced BCE: positives weighted 1-w, negatives w (w = positive rate)."""
    y = labels.astype(jnp.float32)
    pos = -jax.nn.log_sigmoid(logits)
    neg = -jax.nn.log_sigmoid(-logits)
    return jnp.mean((1.0 - w) * y * pos + w * (1.0 - y) * neg)


@jax.jit
def _scores(p, x):
    return predictor_logits(p, x)


def split_rows(n_rows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices, each sorted: the held-out split of `fit_one` for this seed."""
    perm = np.random.default_rng(seed).permutation(n_rows)
    n_val = max(1, int(round(val_fraction * n_rows)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def magnitude_init(x: np.ndarray, h: np.ndarray, w: jax.Array, rank: int, k: int, ridge: float = 1e-3,
                   offset_rows: int = 2048) -> dict:
    """Training-free magnitude predictor: reduced-rank least squares from the predictor input to the exact
    gate and up pre-activations.

    x [n, D] predictor inputs (raw residuals); h [n, D] the layer's MLP input after its norm; w [2F, D]
    gate rows then up rows. The rank-r map is the least-squares map x -> h @ w.T (with a constant
    term, ridge-regularised) projected onto the top-r right singular vectors of its fitted values:
    data-aware, unlike a truncated SVD of w, which ranks neurons far worse at the same rank.
    z is scaled to unit RMS per component, and the bias offset makes about k of F logits positive.
    """
    F = w.shape[0] // 2
    xn = normalize_input(jnp.asarray(x))
    x1 = jnp.concatenate([xn, jnp.ones((xn.shape[0], 1), jnp.float32)], axis=1)  # [n, D+1]
    d1 = x1.shape[1]
    gram = x1.T @ x1
    gram = gram + ridge * jnp.mean(jnp.diag(gram)) * jnp.eye(d1)
    coef = jnp.linalg.solve(gram, (x1.T @ jnp.asarray(h, jnp.float32)) @ w.astype(jnp.float32).T)  # [D+1, 2F]
    chol = jnp.linalg.cholesky(gram)  # fitted values' right singular vectors = those of chol.T @ coef
    _, _, vt = jnp.linalg.svd(chol.T @ coef, full_matrices=False)
    v = vt[:rank]  # [r, 2F]
    a = coef[:-1] @ v.T  # [D, r]
    c = coef[-1] @ v.T @ v  # [2F]: the constant term, projected like the rest
    rms = jnp.sqrt(jnp.mean(jnp.square(xn @ a), axis=0)) + 1e-6
    a, v = a / rms, v * rms[:, None]
    p = {"a": a, "bg": v[:, :F], "bu": v[:, F:], "cg": c[:F], "cu": c[F:],
         "bias": jnp.zeros((F,), jnp.float32), "scale": jnp.ones((1,), jnp.float32)}
    logits = predictor_logits(p, jnp.asarray(x[:offset_rows]))  # [n', F]
    kth = jnp.sort(logits, axis=-1)[:, F - min(k, F)]
    p["bias"] = p["bias"] - jnp.median(kth)
    return p


def fit_one(x: np.ndarray, y: np.ndarray, k: int, lr: float, fc: FitConfig, seed: int,
            init=None) -> tuple[dict, dict]:
    """Train one predictor. x [N, D] residuals, y [N, n] bool labels. Returns (params, metrics).

    init: None (a random linear predictor) or a function of the training row indices that returns
    the starting params (any `predictor_logits` form); the start then counts as epoch 0, so
    fine-tuning can only keep or improve its validation recall.
    """
    n_rows, d = x.shape
    n_out = y.shape[1]
    tr, val = split_rows(n_rows, fc.val_fraction, seed)
    x_tr, y_tr = jnp.asarray(x[tr], jnp.float32), jnp.asarray(y[tr])
    x_val, y_val = jnp.asarray(x[val], jnp.float32), jnp.asarray(y[val])
    n_val = len(val)
    w = jnp.mean(y_tr.astype(jnp.float32))
    bs = min(fc.batch_size, x_tr.shape[0])
    steps = max(1, x_tr.shape[0] // bs)

    key = jax.random.PRNGKey(seed)
    ka, kb = jax.random.split(key)
    if init is None:
        params = {"a": jax.random.normal(ka, (d, fc.rank)) / np.sqrt(d),
                  "b": jax.random.normal(kb, (fc.rank, n_out)) / np.sqrt(fc.rank)}
    else:
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), init(tr))
    opt = optax.adamw(lr, weight_decay=fc.weight_decay)
    state = opt.init(params)

    @jax.jit
    def epoch(params, state, key):
        order = jax.random.permutation(key, x_tr.shape[0])[: steps * bs].reshape(steps, bs)

        def step(carry, idx):
            params, state = carry
            loss, grads = jax.value_and_grad(lambda p: balanced_bce(predictor_logits(p, x_tr[idx]), y_tr[idx], w))(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, state), losses = jax.lax.scan(step, (params, state), order)
        return params, state, losses.mean()

    best = (-1.0, 0.0, params, 0)
    since_best, history = 0, []
    if init is not None or fc.epochs == 0:
        rec, prec = recall_precision(_scores(params, x_val), y_val, k)
        history.append({"epoch": 0, "loss": None, "val_recall": rec, "val_precision": prec})
        best = (rec, prec, params, 0)
    for ep in range(fc.epochs):
        key, sub = jax.random.split(key)
        params, state, loss = epoch(params, state, sub)
        rec, prec = recall_precision(_scores(params, x_val), y_val, k)
        history.append({"epoch": ep + 1, "loss": float(loss), "val_recall": rec, "val_precision": prec})
        if rec > best[0] + 1e-4:
            best, since_best = (rec, prec, params, ep + 1), 0
        else:
            since_best += 1
        if rec >= fc.stop_recall or since_best >= fc.patience:
            break
    rec, prec, params, ep = best
    return params, {"recall": rec, "precision": prec, "best_epoch": ep, "epochs_run": len(history),
                    "positive_rate": float(w), "k": int(k), "n_out": int(n_out), "train_rows": int(x_tr.shape[0]),
                    "val_rows": int(n_val), "history": history}


def fit_predictors(data_dir: str | Path, cfg: ModelConfig, params, fc: FitConfig,
                   progress: bool = True) -> tuple[list, dict, dict]:
    """Fit every layer's predictors. Returns (predictor params, predictor config, threshold tables)."""
    manifest, shards = load_collection(data_dir)
    if manifest["model_fingerprint"] != model_fingerprint(cfg):
        raise CollectError(f"{data_dir} was collected from another model ({manifest.get('model_name')}); "
                           f"collect again with this model")
    if params is not None and manifest.get("params_digest"):
        from dejavu_jax.sparse import check_digest

        check_digest(manifest["params_digest"], params, f"the data in {data_dir}")
    sp = SparsityConfig(mode="predictor", mlp_density=fc.mlp_density, head_density=fc.head_density,
                        lookahead=fc.lookahead)
    mlp_k, head_k = sp.mlp_schedule(cfg), sp.head_schedule(cfg)
    data = LayerData(shards)
    relu = cfg.activation == "relu"
    mlp_form = fc.mlp_form(cfg)
    if mlp_form == "magnitude" and params is None:
        raise ValueError("the magnitude MLP predictor is initialised from the model's gate/up weights; "
                         "fit_predictors needs the model params")
    preds, report = [], {"mlp": [], "heads": []}
    tables = {"mlp": [], "heads": []}
    sample_rng = np.random.default_rng(fc.seed)
    bar = tqdm(total=2 * cfg.num_layers, desc="fit", unit="predictor", disable=not progress)
    for layer in range(cfg.num_layers):
        layer_preds = {}
        for kind in KINDS:
            imp = data.get("neuron" if kind == "mlp" else "head", layer)
            k = mlp_k[layer] if kind == "mlp" else head_k[layer]
            y = make_labels(imp, k, relu and kind == "mlp")
            x = predictor_input(data, kind, layer, fc.lookahead)
            lr = fc.mlp_lr(mlp_form) if kind == "mlp" else fc.lr_heads
            init = None
            if kind == "mlp" and mlp_form == "magnitude":
                init = _magnitude_init_fn(params, cfg, data, layer, x, k, fc.rank)
            p, metrics = fit_one(x, y, k, lr, fc, seed=fc.seed + 2 * layer + (kind == "heads"), init=init)
            layer_preds[kind] = jax.device_get(p)
            metrics["layer"] = layer
            report[kind].append(metrics)
            flat = imp.reshape(-1)
            if flat.size > fc.max_quantile_samples:
                flat = flat[sample_rng.choice(flat.size, fc.max_quantile_samples, replace=False)]
            tables[kind].append(importance_quantiles(flat).tolist())
            bar.set_postfix(layer=layer, kind=kind, recall=f"{metrics['recall']:.3f}")
            bar.update(1)
        preds.append(layer_preds)
    bar.close()
    summary = {kind: {"mean_recall": float(np.mean([m["recall"] for m in report[kind]])),
                      "min_recall": float(np.min([m["recall"] for m in report[kind]])),
                      "mean_precision": float(np.mean([m["precision"] for m in report[kind]]))} for kind in KINDS}
    pconfig = {
        "format": "dejavu_jax.predictors/1", "rank": fc.rank, "lookahead": fc.lookahead, "mlp_predictor": mlp_form,
        "input_normalization": "rms", "sparsity": sp.to_dict(), "mlp_k": list(mlp_k), "head_k": list(head_k),
        "labels": {"mlp": "relu_output>0" if relu else "top-K of abs(silu(gate)*up)",
                   "heads": "top-K of head output L2 norm"},
        "recall": {kind: [m["recall"] for m in report[kind]] for kind in KINDS},
        "precision": {kind: [m["precision"] for m in report[kind]] for kind in KINDS},
        "summary": summary, "model_fingerprint": model_fingerprint(cfg),
        "params_digest": params_digest(params) if params is not None else manifest.get("params_digest"),
        "model_name": cfg.name, "model_config": cfg.to_dict(), "fit": dataclasses.asdict(fc),
        "data": {k: manifest[k] for k in ("data", "tokens", "seq_len", "num_shards")},
        "per_layer": report,
    }
    return preds, pconfig, tables


def _magnitude_init_fn(params, cfg: ModelConfig, data: LayerData, layer: int, x: np.ndarray, k: int, rank: int):
    """`fit_one` init for layer's magnitude predictor: least squares on the training rows only."""
    from dejavu_jax.model import norm

    lp = params["layers"][layer]
    w = jnp.concatenate([lp["up"][:, 0], lp["up"][:, 1]], axis=0).astype(jnp.float32)  # [2F, D] gate, up rows
    mlp_in = data.get("mlp", layer)

    def init(rows: np.ndarray) -> dict:
        h = norm(lp["mlp_norm"], jnp.asarray(mlp_in[rows], jnp.float32), cfg)
        return magnitude_init(np.asarray(x[rows], np.float32), h, w, rank, k)

    return init


def report_markdown(pconfig: dict) -> str:
    lines = [f"# Predictor fit: {pconfig['model_name'] or pconfig['model_fingerprint']}", "",
             f"rank {pconfig['rank']}, lookahead {pconfig['lookahead']}, "
             f"MLP predictor {pconfig.get('mlp_predictor', 'linear')}, "
             f"{pconfig['data']['tokens']} tokens; recall/precision of the top-K predicted against the labels "
             f"({pconfig['labels']['mlp']}; {pconfig['labels']['heads']}) on the held-out split.", "",
             "| layer | MLP K | MLP recall | MLP precision | heads K | heads recall | heads precision | epochs (mlp/heads) |",
             "|---|---|---|---|---|---|---|---|"]
    for m, h in zip(pconfig["per_layer"]["mlp"], pconfig["per_layer"]["heads"]):
        lines.append(f"| {m['layer']} | {m['k']}/{m['n_out']} | {m['recall']:.3f} | {m['precision']:.3f} | "
                     f"{h['k']}/{h['n_out']} | {h['recall']:.3f} | {h['precision']:.3f} | "
                     f"{m['best_epoch']}/{h['best_epoch']} |")
    s = pconfig["summary"]
    lines += ["", f"mean recall: MLP {s['mlp']['mean_recall']:.3f} (min {s['mlp']['min_recall']:.3f}), "
                  f"heads {s['heads']['mean_recall']:.3f} (min {s['heads']['min_recall']:.3f})", ""]
    return "\n".join(lines)


def write_predictors(out: str | Path, preds: list, pconfig: dict, tables: dict, cfg: ModelConfig) -> Path:
    per_layer = pconfig.pop("per_layer")
    report = {**pconfig, "per_layer": per_layer}
    thresholds = {"model_fingerprint": model_fingerprint(cfg), "levels": QUANTILE_LEVELS.tolist(), **tables}
    pconfig_slim = dict(pconfig)
    files = {THRESHOLDS_FILE: json.dumps(thresholds) + "\n",
             "fit_report.json": json.dumps(report, indent=2) + "\n",
             "fit_report.md": report_markdown(report)}
    return save_predictors(out, preds, pconfig_slim, extra_files=files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.fit_predictors", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="directory written by train.collect")
    p.add_argument("--model", help="checkpoint directory the data was collected from (default: embedded SmolLM2)")
    p.add_argument("--out", help="predictors directory (default: MODEL_DIR/predictors)")
    p.add_argument("--rank", type=int, default=128, help="predictor rank r (D -> r -> N)")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=True,
                   help="layer l's predictors read the residual entering layer l-1")
    p.add_argument("--mlp-density", type=float, default=0.5, help="K/F the MLP predictors are trained and scored for")
    p.add_argument("--head-density", type=float, default=0.5, help="K/H the head predictors are trained and scored for")
    p.add_argument("--mlp-predictor", choices=MLP_PREDICTORS, default=None,
                   help="MLP predictor form (default: magnitude for gated MLPs, linear for ReLU)")
    p.add_argument("--lr-mlp", type=float, default=None, help="default 1e-3 (linear), 1e-4 (magnitude)")
    p.add_argument("--lr-heads", type=float, default=1e-3, help="AdamW learning rate of the head predictors")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per optimizer step")
    p.add_argument("--epochs", type=int, default=20, help="0: the initialisation only (training-free magnitude)")
    p.add_argument("--patience", type=int, default=5, help="epochs without validation-recall gain before stopping")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dejavu_jax.checkpoint import CheckpointError, load_checkpoint

    try:
        from dejavu_jax.default_model import model_dir_or_default

        model_dir = model_dir_or_default(args.model)
        cfg, params = load_checkpoint(model_dir, jnp.float32)
        fc = FitConfig(rank=args.rank, lookahead=args.lookahead, mlp_density=args.mlp_density,
                       head_density=args.head_density, mlp_predictor=args.mlp_predictor, lr_mlp=args.lr_mlp, lr_heads=args.lr_heads,
                       weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs,
                       patience=args.patience, seed=args.seed)
        t0 = time.time()
        preds, pconfig, tables = fit_predictors(args.data, cfg, params, fc)
        pconfig["fit_seconds"] = round(time.time() - t0, 1)
        out = Path(args.out) if args.out else Path(model_dir) / "predictors"
        write_predictors(out, preds, pconfig, tables, cfg)
    except (CollectError, CheckpointError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print((out / "fit_report.md").read_text())
    print(f"wrote predictors to {out} in {pconfig['fit_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

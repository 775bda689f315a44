"""Contextual sparsity: K schedules, selectors (oracle, threshold, predictor) and the lazy KV cache.

A selector implements `model.Selector`: at every block it says which attention heads and which MLP
neurons to compute. Four modes share one config (`SparsityConfig`):

* dense      no selector at all.
* oracle     per token, the top-K neurons / heads by their *true* importance (|activation| and the
             L2 norm of each head's output), computed densely and then masked: the quality ceiling.
* threshold  TEAL-style: one magnitude threshold per layer and site, calibrated on data so that the
             average kept fraction equals the target density (neurons: |activation| < t is zeroed;
             heads: output norm < t). Training-free baseline; the kept count varies per token.
* predictor  Deja Vu: a low-rank predictor `D -> r -> N` per layer and site scores the neurons /
             heads from the residual stream, and the top-K scores are kept. For gated (SwiGLU) MLPs
             the predictor can instead predict the gate and up pre-activations from one rank-r code
             and score their magnitude (`predictor_logits`, "magnitude" form).

Lookahead pairing (one function, `input_source`, used by training-data collection, fitting and
inference, so the three cannot drift apart):
* lookahead:    layer l's heads AND neurons are predicted from the residual entering layer l-1
                (`SelectContext.prev_input`), so the predictor can run alongside layer l-1; layer 0
                has no previous layer and uses its own block input.
* no lookahead: heads from the residual entering layer l (`block_input`), neurons from the residual
                entering layer l's MLP (`mlp_input`), as in the original Deja Vu predictors.

Predictors see the residual divided by its RMS (parameter-free): residual magnitudes grow by orders
of magnitude with depth, and normalising keeps one learning rate good for every layer.

Evaluation chunks (T > 1) get per-token keep-masks. A decode step with batch 1 (T == 1, B == 1) in
predictor mode gets `Selection(idx=...)` (sorted top-K rows) so the gathered path of `ops` runs and
only the selected weight rows are read. Oracle and threshold modes always mask (they need the dense
activations to know what to keep).

GQA: the query heads are selected (model.py's choice). In the exact KV mode the K/V of every KV head
are written each token; in the lazy mode only the KV heads whose query heads are selected (and
the ones the round-robin refreshes).

Lazy KV mode (Deja Vu's scheme, `init_sparse_cache(..., kv_mode="lazy")`): the cache also keeps the
attention inputs of the last W tokens per layer (a ring buffer). A gathered decode step computes K/V
only for the KV heads of the selected query heads, over all W window tokens (the same weight rows
are read once, so on a memory-bound GPU recomputing W tokens costs about as much as one), plus
ceil(KV / W) more KV heads chosen round-robin, so that every head is refreshed over the window once
every W tokens at a constant cost per step (Deja Vu refreshes all heads every W-th token instead: a
dense step and a branch). `lazy_kv_update` argues why a head's K/V are complete whenever it is
used; the outputs equal exact mode's (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import ModelConfig
from dejavu_jax.model import KVCache, Params, SelectContext, Selection
from pallas_kernels import fused_step_enabled, gathered_window_kv_update_reference, topk_rows_reference
from pallas_kernels.gather_attention import first_occurrences
from pallas_kernels.select_topk import MAX_CODE_BLOCK, order_key

MODES = ("dense", "oracle", "predictor", "threshold")
KV_MODES = ("exact", "lazy")
LAZY_WINDOW = 16  # default W of the lazy KV mode: tokens recomputed per step, and the refresh period
MLP_TOPK_BLOCK = 128  # the per-block MLP top-K's block (SparsityConfig.mlp_topk_block) the CLIs suggest
KINDS = ("mlp", "heads")  # the two sites a selector chooses for

PREDICTOR_CONFIG = "predictor_config.json"
PREDICTOR_PARAMS = "params"
THRESHOLDS_FILE = "thresholds.json"
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 201)  # importance quantile table resolution (0.5% steps)


class SparsityError(ValueError):
    """Bad sparsity settings or predictors that do not fit the model."""


# --------------------------------------------------------------------------------------------
# Config: per-layer K schedules as data
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """Everything that decides how sparse each layer runs. JSON round-trips via to_dict/from_dict.

    mlp_density / head_density: fraction of neurons / query heads kept in the sparse layers
    (K = max(1, round(density * N))). dense_first / dense_last: how many leading / trailing layers
    run dense. mlp_k / head_k: explicit per-layer K lists (length L) that override the densities
    and dense_first/last when given. lookahead: predictor input pairing (see module docstring).
    kv_mode: "exact" or "lazy"; lazy_window: W, the lazy mode's token window and refresh period.
    mlp_topk_block: 0 ranks each layer's F neurons in one top-K. B > 0 ranks them per block of B
    consecutive neurons (F / B blocks), each keeping ceil(K / (F / B)) of its own, as tensor-parallel
    shards do: the decode step's selection then runs in parallel over the blocks, scores included
    (`pallas_kernels.code_topk_rows`), instead of one program searching all F scores. Predictor
    and oracle modes (the oracle's shows what the rule costs with true importances); F must be a
    multiple of B.
    """

    mode: str = "dense"
    mlp_density: float = 1.0
    head_density: float = 1.0
    dense_first: int = 0
    dense_last: int = 0
    mlp_k: tuple[int, ...] | None = None
    head_k: tuple[int, ...] | None = None
    lookahead: bool = True
    kv_mode: str = "exact"
    lazy_window: int = LAZY_WINDOW
    mlp_topk_block: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise SparsityError(f"unknown sparsity mode {self.mode!r}; choose one of {', '.join(MODES)}")
        for name in ("mlp_density", "head_density"):
            d = getattr(self, name)
            if not isinstance(d, (int, float)) or not (0.0 < float(d) <= 1.0) or math.isnan(float(d)):
                raise SparsityError(f"{name} must be in (0, 1], got {d!r}")
        for name in ("dense_first", "dense_last"):
            if int(getattr(self, name)) < 0:
                raise SparsityError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kv_mode not in KV_MODES:
            raise SparsityError(f"unknown kv_mode {self.kv_mode!r}; choose one of {', '.join(KV_MODES)}")
        if int(self.lazy_window) < 1:
            raise SparsityError(f"lazy_window must be >= 1, got {self.lazy_window}")
        if int(self.mlp_topk_block) < 0:
            raise SparsityError(f"mlp_topk_block must be >= 0 (0: one top-K over all neurons), "
                                f"got {self.mlp_topk_block}")
        if self.mlp_topk_block and self.mode not in ("predictor", "oracle"):
            raise SparsityError(f"mlp_topk_block applies to the predictor and oracle modes, not {self.mode!r}")
        for name in ("mlp_k", "head_k"):
            ks = getattr(self, name)
            if ks is not None:
                ks = tuple(int(k) for k in ks)
                if any(k < 1 for k in ks):
                    raise SparsityError(f"{name} entries must be >= 1, got {list(ks)}")
                object.__setattr__(self, name, ks)

    # Schedules ------------------------------------------------------------------------------
    def _schedule(self, cfg: ModelConfig, explicit, density: float, width: int, what: str) -> tuple[int, ...]:
        L = cfg.num_layers
        if explicit is not None:
            if len(explicit) != L:
                raise SparsityError(f"{what} K list has {len(explicit)} entries, the model has {L} layers")
            for layer, k in enumerate(explicit):
                if k > width:
                    raise SparsityError(f"{what} K={k} at layer {layer} is larger than the layer width {width}")
            return tuple(explicit)
        if self.dense_first + self.dense_last > L:
            raise SparsityError(f"dense_first + dense_last = {self.dense_first + self.dense_last} "
                                f"exceeds the {L} layers")
        k = max(1, min(width, int(round(density * width))))
        return tuple(width if (i < self.dense_first or i >= L - self.dense_last) else k for i in range(L))

    def mlp_schedule(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Neurons kept per layer (== ffn_size for dense layers)."""
        return self._schedule(cfg, self.mlp_k, self.mlp_density, cfg.ffn_size, "MLP")

    def head_schedule(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Query heads kept per layer (== num_heads for dense layers)."""
        return self._schedule(cfg, self.head_k, self.head_density, cfg.num_heads, "attention head")

    def mlp_topk_blocks(self, cfg: ModelConfig) -> int:
        """How many blocks each layer's neurons are ranked in (1: one global top-K)."""
        if not self.mlp_topk_block:
            return 1
        if cfg.ffn_size % self.mlp_topk_block:
            raise SparsityError(f"mlp_topk_block={self.mlp_topk_block} does not divide the {cfg.ffn_size} MLP neurons")
        return cfg.ffn_size // self.mlp_topk_block

    def validate(self, cfg: ModelConfig) -> None:
        self.mlp_schedule(cfg)
        self.head_schedule(cfg)
        self.mlp_topk_blocks(cfg)

    # Serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("mlp_k", "head_k"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsityConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SparsityError(f"unknown SparsityConfig fields: {sorted(unknown)}")
        data = dict(data)
        for name in ("mlp_k", "head_k"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# --------------------------------------------------------------------------------------------
# Shared helpers: lookahead pairing, top-K masks, predictor math, model fingerprint
# --------------------------------------------------------------------------------------------
def input_source(kind: str, layer: int, lookahead: bool) -> tuple[str, int]:
    """Which residual the `kind` predictor of `layer` reads: ("block" | "mlp", layer index).

    ("block", j) is the residual entering layer j; ("mlp", j) the residual entering layer j's MLP.
    The one definition of the lookahead pairing, for collection, fitting and inference alike.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown predictor kind {kind!r}")
    if lookahead:
        return ("block", max(layer - 1, 0))
    return ("block", layer) if kind == "heads" else ("mlp", layer)


def _context_input(ctx: SelectContext, kind: str, lookahead: bool) -> jax.Array:
    site, j = input_source(kind, ctx.layer, lookahead)
    if site == "mlp":
        return ctx.mlp_input
    return ctx.block_input if j == ctx.layer else ctx.prev_input


def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """Keep-mask of the k largest entries along the last axis. scores [..., N] -> bool [..., N].

    The k-th largest value is found by a 32-step bisection over the values' int32 sort keys
    (compare + count per step) instead of `lax.top_k`, which on CPU costs a full sort per row
    (~20x a [D, N] matmul at N = 1536). Exact; entries tied with the k-th value are all kept (for
    ReLU importance these are zeros, whose neurons contribute nothing anyway).
    """
    n = scores.shape[-1]
    if k >= n:
        return jnp.ones(scores.shape, bool)
    key = order_key(scores)
    lo = jnp.full(scores.shape[:-1] + (1,), jnp.iinfo(jnp.int32).min, jnp.int32)  # count(key >= lo) >= k
    hi = jnp.full(scores.shape[:-1] + (1,), jnp.iinfo(jnp.int32).max, jnp.int32)

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2) without overflow
        ok = jnp.sum(key >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 33, step, (lo, hi))
    return key >= lo


# Blockwise top-K: N rows in `blocks` equal contiguous blocks, each keeping its top-ceil(K / blocks).
# Tensor-parallel shards are blocks (Deja Vu's per-rank top-K); so is SparsityConfig.mlp_topk_block.
def per_block_k(k: int, blocks: int) -> int:
    """Rows each of `blocks` slices keeps for a layer-wide budget k: ceil(k / blocks)."""
    return -(-k // blocks)


def _check_blocks(n: int, blocks: int) -> None:
    if blocks < 1 or n % blocks:
        raise SparsityError(f"{n} neurons/heads cannot be split into {blocks} equal blocks")


def blockwise_topk_idx(scores: jax.Array, k: int, blocks: int = 1, topk_rows=topk_rows_reference) -> jax.Array:
    """Sorted global indices of the per-block top-(k/blocks). scores [N] -> [blocks * ceil(k/blocks)] int32.

    Block s covers rows s*N/blocks .. (s+1)*N/blocks - 1 and owns positions s*k_b .. (s+1)*k_b - 1
    of the result (k_b = ceil(k/blocks)), ascending within the block: ascending row reads per shard.
    topk_rows: [G, n] scores -> [G, k] ascending indices (an `Ops.topk_rows`).
    """
    n = scores.shape[-1]
    _check_blocks(n, blocks)
    nb, kb = n // blocks, per_block_k(k, blocks)
    local = topk_rows(scores.reshape(blocks, nb), kb)  # [blocks, kb]
    offsets = (jnp.arange(blocks, dtype=jnp.int32) * nb)[:, None]
    return (local.astype(jnp.int32) + offsets).reshape(blocks * kb)


def blockwise_topk_mask(scores: jax.Array, k: int, blocks: int = 1) -> jax.Array:
    """Keep-mask of the per-block top-(k/blocks) along the last axis. scores [..., N] -> bool [..., N].

    Threshold at each block's k_b-th largest value (ties at the boundary kept), found by
    `sparse.topk_mask`'s bisection: compares and counts only, which shard like any reduction, where
    a `lax.top_k` over a sharded axis needs the partitioner's TopK handling (and a sort on CPU).
    """
    n = scores.shape[-1]
    _check_blocks(n, blocks)
    nb, kb = n // blocks, per_block_k(k, blocks)
    if kb >= nb:
        return jnp.ones(scores.shape, bool)
    return topk_mask(scores.reshape(scores.shape[:-1] + (blocks, nb)), kb).reshape(scores.shape)


def _topk_rows(ctx: SelectContext):
    """The top-K index function of the forward's backend (Pallas kernel or lax.top_k + sort)."""
    return ctx.ops.topk_rows if ctx.ops is not None else topk_rows_reference


def normalize_input(x: jax.Array) -> jax.Array:
    """Predictor input: the residual divided by its RMS, in float32. x [..., D] -> [..., D]."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


MLP_PREDICTORS = ("linear", "magnitude")  # the forms an MLP predictor can take (heads are always linear)
MAGNITUDE_EPS = 1e-3  # floor under |silu(g)| and |u| before the log (their natural scale is ~0.1-1)


def predictor_form(p: Params) -> str:
    """"linear" or "magnitude": which `predictor_logits` form a predictor's params have."""
    return "linear" if "b" in p else "magnitude"


def predictor_logits(p: Params, x: jax.Array, *, rank_only: bool = False) -> jax.Array:
    """Predictor scores (logits of "kept"); the form is read off the param keys. x [..., D] -> [..., N] f32.

    linear    {"a": [D, r], "b": [r, N]}: norm(x) @ a @ b (Deja Vu).
    magnitude {"a": [D, r], "bg", "bu": [r, N], "cg", "cu", "bias": [N], "scale": [1]}: a shared rank-r
              code z = norm(x) @ a predicts the gate and up pre-activations g = z @ bg + cg, u = z @ bu + cu
              and the score is scale * log(|silu(g)| * |u|) + bias. SwiGLU importance |silu(g) * u| is
              sign-symmetric in u, which no linear score can rank; the log keeps top-K equal to the
              top-K of the predicted magnitude (for zero bias) while giving BCE a usable logit.

    rank_only: the caller only ranks each row's scores (top-K of one row). Linear scores scale with
    x, so the RMS normalization (a positive per-row scale) cannot change their ranking and is
    skipped: one kernel less per predictor in the decode step. The magnitude form always normalizes.
    Matmul inputs are in the predictor's dtype with fp32 accumulation: upcasting fp16 weights instead
    would add a weight-sized convert per decode step.
    """
    linear = predictor_form(p) == "linear"
    x = x if rank_only and linear else normalize_input(x)
    return scores_from_code(p, _pdot(x, p["a"]))


def _pdot(v: jax.Array, w: jax.Array) -> jax.Array:
    """v [..., K] @ w [K, N] -> [..., N] f32, inputs in the predictor weight's dtype."""
    return jnp.einsum("...k,kn->...n", v.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _pdot_t(v: jax.Array, w_t: jax.Array) -> jax.Array:
    """v [..., K] @ w_t[N, K].T -> [..., N] f32: `_pdot` for a transposed weight."""
    return jnp.einsum("...k,nk->...n", v.astype(w_t.dtype), w_t, preferred_element_type=jnp.float32)


def scores_from_code(p: Params, z: jax.Array) -> jax.Array:
    """The second half of `predictor_logits`: rank-r code z = x @ p["a"] [..., r] -> scores [..., N] f32."""
    if predictor_form(p) == "linear":
        return _pdot(z, p["b"])
    g = _pdot(z, p["bg"]) + p["cg"].astype(jnp.float32)
    u = _pdot(z, p["bu"]) + p["cu"].astype(jnp.float32)
    log_mag = jnp.log(jnp.abs(jax.nn.silu(g)) + MAGNITUDE_EPS) + jnp.log(jnp.abs(u) + MAGNITUDE_EPS)
    return p["scale"].astype(jnp.float32) * log_mag + p["bias"].astype(jnp.float32)


def model_fingerprint(cfg: ModelConfig) -> str:
    """Hash of the architecture (every config field except the free-text name; fields added later are
    left out at their defaults (no RoPE scaling, no q/k norms, no YaRN factor), so older fingerprints still match)."""
    added_later = {"rope_freq_factors": None, "qk_norm": False, "rope_attention_factor": 1.0}
    d = {k: v for k, v in cfg.to_dict().items()
         if k != "name" and not (k in added_later and v == added_later[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def params_digest(params: Params) -> list[float]:
    """A few weight statistics that tell two models of one architecture apart (dtype-robust)."""
    layers = params["layers"]
    picks = [layers[0]["up"], layers[-1]["down"], layers[len(layers) // 2]["q"]]
    return [float(np.mean(np.abs(np.asarray(a[:8], np.float32)))) for a in picks]


def check_digest(expected: Sequence[float], params: Params, what: str) -> None:
    actual = params_digest(params)
    for e, a in zip(expected, actual):
        if abs(e - a) > 2e-2 * max(abs(e), 1e-8):
            raise SparsityError(f"{what} were made for other weights of this architecture "
                                f"(weight digest {list(expected)} vs this model's {actual}); re-run "
                                f"train.collect and train.fit_predictors on this model")


# --------------------------------------------------------------------------------------------
# Selectors (pytrees: arrays are leaves, schedules are static metadata)
# --------------------------------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=["mlp_k", "head_k", "num_neurons", "num_heads", "mlp_blocks"])
@dataclasses.dataclass(frozen=True)
class OracleSelector:
    """Per token, the top-K neurons / heads by true importance (computed densely, then masked).

    mlp_blocks > 1: the neurons are ranked per block, as `PredictorSelector` does with the same
    setting: the quality ceiling of that selection rule.
    """

    mlp_k: tuple[int, ...]
    head_k: tuple[int, ...]
    num_neurons: int
    num_heads: int
    mlp_blocks: int = 1

    def heads(self, ctx: SelectContext) -> Selection | None:
        k = self.head_k[ctx.layer]
        return None if k >= self.num_heads else Selection(from_importance=functools.partial(topk_mask, k=k))

    def neurons(self, ctx: SelectContext) -> Selection | None:
        k = self.mlp_k[ctx.layer]
        if k >= self.num_neurons:
            return None
        return Selection(from_importance=functools.partial(blockwise_topk_mask, k=k, blocks=self.mlp_blocks))


def _above(importance: jax.Array, threshold: jax.Array) -> jax.Array:
    return importance >= threshold


@functools.partial(jax.tree_util.register_dataclass, data_fields=["mlp_threshold", "head_threshold"],
                   meta_fields=["mlp_dense", "head_dense"])
@dataclasses.dataclass(frozen=True)
class ThresholdSelector:
    """TEAL-style: keep neurons with |activation| >= t_l and heads with output norm >= s_l.

    mlp_threshold, head_threshold: [L] float32 per-layer thresholds; *_dense: per-layer flags for
    layers that run dense (density 1 or dense_first/last).
    """

    mlp_threshold: jax.Array
    head_threshold: jax.Array
    mlp_dense: tuple[bool, ...]
    head_dense: tuple[bool, ...]

    def heads(self, ctx: SelectContext) -> Selection | None:
        if self.head_dense[ctx.layer]:
            return None
        return Selection(from_importance=functools.partial(_above, threshold=self.head_threshold[ctx.layer]))

    def neurons(self, ctx: SelectContext) -> Selection | None:
        if self.mlp_dense[ctx.layer]:
            return None
        return Selection(from_importance=functools.partial(_above, threshold=self.mlp_threshold[ctx.layer]))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["predictors", "shared_a", "decode_b"],
                   meta_fields=["mlp_k", "head_k", "num_neurons", "num_heads", "lookahead", "gather",
                                "mlp_blocks"])
@dataclasses.dataclass(frozen=True)
class PredictorSelector:
    """Deja Vu: low-rank predictors score neurons / heads from the residual; the top-K are kept.

    predictors: per layer {"mlp": {...}, "heads": {"a": [D, r], "b": [r, H]}}; the MLP dict is either
    linear {"a", "b"} or the magnitude form (`predictor_logits` documents both).
    gather: for a batch-1 decode step (B == T == 1) return row indices so the gathered `ops` path
    runs (the forward call must then be given `ops`); otherwise per-token masks.
    mlp_blocks: the MLP neurons are ranked in this many equal blocks, each keeping ceil(K / blocks)
    (`SparsityConfig.mlp_topk_block`); heads are always ranked all together.
    """

    predictors: list[dict[str, dict[str, jax.Array]]]
    mlp_k: tuple[int, ...]
    head_k: tuple[int, ...]
    num_neurons: int
    num_heads: int
    lookahead: bool = True
    gather: bool = True
    # The batch-1 decode step's layout (`share_first_matmul`): per layer both input matrices
    # concatenated, [D, r_heads + r_mlp], or transposed [r_heads + r_mlp, D] when decode_b (per layer
    # {"heads": [H, r], "mlp": [F, r]}, the output matrices transposed) is given too.
    shared_a: list | None = None
    decode_b: list | None = None
    mlp_blocks: int = 1

    def _scores_from_code(self, layer: int, kind: str, p: Params, z: jax.Array) -> jax.Array:
        if self.decode_b is None:
            return scores_from_code(p, z)
        return _pdot_t(z, self.decode_b[layer][kind])

    def _one_kernel(self, ctx: SelectContext, n: int, blocks: int) -> bool:
        """Whether code_topk_rows (or code_topk_pair) can rank this site's n rows in `blocks` blocks."""
        return self.decode_b is not None and ctx.ops is not None and n // blocks <= MAX_CODE_BLOCK

    def _select(self, ctx: SelectContext, kind: str, k: int, n: int) -> Selection | None:
        if k >= n:
            return None
        x = _context_input(ctx, kind, self.lookahead)  # [B, T, D]
        B, T = x.shape[:2]
        p = self.predictors[ctx.layer][kind]
        blocks = self.mlp_blocks if kind == "mlp" else 1
        gathered = self.gather and B == 1 and T == 1
        shared = self.shared_a[ctx.layer] if (self.shared_a is not None and gathered) else None
        code = None  # (z [1, 1, r_heads + r_mlp], where this site's code starts), from the shared matvec
        if shared is not None and kind == "heads" and self.mlp_k[ctx.layer] < self.num_neurons:
            # One matvec for both sites' codes (they read the same residual under lookahead); the
            # MLP half (or, ranked already, its indices) waits in ctx.scratch for this block's neurons().
            z = _pdot(x, shared) if self.decode_b is None else _pdot_t(x, shared)
            if (getattr(ctx.ops, "topk_pair", False) and self._one_kernel(ctx, n, 1)
                    and self._one_kernel(ctx, self.num_neurons, self.mlp_blocks)):
                # Both rankings in one launch: the heads' single program runs beside the MLP blocks'
                # instead of costing a launch of its own.
                b = self.decode_b[ctx.layer]
                idx, ctx.scratch["mlp_idx"] = ctx.ops.code_topk_pair(
                    z[0, 0], b["heads"], k, b["mlp"], self.mlp_k[ctx.layer], mlp_blocks=self.mlp_blocks,
                    mlp_start=p["a"].shape[1])
                return Selection(idx=idx)
            ctx.scratch["mlp_code"] = (z, p["a"].shape[1])
            code = (z, 0)
        elif kind == "mlp" and "mlp_idx" in ctx.scratch:
            return Selection(idx=ctx.scratch.pop("mlp_idx"))
        elif kind == "mlp" and "mlp_code" in ctx.scratch:
            code = ctx.scratch.pop("mlp_code")
        if code is not None and self._one_kernel(ctx, n, blocks):
            # Scores, ranking and compaction in one kernel, one program per block.
            z, start = code
            return Selection(idx=ctx.ops.code_topk_rows(z[0, 0], self.decode_b[ctx.layer][kind], k, blocks=blocks,
                                                        start=start))
        if code is not None:
            z, start = code
            scores = self._scores_from_code(ctx.layer, kind, p, z[..., start:start + p["a"].shape[1]])
        else:
            scores = predictor_logits(p, x, rank_only=True)  # [B, T, N]
        if gathered:  # ascending: in-order row reads
            return Selection(idx=blockwise_topk_idx(scores[0, 0], k, blocks, _topk_rows(ctx)))
        return Selection(mask=blockwise_topk_mask(scores, k, blocks))

    def heads(self, ctx: SelectContext) -> Selection | None:
        return self._select(ctx, "heads", self.head_k[ctx.layer], self.num_heads)

    def neurons(self, ctx: SelectContext) -> Selection | None:
        return self._select(ctx, "mlp", self.mlp_k[ctx.layer], self.num_neurons)


def share_first_matmul(selector: PredictorSelector, *, transpose: bool = True) -> PredictorSelector:
    """The selector with each layer's heads and MLP input matrices concatenated, [D, r_h + r_m].

    Under lookahead both predictors of a layer read the same residual, so a batch-1 decode step can
    compute both rank-r codes with one matvec (one kernel and one read of x instead of two). Only
    for linear predictors, whose rank-only scores skip the input normalization on both sides; other
    selectors are returned unchanged. The concatenation is done once here, not per step.

    transpose: store the concatenation as [r_h + r_m, D] and the output matrices as [N, r], so both
    matvecs contract the weights' minor axis, as the model's own weight matvecs do (XLA then emits
    its matvec kernels rather than column reductions). Costs a second copy of the output matrices
    (F x r per layer).
    """
    preds = selector.predictors
    if not selector.lookahead or not all(predictor_form(lp[k]) == "linear" for lp in preds for k in KINDS):
        return selector
    shared = [jnp.concatenate([lp["heads"]["a"], lp["mlp"]["a"].astype(lp["heads"]["a"].dtype)], axis=1)
              for lp in preds]
    if not transpose:
        return dataclasses.replace(selector, shared_a=shared)
    return dataclasses.replace(selector, shared_a=[a.T for a in shared],
                               decode_b=[{k: lp[k]["b"].T for k in KINDS} for lp in preds])


@dataclasses.dataclass(frozen=True)
class FixedSelector:
    """Fixed index (or mask) selections per layer, for tests and latency benchmarks at a fixed K.

    mlp_idx / head_idx: per layer a [K] int array (or None for dense). With as_mask the same sets
    are applied as keep-masks instead, which must give the same outputs as the gathered path.
    """

    mlp_idx: list
    head_idx: list
    num_neurons: int
    num_heads: int
    as_mask: bool = False

    def _sel(self, idx, n: int, x: jax.Array) -> Selection | None:
        if idx is None:
            return None
        idx = jnp.asarray(idx, jnp.int32)
        if not self.as_mask:
            return Selection(idx=idx)
        keep = jnp.zeros((n,), bool).at[idx].set(True)
        return Selection(mask=jnp.broadcast_to(keep, x.shape[:2] + (n,)))

    def heads(self, ctx: SelectContext) -> Selection | None:
        return self._sel(self.head_idx[ctx.layer], self.num_heads, ctx.block_input)

    def neurons(self, ctx: SelectContext) -> Selection | None:
        return self._sel(self.mlp_idx[ctx.layer], self.num_neurons, ctx.block_input)


# --------------------------------------------------------------------------------------------
# Threshold calibration
# --------------------------------------------------------------------------------------------
def importance_quantiles(values: np.ndarray) -> np.ndarray:
    """Quantile table of importance values [..., N] at QUANTILE_LEVELS -> [len(levels)] float64."""
    return np.quantile(np.asarray(values, np.float32).reshape(-1), QUANTILE_LEVELS)


def threshold_for_density(table: Sequence[float], density: float) -> float:
    """The importance value that keeps a `density` fraction of the calibration values."""
    return float(np.interp(1.0 - density, QUANTILE_LEVELS, np.asarray(table, np.float64)))


def calibrate_quantiles(params: Params, cfg: ModelConfig, tokens: np.ndarray,
                        valid: np.ndarray | None = None) -> dict[str, list[list[float]]]:
    """Per-layer importance quantile tables from a dense pass over calibration tokens [B, T]."""
    from dejavu_jax.model import forward, positions_from_valid

    tokens = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)

    @jax.jit
    def run(params, tokens, valid):
        rec: list = []
        forward(params, cfg, tokens, positions_from_valid(valid), valid=valid, record=rec)
        return [r["neuron_importance"] for r in rec], [r["head_importance"] for r in rec]

    neurons, heads = run(params, tokens, valid)
    keep = np.asarray(valid)
    return {"mlp": [importance_quantiles(np.asarray(n)[keep]).tolist() for n in neurons],
            "heads": [importance_quantiles(np.asarray(h)[keep]).tolist() for h in heads]}


def save_thresholds(path: str | Path, tables: dict, cfg: ModelConfig) -> None:
    data = {"model_fingerprint": model_fingerprint(cfg), "levels": QUANTILE_LEVELS.tolist(), **tables}
    Path(path).write_text(json.dumps(data) + "\n")


def load_thresholds(path: str | Path, cfg: ModelConfig) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SparsityError(f"no threshold calibration at {path} (train.fit_predictors writes it)")
    data = json.loads(path.read_text())
    if data.get("model_fingerprint") != model_fingerprint(cfg):
        raise SparsityError(f"threshold calibration {path} was made for another model architecture")
    if len(data["levels"]) != len(QUANTILE_LEVELS):
        raise SparsityError(f"{path}: unexpected quantile table size")
    return data


# --------------------------------------------------------------------------------------------
# Predictors on disk
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Predictors:
    """Loaded predictors: params (per layer {"mlp", "heads"} -> param dicts) and their config dict."""

    params: list
    config: dict

    @property
    def lookahead(self) -> bool:
        return bool(self.config["lookahead"])

    @property
    def rank(self) -> int:
        return int(self.config["rank"])

    @property
    def mlp_predictor(self) -> str:
        """The MLP predictors' form; checkpoints written before the magnitude form existed are linear."""
        return str(self.config.get("mlp_predictor", "linear"))


def predictor_shapes(cfg: ModelConfig, rank: int, mlp_predictor: str = "linear") -> list:
    """Per-layer param shapes of the predictors; mlp_predictor picks the MLP form (see `predictor_logits`)."""
    D, F = cfg.hidden_size, cfg.ffn_size
    if mlp_predictor == "linear":
        mlp = {"a": (D, rank), "b": (rank, F)}
    elif mlp_predictor == "magnitude":
        mlp = {"a": (D, rank), "bg": (rank, F), "bu": (rank, F), "cg": (F,), "cu": (F,), "bias": (F,), "scale": (1,)}
    else:
        raise SparsityError(f"unknown MLP predictor form {mlp_predictor!r}; choose one of {', '.join(MLP_PREDICTORS)}")
    return [{"mlp": dict(mlp), "heads": {"a": (D, rank), "b": (rank, cfg.num_heads)}} for _ in range(cfg.num_layers)]


def save_predictors(directory: str | Path, params: list, config: dict, *, overwrite: bool = True,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Atomically write predictors/: predictor_config.json, orbax params/, and extra text files."""
    from dejavu_jax.checkpoint import atomic_directory, save_params

    with atomic_directory(directory, overwrite=overwrite) as tmp:
        (tmp / PREDICTOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_params(tmp / PREDICTOR_PARAMS, jax.tree_util.tree_map(jnp.asarray, params))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(directory)


def load_predictors(directory: str | Path, cfg: ModelConfig, params: Params | None = None) -> Predictors:
    """Load predictors and check they were trained for this architecture (and these weights)."""
    from dejavu_jax.checkpoint import restore_params

    directory = Path(directory)
    cfg_path = directory / PREDICTOR_CONFIG
    if not cfg_path.is_file():
        raise SparsityError(f"{directory} holds no predictors (no {PREDICTOR_CONFIG}); train them with "
                            f"`python -m train.fit_predictors`")
    config = json.loads(cfg_path.read_text())
    if config.get("model_fingerprint") != model_fingerprint(cfg):
        raise SparsityError(f"predictors in {directory} were trained for another model "
                            f"({config.get('model_name') or config.get('model_fingerprint')}: "
                            f"{_shape_summary(config.get('model_config', {}))}) but this model is "
                            f"{cfg.name or model_fingerprint(cfg)}: {_shape_summary(cfg.to_dict())}")
    if params is not None and config.get("params_digest"):
        check_digest(config["params_digest"], params, f"predictors in {directory}")
    shapes = predictor_shapes(cfg, int(config["rank"]), config.get("mlp_predictor", "linear"))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding), shapes,
                                      is_leaf=lambda x: isinstance(x, tuple))
    try:
        restored = restore_params(directory / PREDICTOR_PARAMS, abstract)
    except Exception as e:  # orbax raises many kinds of errors for mismatched trees
        raise SparsityError(f"could not restore predictor params from {directory / PREDICTOR_PARAMS}: {e}") from e
    return Predictors(list(restored), config)


def default_predictors(model_dir: str | Path, predictors: str | Path | None) -> str | None:
    """The predictors directory a CLI uses: `predictors` if given, else MODEL/predictors when it exists."""
    if predictors is not None:
        return str(predictors)
    own = Path(model_dir) / "predictors"
    return str(own) if own.is_dir() else None


def _shape_summary(d: dict) -> str:
    keys = ("hidden_size", "num_layers", "num_heads", "ffn_size", "activation")
    return ", ".join(f"{k}={d.get(k)}" for k in keys)


# --------------------------------------------------------------------------------------------
# The one entry point for generate / eval / bench
# --------------------------------------------------------------------------------------------
def build_selector(cfg: ModelConfig, params: Params, *, mode: str, mlp_density: float = 1.0,
                   head_density: float = 1.0, predictors: str | Path | Predictors | None = None,
                   lookahead: bool = True, dense_first: int = 0, dense_last: int = 0,
                   mlp_k: Sequence[int] | None = None, head_k: Sequence[int] | None = None,
                   kv_mode: str = "exact", lazy_window: int = LAZY_WINDOW, mlp_topk_block: int = 0,
                   gather: bool = True, thresholds: str | Path | dict | None = None,
                   calibration_tokens: np.ndarray | None = None,
                   sparsity: SparsityConfig | None = None):
    """A `model.Selector` for `mode` (None for dense).

    predictor mode needs `predictors` (a predictors/ directory or a loaded `Predictors`); their
    lookahead setting must equal `lookahead`. threshold mode needs a calibration: `thresholds`
    (a thresholds.json path or its loaded dict), or a predictors/ dir holding thresholds.json, or
    `calibration_tokens` [B, T] to calibrate on now. `sparsity` overrides the keyword settings.
    kv_mode only matters for the cache (`init_sparse_cache`); it is validated here.
    """
    sp = sparsity or SparsityConfig(mode=mode, mlp_density=mlp_density, head_density=head_density,
                                    dense_first=dense_first, dense_last=dense_last,
                                    mlp_k=None if mlp_k is None else tuple(mlp_k),
                                    head_k=None if head_k is None else tuple(head_k),
                                    lookahead=lookahead, kv_mode=kv_mode, lazy_window=lazy_window,
                                    mlp_topk_block=mlp_topk_block)
    mk, hk = sp.mlp_schedule(cfg), sp.head_schedule(cfg)
    F, H = cfg.ffn_size, cfg.num_heads
    if sp.mode == "dense":
        return None
    if sp.mode == "oracle":
        return OracleSelector(mk, hk, F, H, sp.mlp_topk_blocks(cfg))
    if sp.mode == "threshold":
        if thresholds is None and calibration_tokens is None and predictors is not None:
            pdir = predictors if not isinstance(predictors, Predictors) else None
            if pdir is not None:
                thresholds = Path(pdir) / THRESHOLDS_FILE
        if isinstance(thresholds, (str, Path)):
            tables = load_thresholds(thresholds, cfg)
        elif isinstance(thresholds, dict):
            tables = thresholds
        elif calibration_tokens is not None:
            tables = calibrate_quantiles(params, cfg, calibration_tokens)
        else:
            raise SparsityError("threshold mode needs a calibration: pass --predictors DIR (train.fit_predictors "
                                "writes thresholds.json there) or calibration tokens")
        mlp_t = [threshold_for_density(tables["mlp"][l], mk[l] / F) for l in range(cfg.num_layers)]
        head_t = [threshold_for_density(tables["heads"][l], hk[l] / H) for l in range(cfg.num_layers)]
        return ThresholdSelector(jnp.asarray(mlp_t, jnp.float32), jnp.asarray(head_t, jnp.float32),
                                 tuple(k >= F for k in mk), tuple(k >= H for k in hk))
    # predictor
    if predictors is None:
        raise SparsityError("predictor mode needs --predictors DIR (trained with `python -m train.fit_predictors`)")
    preds = predictors if isinstance(predictors, Predictors) else load_predictors(predictors, cfg, params)
    if preds.config.get("model_fingerprint") != model_fingerprint(cfg):
        raise SparsityError("predictors were trained for another model architecture")
    if preds.lookahead != sp.lookahead:
        have = "with" if preds.lookahead else "without"
        want = "with" if sp.lookahead else "without"
        raise SparsityError(f"predictors were trained {have} lookahead but the run asks for {want} lookahead; "
                            f"pass {'--lookahead' if preds.lookahead else '--no-lookahead'} or retrain with "
                            f"the other setting")
    if len(preds.params) != cfg.num_layers:
        raise SparsityError(f"predictors cover {len(preds.params)} layers, the model has {cfg.num_layers}")
    return share_first_matmul(PredictorSelector(preds.params, mk, hk, F, H, sp.lookahead, gather,
                                                mlp_blocks=sp.mlp_topk_blocks(cfg)))


# --------------------------------------------------------------------------------------------
# Lazy KV cache
# --------------------------------------------------------------------------------------------
def init_sparse_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, *,
                      kv_mode: str = "exact", lazy_window: int = LAZY_WINDOW) -> KVCache:
    """A decode KV cache: exact, `model.init_cache`; kv_mode="lazy" adds the W-token input window per layer."""
    from dejavu_jax.model import init_cache

    if kv_mode not in KV_MODES:
        raise SparsityError(f"unknown kv_mode {kv_mode!r}; choose one of {', '.join(KV_MODES)}")
    cache = init_cache(cfg, batch, max_len, dtype)
    if kv_mode == "exact":
        return cache
    if lazy_window < 1:
        raise SparsityError(f"lazy_window must be >= 1, got {lazy_window}")
    return dataclasses.replace(
        cache,
        win_x=[jnp.zeros((batch, lazy_window, cfg.hidden_size), dtype) for _ in range(cfg.num_layers)],
        win_pos=jnp.zeros((batch, lazy_window), jnp.int32),
    )


def ring_write(ring: jax.Array, values: jax.Array, index: jax.Array) -> jax.Array:
    """Write a chunk's last min(T, W) entries into a ring buffer, slot t at ring position t % W.

    ring [B, W, ...]; values [B, T, ...] for slots index .. index+T-1 -> updated ring. Only the last
    W entries are written so that no ring position is written twice (scatter order is undefined).
    """
    W, T = ring.shape[1], values.shape[1]
    n = min(T, W)
    where = jnp.mod(index + (T - n) + jnp.arange(n), W)
    return ring.at[:, where].set(values[:, T - n:].astype(ring.dtype))


def refresh_groups(num_kv_heads: int, window: int) -> int:
    """KV heads the lazy mode refreshes round-robin per decode step, besides the active ones."""
    return -(-num_kv_heads // window)


def lazy_kv_update(lp: Params, cfg: ModelConfig, x: jax.Array, positions: jax.Array, layer_cache,
                   sel: Selection | None, ops=None):
    """K/V cache update of one layer in the lazy mode. Called by `model.attention`.

    x [B, T, D] normed attention input; positions [B, T]; layer_cache = (k, v [B, KV, S, Dh],
    index, win_x [B, W, D], win_pos [B, W] already holding this chunk's positions); ops: the
    forward's backend (None: the XLA reference).
    A gathered decode step (sel.idx set, T == 1) recomputes, over the W-token window, the K/V of
    the selected heads' KV groups and of r = ceil(KV / W) groups chosen round-robin; anything else
    (prefill, mask selections) writes every head at the new slots, like the exact mode.
    Returns (k, v, win_x) updated.

    Why a head's K/V are complete whenever it is active. At the step that writes slot s, group g
    is refreshed when s % W == g // r (g // r < W because KV <= r * W), and a refreshed or active
    group has all its window slots s-W+1 .. s rewritten from the stored inputs. Take a slot t <= s
    written by a gathered step. Among the W slots t .. t+W-1 exactly one, u, has u % W == g // r;
    if u <= s, g's slot t was rewritten at step u (t lies in u's window). Otherwise t > s-W+1: t is
    in the current window, which an active g recomputes now. Slots written by prefill hold every
    head already. So an active head reads complete K/V; an idle head's K/V are complete up to its
    last refresh and stale after it, which nobody reads. This assumes that once decoding starts
    every step of the layer is gathered (as PredictorSelector and FixedSelector do): a mask step
    or a new multi-token chunk in between writes all heads at its own slots only, not the refresh.
    """
    from dejavu_jax.model import kv_project

    k_cache, v_cache, index, win_x, win_pos = layer_cache
    T = x.shape[1]
    win_x = ring_write(win_x, x, index)
    if sel is None or sel.idx is None:
        k_new, v_new = kv_project(cfg, x, positions, lp["kv"], lp.get("kv_bias"), lp.get("k_norm"))
        k_all = jax.lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), (0, 0, index, 0))
        v_all = jax.lax.dynamic_update_slice(v_cache, v_new.astype(v_cache.dtype), (0, 0, index, 0))
        return k_all, v_all, win_x
    assert T == 1, "the lazy KV recompute is a decode-only path (one token per row)"
    slots, refreshed = _window_schedule(index, win_x.shape[1], k_cache.shape[2], cfg.num_kv_heads)
    groups = jnp.concatenate([sel.idx // cfg.kv_group_size, refreshed]).astype(jnp.int32)  # [Ka]
    heads = first_occurrences(groups, cfg.num_kv_heads)

    # K/V of the `heads` over the window (one read of their weight rows) written at the window's
    # slots: the Pallas op stores them straight into the cache, in place (the step donates it); the
    # XLA reference computes them, then scatters. RoPE (as kv_project) rotates the keys at each
    # window token's position; the angles are the same in every layer.
    rotary = _window_rotary(cfg, win_pos)
    # Qwen3 normalises every key head before its rotation.
    k_norm = dict(k_norm=lp["k_norm"]["scale"], norm_eps=cfg.norm_eps) if "k_norm" in lp else {}
    update = ops.gathered_window_kv_update if ops is not None else gathered_window_kv_update_reference
    k_all, v_all = update(win_x, lp["kv"], heads, slots, k_cache, v_cache, lp.get("kv_bias"), rotary, **k_norm)
    return k_all, v_all, win_x


def _window_schedule(index: jax.Array, W: int, S: int, KV: int) -> tuple[jax.Array, jax.Array]:
    """The gathered decode step's window at slot `index`: (slots [W], the cache slot held at each
    ring row, out of range where not yet written; refreshed [r], the KV groups refreshed this step,
    ids >= KV (when r * W > KV) skipped). The same in every layer."""
    ring = jnp.arange(W)
    slots = index - jnp.mod(index - ring, W)  # [W] cache slot held at each ring position
    slots = jnp.where(slots >= 0, slots, S)  # not yet written: out of range, dropped by the update
    r = refresh_groups(KV, W)
    return slots, jnp.mod(index, W) * r + jnp.arange(r)


def _window_rotary(cfg: ModelConfig, win_pos: jax.Array):
    from dejavu_jax.model import rope_cos_sin

    return rope_cos_sin(win_pos, cfg) if cfg.positions == "rope" else None


def choose_kv_mode(kv_mode: str, cfg: ModelConfig, *, gathered: bool, kernels: str) -> str:
    """--kv-mode auto -> the KV mode that decodes faster; "exact" and "lazy" as given.

    gathered: whether the decode steps read gathered rows (predictor mode, one index set per step);
    kernels: the resolved backend ("xla" or "pallas"). Lazy only pays where the step reads fewer
    weights through the Pallas kernels: multi-head models, where the selected heads' K/V groups are
    the selected heads (Llama-2-7B shape on an H100, session 22: 2.50 against 2.74 ms/token). With
    grouped-query attention the selected heads cover nearly every K/V group at head density 0.5, so
    lazy reads about as much and adds the window's recompute: a tie without q/k norms (Llama-3-8B,
    session 23: 2.80 against 2.79), a loss with them (Qwen3-8B: 3.61 against 3.07), so exact there.
    Both modes produce the same tokens, so the choice is about speed only."""
    if kv_mode != "auto":
        if kv_mode not in KV_MODES:
            raise SparsityError(f"unknown kv_mode {kv_mode!r}; choose one of auto, {', '.join(KV_MODES)}")
        return kv_mode
    mha = cfg.num_kv_heads == cfg.num_heads
    return "lazy" if gathered and kernels == "pallas" and mha else "exact"


def step_fuses_attention_inputs(cfg: ModelConfig, kv_mode: str, ops) -> bool:
    """Whether a gathered decode step with this KV mode takes its attention inputs from one op
    (`lazy_attention_inputs`): a pre-norm model without per-head q/k norms (the op has none), the
    lazy KV cache, and ops that fuse (`pallas_kernels.fused_step_enabled`; the tensor-parallel ops do not)."""
    return cfg.pre_norm and not cfg.qk_norm and kv_mode == "lazy" and fused_step_enabled(ops)


def fuses_attention_inputs(cfg: ModelConfig, layer_cache, sel: Selection | None, ops) -> bool:
    """`step_fuses_attention_inputs` for one block: its cache is the lazy one (5 fields) and its
    heads are gathered (a decode step)."""
    kv_mode = "lazy" if layer_cache is not None and len(layer_cache) == 5 else "exact"
    return sel is not None and sel.idx is not None and step_fuses_attention_inputs(cfg, kv_mode, ops)


def lazy_attention_inputs(lp: Params, cfg: ModelConfig, h: jax.Array, layer_cache, sel: Selection, ops, *,
                          normed: bool = False):
    """The gathered lazy-KV decode step's attention inputs, from the residual, in one op.

    h [B, 1, D] the residual entering the layer (not normed; normed=True: its attention norm);
    layer_cache and sel as lazy_kv_update's gathered step. Returns (q [B, K, Dh] of the selected
    heads, RoPE'd; k, v, win_x updated): `ops.gathered_window_qkv_update` normalises h, stores it in
    the window ring, projects the selected heads' queries and writes the window K/V of their groups
    and the refreshed ones, which is lazy_kv_update's gathered step plus the norm and the Q
    projection (same values). normed: XLA writes h into the ring first and the op only reads it.
    """
    k_cache, v_cache, index, win_x, win_pos = layer_cache
    assert h.shape[1] == 1, "the lazy KV recompute is a decode-only path (one token per row)"
    W = win_x.shape[1]
    slots, refreshed = _window_schedule(index, W, k_cache.shape[2], cfg.num_kv_heads)
    cur = jnp.mod(index, W)
    if normed:
        win_x = jax.lax.dynamic_update_slice(win_x, h.astype(win_x.dtype), (0, cur, 0))
        norm_args = (None, None, None)
    else:
        norm = lp["attn_norm"]
        norm_args = (h[:, 0], norm["scale"], norm.get("bias"))
    q, win_x, k_all, v_all = ops.gathered_window_qkv_update(
        *norm_args, win_x, lp["q"], lp["kv"], sel.idx, refreshed, cur, slots, k_cache, v_cache,
        lp.get("q_bias"), lp.get("kv_bias"), _window_rotary(cfg, win_pos), norm_kind=cfg.norm,
        norm_eps=cfg.norm_eps)
    return q, k_all, v_all, win_x

"""Batch > 1 sparse decode: one index set for the whole batch (union) or per-row masks; per-shard top-K.

A decode step with batch B has B different contexts, so each row wants its own neurons and heads.
The gathered `ops` read one shared index set `[K]` for all rows (one weight row read serves every
batch row: the point of batching on a memory-bound GPU), so two policies exist:

* union    one fixed-size index set for the batch: the top-K of the per-row scores combined over
           the rows ("sum", the default: by total demand; "max": kept if some row wants it
           strongly). Shapes stay static (K does not depend on how much the rows overlap), so the
           step stays one compiled program; the price is recall: with K fixed, the larger the batch,
           the less of each row's own top-K is covered. `scripts/union_density.py` measures how fast
           the exact union (every row's top-K covered) grows with B on real text. SmolLM2-135M, C4,
           oracle (results/union_density/): MLP neurons overlap little across rows (exact union at
           density 0.25: 0.42 / 0.64 / 0.85 / 0.97 of F at B = 2 / 4 / 8 / 16, close to independent
           random rows), heads more (0.35 / 0.51 / 0.66 / 0.79 of H); at fixed K "sum" keeps more of
           each row's top-K than "max" at every B and density measured (e.g. neurons d=0.25, B=8:
           0.47 vs 0.40), hence the default.
* per-row  each row keeps its own top-K through a keep-mask over the dense activations. Exact per
           row, but the step computes densely (masks zero activations, they do not skip weight
           reads), so it is a quality mode and the reference for union, not a fast path.

Tensor parallelism (`dejavu_jax.sharding`) adds `blocks`: the N neurons (heads) are split into
`blocks` contiguous slices, one per shard, and each slice picks its own top-(K/blocks), as Deja Vu
does under TP. Indices stay global and sorted, so block s of the index array holds shard s's rows:
the layout `sharding.sharded_ops` expects. With blocks == 1 and B == 1 the selection equals
`sparse.PredictorSelector`'s.

`BatchSelector` wraps a `sparse.PredictorSelector` or `sparse.OracleSelector` with these policies;
`wrap_selector(selector, batch_select=..., tp=...)` is the one entry point for generate/bench.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from dejavu_jax.model import SelectContext, Selection
from dejavu_jax.sparse import (OracleSelector, PredictorSelector, SparsityError, _check_blocks, _context_input,
                               _topk_rows, blockwise_topk_idx, blockwise_topk_mask, per_block_k, predictor_logits)
from pallas_kernels import topk_rows_reference

BATCH_SELECT = ("union", "per-row")
COMBINE = ("max", "sum")


# --------------------------------------------------------------------------------------------
# Blockwise top-K (blocks = tensor-parallel shards; 1 = plain top-K)
# --------------------------------------------------------------------------------------------
def blockwise_topk_idx_local(scores: jax.Array, k: int, mesh, axis: str = "model",
                             topk_rows=topk_rows_reference) -> jax.Array:
    """blockwise_topk_idx with one block per device of `mesh`'s `axis`, computed where the scores live.

    scores [N] sharded on `axis` -> [TP * ceil(k/TP)] int32 sharded on `axis`. Under plain GSPMD a
    top_k over a sharded axis all-gathers the scores first (one small collective per site per
    layer, but latency-bound); under shard_map each device ranks its own N/TP scores.
    """
    from jax import shard_map
    from jax.sharding import PartitionSpec as P

    blocks = mesh.shape[axis]
    _check_blocks(scores.shape[-1], blocks)
    kb = per_block_k(k, blocks)

    def local(s):  # s [N/TP]
        idx = topk_rows(s[None], kb)[0]
        return idx + jax.lax.axis_index(axis).astype(jnp.int32) * s.shape[0]

    return shard_map(local, mesh=mesh, in_specs=P(axis), out_specs=P(axis), check_vma=False)(scores)


def combine_rows(scores: jax.Array, how: str) -> jax.Array:
    """Combine per-row scores over the batch for a union selection. scores [B, T, N] -> [T, N]."""
    if how == "max":
        return jnp.max(scores, axis=0)
    if how == "sum":
        return jnp.sum(scores, axis=0)
    raise SparsityError(f"unknown combine {how!r}; choose one of {', '.join(COMBINE)}")


# --------------------------------------------------------------------------------------------
# The selector
# --------------------------------------------------------------------------------------------
def _oracle_weights(importance: jax.Array) -> jax.Array:
    """Per-row comparable oracle scores: importance over the row's mean (rows differ in scale)."""
    importance = importance.astype(jnp.float32)
    return importance / (jnp.mean(importance, axis=-1, keepdims=True) + 1e-12)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["base"],
                   meta_fields=["batch_select", "combine", "blocks", "mesh"])
@dataclasses.dataclass(frozen=True)
class BatchSelector:
    """Batch (union / per-row) and per-shard (blocks) selection around a predictor or oracle selector.

    base: sparse.PredictorSelector (scores from its predictors; rows combined as sigmoid
    probabilities) or sparse.OracleSelector (true importances, each row over its mean).
    A predictor decode step (T == 1, base.gather) with B == 1 or union gets `Selection(idx=...)`
    (blocks * ceil(K/blocks) sorted global rows); everything else gets masks (per token, per row;
    union masks are shared by the rows of each token).
    """

    base: Any
    batch_select: str = "union"
    combine: str = "sum"
    blocks: int = 1
    mesh: Any = None  # a jax Mesh with a "model" axis of size blocks: rank the scores per device

    def __post_init__(self):
        if self.batch_select not in BATCH_SELECT:
            raise SparsityError(f"unknown batch selection {self.batch_select!r}; choose one of "
                                f"{', '.join(BATCH_SELECT)}")
        if self.combine not in COMBINE:
            raise SparsityError(f"unknown combine {self.combine!r}; choose one of {', '.join(COMBINE)}")
        if not isinstance(self.base, (PredictorSelector, OracleSelector)):
            raise SparsityError(f"batch/shard selection wraps predictor or oracle selectors, "
                                f"not {type(self.base).__name__}")
        if int(self.blocks) < 1:
            raise SparsityError(f"blocks (tensor-parallel shards) must be >= 1, got {self.blocks}")
        _check_blocks(self.base.num_neurons, self.blocks)
        _check_blocks(self.base.num_heads, self.blocks)
        if isinstance(self.base, PredictorSelector) and self.base.mlp_blocks > 1 and self.blocks > 1:
            raise SparsityError("per-block MLP top-K (mlp_topk_block) and tensor parallelism cannot be combined: "
                                "the shards already rank their neurons per shard")
        if self.mesh is not None and self.mesh.shape.get("model") != self.blocks:
            raise SparsityError(f"mesh has model axis {dict(self.mesh.shape)}, selector has blocks={self.blocks}")

    def _mask(self, scores: jax.Array, k: int, blocks: int) -> jax.Array:
        """scores [B, T, N] (row-comparable) -> keep-mask [B, T, N]."""
        if self.batch_select == "per-row":
            return blockwise_topk_mask(scores, k, blocks)
        keep = blockwise_topk_mask(combine_rows(scores, self.combine), k, blocks)  # [T, N]
        return jnp.broadcast_to(keep[None], scores.shape)

    def _select(self, ctx: SelectContext, kind: str, k: int, n: int) -> Selection | None:
        if k >= n:
            return None
        base = self.base
        if isinstance(base, OracleSelector):
            return Selection(from_importance=lambda imp: self._mask(_oracle_weights(imp), k, self.blocks))
        blocks = base.mlp_blocks if kind == "mlp" and base.mlp_blocks > 1 else self.blocks
        x = _context_input(ctx, kind, base.lookahead)  # [B, T, D]
        B, T = x.shape[:2]
        # One row is only ranked: its raw logits (no norm, no sigmoid, which saturates into ties).
        # Rows that combine need comparable scores: probabilities of calibrated logits.
        logits = predictor_logits(base.predictors[ctx.layer][kind], x, rank_only=B == 1)  # [B, T, N]
        scores = logits if B == 1 else jax.nn.sigmoid(logits)
        if base.gather and T == 1 and (B == 1 or self.batch_select == "union"):
            combined = combine_rows(scores, self.combine)[0]  # [N]
            topk = _topk_rows(ctx)
            if self.mesh is not None:
                return Selection(idx=blockwise_topk_idx_local(combined, k, self.mesh, topk_rows=topk))
            return Selection(idx=blockwise_topk_idx(combined, k, blocks, topk_rows=topk))
        return Selection(mask=self._mask(scores, k, blocks))

    def heads(self, ctx: SelectContext) -> Selection | None:
        return self._select(ctx, "heads", self.base.head_k[ctx.layer], self.base.num_heads)

    def neurons(self, ctx: SelectContext) -> Selection | None:
        return self._select(ctx, "mlp", self.base.mlp_k[ctx.layer], self.base.num_neurons)


def wrap_selector(selector, *, batch_select: str = "union", combine: str = "sum", tp: int = 1, mesh=None):
    """The selector for batch policy `batch_select` and `tp` shards (None stays None: dense).

    A predictor/oracle selector is wrapped in `BatchSelector`; other selectors (threshold,
    fixed) pass through unchanged when tp == 1 (their keep decisions are already per row) and are
    refused under tensor parallelism, where the per-shard K split must be known.
    """
    if selector is None:
        return None
    if isinstance(selector, (PredictorSelector, OracleSelector)):
        return BatchSelector(selector, batch_select, combine, tp, mesh)
    if tp == 1:
        return selector
    raise SparsityError(f"{type(selector).__name__} has no per-shard top-K; under tensor parallelism use the "
                        f"predictor or oracle modes (or sharding.blockwise_fixed_selector)")


# --------------------------------------------------------------------------------------------
# Union density (oracle): how many rows does a batch need so that every row's top-K is covered?
# --------------------------------------------------------------------------------------------
def union_stats(importance: jax.Array, k: int, batch: int) -> dict[str, jax.Array]:
    """Union statistics of per-token top-K sets over batches of rows that decode together.

    importance [R, T, N]: R sequences (rows), T decode steps, N neurons/heads (true importances).
    Rows are grouped into R // batch batches of `batch` consecutive rows; at each step the batch's
    rows have their own top-K (k of N) sets. Returns float32 scalars (means over batches and steps):
      union_density   |union of the rows' top-K sets| / N: the density an exact union needs
      recall_max      fraction of each row's top-K inside the fixed-size union top-K of the max of
                      per-row (mean-normalised) importances
      recall_sum      same for the sum
      mass_recall_max fraction of each row's top-K importance mass inside the fixed-size max union
    """
    return {key: v[0] for key, v in union_stats_batches(importance, k, (batch,)).items()}


def _group_stats(imp: jax.Array, own: jax.Array, norm: jax.Array, k: int) -> dict[str, jax.Array]:
    """union_stats' scalars for rows grouped into batches. imp/own/norm [g, b, T, N]."""
    N = imp.shape[-1]
    stats = {"union_density": jnp.mean(jnp.sum(jnp.any(own, axis=1), -1) / N)}
    for how in COMBINE:
        fixed = blockwise_topk_mask(combine_rows(norm.transpose(1, 0, 2, 3), how), k)  # [g, T, N]
        hit = own & fixed[:, None]
        stats[f"recall_{how}"] = jnp.mean(jnp.sum(hit, -1) / jnp.maximum(jnp.sum(own, -1), 1))
        if how == "max":
            own_mass = jnp.sum(jnp.where(own, imp, 0.0), -1)
            stats["mass_recall_max"] = jnp.mean(jnp.sum(jnp.where(hit, imp, 0.0), -1) / jnp.maximum(own_mass, 1e-12))
    return stats


def union_stats_batches(importance: jax.Array, k: int, batches: tuple[int, ...]) -> dict[str, jax.Array]:
    """`union_stats` for several batch sizes at once (each row's top-K computed once). -> stat: [len(batches)]."""
    R, T, N = importance.shape
    imp_all = importance.astype(jnp.float32)
    own_all = blockwise_topk_mask(imp_all, k)  # [R, T, N]
    norm_all = _oracle_weights(imp_all)
    out: dict[str, list] = {}
    for batch in batches:
        g = R // batch
        group = lambda a: a[: g * batch].reshape(g, batch, T, N)  # noqa: E731
        for key, v in _group_stats(group(imp_all), group(own_all), group(norm_all), k).items():
            out.setdefault(key, []).append(v)
    return {key: jnp.stack(v) for key, v in out.items()}


def k_for_density(density: float, n: int) -> int:
    return max(1, min(n, int(round(density * n))))


def expected_random_union(density: float, batch: int) -> float:
    """Union density if rows picked independent uniform random sets: 1 - (1 - d)^b (a reference line)."""
    return 1.0 - math.pow(1.0 - density, batch)


__all__ = ["BATCH_SELECT", "COMBINE", "BatchSelector", "blockwise_topk_idx", "blockwise_topk_idx_local",
           "blockwise_topk_mask", "combine_rows", "expected_random_union", "k_for_density", "per_block_k",
           "union_stats", "union_stats_batches", "wrap_selector"]

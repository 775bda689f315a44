"""Megatron-style tensor parallelism with `jax.sharding`: one `model` mesh axis over heads and neurons.

The head-major / neuron-major parameter layouts of `model.py` already are the tensor-parallel
split: shard s owns query heads s*H/TP .., their KV heads s*KV/TP .. (GQA groups stay whole
because H/TP = G * KV/TP), and MLP neurons s*F/TP ... Each block half then computes on local rows
and produces a partial sum of the residual update, which one all-reduce combines:

    attention: q, kv, out sharded on heads  -> partial  sum_h o_h @ out[h]   -> all-reduce
    MLP:       up, down sharded on neurons   -> partial  sum_f a_f * down[f]   -> all-reduce

`LOGICAL_AXES` names each parameter's axes, `RULES` maps logical axes to mesh axes; that table
is the one place saying how every weight is laid out across devices. Norms, biases of the output
side, positions and (by default) the embeddings are replicated; `vocab_parallel=True` shards the
embedding / LM head over the vocabulary instead (the logits are then gathered by XLA).

Dense forward under TP needs no code of its own: `jax.jit` over sharded params and a sharded KV
cache ([B, KV, S, Dh], KV axis on `model`) lets GSPMD propagate the shardings through the einsums;
the compiled decode step has exactly 2 all-reduces per layer and no all-gather (tested).

Sparse decode under TP:
* selection: each shard picks its own top-(K/TP) of its local neurons / heads (Deja Vu's scheme),
  via `batching.BatchSelector(blocks=TP)`. Indices stay global and sorted, so block s of `idx [K]`
  holds shard s's rows and `model.py`'s gathered path is unchanged.
* gathers: `jnp.take(w, idx)` on a weight sharded along the gathered axis is NOT kept local by
  GSPMD: it cannot know that block s of idx only names shard s's rows. In the compiled HLO of the
  plain XLA ops under GSPMD (jax 0.10, CPU, TP=4; tests/test_sharding.py records it) XLA either
  all-gathers whole weight matrices (tiny OPT: q and out [H, Dh, D] all-gathered every step) or
  gathers with out-of-shard indices masked and all-reduces the gathered rows [K, ..., D] (up/down,
  and q/out for the GQA Llama), and for the selected-head attention it all-gathers the whole KV
  cache [B, KV, S, Dh] plus the indices: weight bytes and the cache cross the interconnect every
  token. `sharded_ops(ops, mesh)` wraps each gathered op in `shard_map`: a shard sees its local
  weight rows and local indices (idx - s * N/TP) and runs the unchanged XLA or Pallas op on them;
  gathered_down / gathered_out_proj end in the block half's one `psum`. With it (and the top-K run
  per device, `batching.blockwise_topk_idx_local`; under GSPMD top_k all-gathers the [N] scores)
  the sparse step has the same 2 all-reduces per layer as dense and no all-gather at all (tested).
* KV cache: exact mode (every KV head written each token, sharded by head). The lazy KV mode's
  window recompute is not shard_map'ed (it runs under GSPMD); use exact mode with TP.

Not covered: KV heads fewer than TP (Megatron replicates KV heads then; here it is an error), and
several hosts (`jax.distributed.initialize()` before building the mesh works with the same code,
untested here).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dejavu_jax.config import ModelConfig
from dejavu_jax.model import KVCache, Params, _is_shape, init_params, param_shapes

AXIS = "model"

# Logical axes of every parameter (by leaf name; norms' scale/bias and all [D] vectors replicated).
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "q": ("heads", None, None),  # [H, Dh, D]
    "q_bias": ("heads", None),  # [H, Dh]
    "kv": (None, "kv_heads", None, None),  # [2, KV, Dh, D]
    "kv_bias": (None, "kv_heads", None),  # [2, KV, Dh]
    "out": ("heads", None, None),  # [H, Dh, D]
    "out_bias": (None,),  # [D] added once, after the all-reduce
    "up": ("neurons", None, None),  # [F, U, D]
    "up_bias": ("neurons", None),  # [F, U]
    "down": ("neurons", None),  # [F, D]
    "down_bias": (None,),  # [D]
    "scale": (None,),
    "bias": (None,),
    "embed": ("vocab", None),  # [V, E]
    "lm_head": ("vocab", None),  # [V, E]
    "pos_embed": (None, None),
    "project_in": (None, None),
    "project_out": (None, None),
}

# Logical axis -> mesh axis. "vocab" is replicated unless vocab_parallel.
RULES: dict[str, str | None] = {"heads": AXIS, "kv_heads": AXIS, "neurons": AXIS, "vocab": None}


class ShardingError(ValueError):
    """The model does not split over the requested tensor-parallel degree."""


# --------------------------------------------------------------------------------------------
# Mesh and checks
# --------------------------------------------------------------------------------------------
def make_mesh(tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `model` over the first `tp` devices."""
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1:
        raise ShardingError(f"tensor-parallel degree must be >= 1, got {tp}")
    if tp > len(devices):
        raise ShardingError(f"--tp {tp} needs {tp} devices but only {len(devices)} "
                            f"{devices[0].platform if devices else ''} devices are visible")
    return Mesh(np.asarray(devices[:tp]), (AXIS,))


def tp_size(mesh: Mesh) -> int:
    return mesh.shape[AXIS]


def check_tp(cfg: ModelConfig, tp: int, *, vocab_parallel: bool = False) -> None:
    """Raise ShardingError naming every dimension that `tp` does not divide."""
    problems = []
    for what, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads), ("ffn_size", cfg.ffn_size)):
        if n % tp:
            problems.append(f"{what}={n}")
    if vocab_parallel and cfg.vocab_size % tp:
        problems.append(f"vocab_size={cfg.vocab_size} (vocab_parallel)")
    if problems:
        raise ShardingError(f"{cfg.name or 'model'} cannot be split over {tp} devices: {', '.join(problems)} "
                            f"not divisible by {tp}")


# --------------------------------------------------------------------------------------------
# Parameter and cache shardings
# --------------------------------------------------------------------------------------------
def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))


def logical_to_spec(axes: tuple[str | None, ...], *, vocab_parallel: bool = False) -> P:
    rules = dict(RULES, vocab=AXIS if vocab_parallel else None)
    return P(*(rules.get(a) if a is not None else None for a in axes))


def param_specs(cfg: ModelConfig, *, vocab_parallel: bool = False) -> Params:
    """PartitionSpec of every parameter, in param_shapes(cfg)'s tree structure."""

    def spec(path, shape):
        name = _leaf_name(path)
        if name not in LOGICAL_AXES:
            raise ShardingError(f"no sharding rule for parameter {jax.tree_util.keystr(path)}")
        axes = LOGICAL_AXES[name]
        if len(axes) != len(shape):
            raise ShardingError(f"sharding rule for {name} has {len(axes)} axes, parameter has shape {shape}")
        return logical_to_spec(axes, vocab_parallel=vocab_parallel)

    return jax.tree_util.tree_map_with_path(spec, param_shapes(cfg), is_leaf=_is_shape)


def param_shardings(cfg: ModelConfig, mesh: Mesh, *, vocab_parallel: bool = False) -> Params:
    """NamedSharding of every parameter (a pytree like param_shapes(cfg)).

    Usable as orbax restore targets: `checkpoint.load_checkpoint(dir, dtype, sharding=...)` then
    reads each device's slice only, and no device ever holds the whole model.
    """
    check_tp(cfg, tp_size(mesh), vocab_parallel=vocab_parallel)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(cfg, vocab_parallel=vocab_parallel),
                                  is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh, *, vocab_parallel: bool = False) -> Params:
    """Place params (host or single-device arrays) on the mesh by the rules."""
    return jax.device_put(params, param_shardings(cfg, mesh, vocab_parallel=vocab_parallel))


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    """Shardings for a KVCache: k/v [B, KV, S, Dh] on the KV axis; the rest replicated."""
    kv = NamedSharding(mesh, P(None, AXIS, None, None))
    rep = NamedSharding(mesh, P())
    return KVCache(k=[kv] * len(cache.k), v=[kv] * len(cache.v), valid=rep, index=rep,
                   win_x=None if cache.win_x is None else [rep] * len(cache.win_x),
                   win_pos=None if cache.win_pos is None else rep)


def shard_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    return jax.device_put(cache, cache_shardings(cache, mesh))


def init_params_sharded(cfg: ModelConfig, key: jax.Array, mesh: Mesh, dtype=jnp.bfloat16, *,
                        vocab_parallel: bool = False) -> Params:
    """Random params created directly in their shards (one jitted call per layer, as init_params).

    For benchmark shapes that do not fit one device (OPT-66B at TP=2): nothing is materialised
    whole. Same values as model.init_params with the same key.
    """
    return init_params(cfg, key, dtype, shardings=param_shardings(cfg, mesh, vocab_parallel=vocab_parallel))


def predictor_shardings(predictors: list, mesh: Mesh) -> list:
    """Per-shard predictors: the output matrix b [r, N] is split on N (shard s scores its own rows)."""
    rep, cols = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, AXIS))
    return [{kind: {"a": rep, "b": cols} for kind in layer} for layer in predictors]


def shard_selector(selector, mesh: Mesh):
    """Place a BatchSelector's predictor weights on the mesh (b split on N; a replicated)."""
    from dejavu_jax.batching import BatchSelector
    from dejavu_jax.sparse import PredictorSelector

    if isinstance(selector, BatchSelector) and isinstance(selector.base, PredictorSelector):
        preds = jax.device_put(selector.base.predictors, predictor_shardings(selector.base.predictors, mesh))
        return dataclasses.replace(selector, base=dataclasses.replace(selector.base, predictors=preds))
    return jax.device_put(selector, NamedSharding(mesh, P())) if selector is not None else None


# --------------------------------------------------------------------------------------------
# Per-shard selection and shard_map'ed gathered ops
# --------------------------------------------------------------------------------------------
def tp_selector(selector, mesh: Mesh | int, *, batch_select: str = "union", combine: str = "sum"):
    """Wrap a predictor/oracle selector so each shard keeps its own top-(K/TP) of its rows.

    With a Mesh, the decode-step top-K runs per device under shard_map (no collective); with an
    int TP, the same blockwise selection runs unsharded (the single-device reference of a TP run).
    """
    from dejavu_jax.batching import wrap_selector

    if isinstance(mesh, Mesh):
        return wrap_selector(selector, batch_select=batch_select, combine=combine, tp=tp_size(mesh), mesh=mesh)
    return wrap_selector(selector, batch_select=batch_select, combine=combine, tp=int(mesh))


def blockwise_fixed_selector(cfg: ModelConfig, tp: int, *, mlp_density: float, head_density: float, seed: int = 0):
    """A sparse.FixedSelector whose K rows per layer are ceil(K/TP) random rows from each shard's slice."""
    from dejavu_jax.batching import per_block_k
    from dejavu_jax.sparse import FixedSelector, SparsityConfig

    sp = SparsityConfig(mode="predictor", mlp_density=mlp_density, head_density=head_density)
    rng = np.random.default_rng(seed)

    def pick(n, k):
        if k >= n:
            return None
        nb, kb = n // tp, per_block_k(k, tp)
        rows = [s * nb + np.sort(rng.choice(nb, kb, replace=False)) for s in range(tp)]
        return jnp.asarray(np.concatenate(rows), jnp.int32)

    check_tp(cfg, tp)
    return FixedSelector([pick(cfg.ffn_size, k) for k in sp.mlp_schedule(cfg)],
                         [pick(cfg.num_heads, k) for k in sp.head_schedule(cfg)], cfg.ffn_size, cfg.num_heads)


@dataclasses.dataclass(frozen=True)
class ShardedOps:
    """`model.Ops` whose gathered matmuls run per shard under shard_map (see module docstring).

    Every idx [K] must be blockwise: block s (K/TP entries) names rows of shard s only, as
    `batching.BatchSelector(blocks=TP)` and `blockwise_fixed_selector` produce.
    """

    base: Any
    mesh: Mesh

    @property
    def backend(self) -> str:
        return f"{getattr(self.base, 'backend', '?')}+tp{tp_size(self.mesh)}"

    @property
    def topk_rows(self):
        """Selection runs per shard inside the selector's own shard_map: the base backend's kernel."""
        return self.base.topk_rows

    @property
    def gathered_window_kv_update(self):
        """The lazy KV window recompute is not shard_map'ed (module docstring): the XLA op, under GSPMD."""
        from pallas_kernels import gathered_window_kv_update_reference

        return gathered_window_kv_update_reference

    # The fused step's ops (norms inside the kernels, one attention-input op) are not sharded: the
    # model uses the separate ops, whose projections are shard_map'ed.
    fused_step = False
    mlp_norm_in_up = False
    fused_norm = False

    def _smap(self, fn, in_specs, out_specs):
        from jax import shard_map

        # check_vma off: Pallas kernels inside do not carry varying-axis annotations.
        return shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    @staticmethod
    def _local(idx: jax.Array, rows_per_shard: int) -> jax.Array:
        return idx - jax.lax.axis_index(AXIS) * rows_per_shard

    def gathered_up(self, x, w_up, idx, b_up=None, *, activation="relu"):
        """x [B, D] replicated; w_up [F, U, D], idx [K], b_up [F, U] sharded -> a [B, K] sharded on K."""
        def local(x, w, idx, *b):
            return self.base.gathered_up(x, w, self._local(idx, w.shape[0]), b[0] if b else None,
                                         activation=activation)

        args, specs = (x, w_up, idx), (P(), P(AXIS), P(AXIS))
        if b_up is not None:
            args, specs = args + (b_up,), specs + (P(AXIS),)
        return self._smap(local, specs, P(None, AXIS))(*args)

    def gathered_down(self, a, w_down, idx):
        """a [B, K] sharded on K; w_down [F, D] sharded -> [B, D] replicated (the MLP's all-reduce)."""
        def local(a, w, idx):
            return jax.lax.psum(self.base.gathered_down(a, w, self._local(idx, w.shape[0])), AXIS)

        return self._smap(local, (P(None, AXIS), P(AXIS), P(AXIS)), P())(a, w_down, idx)

    def gathered_head_proj(self, x, w, idx, b=None):
        """x [B, D]; w [H, Dh, D], idx [Kh], b [H, Dh] sharded -> [B, Kh, Dh] sharded on Kh."""
        def local(x, w, idx, *b):
            return self.base.gathered_head_proj(x, w, self._local(idx, w.shape[0]), b[0] if b else None)

        args, specs = (x, w, idx), (P(), P(AXIS), P(AXIS))
        if b is not None:
            args, specs = args + (b,), specs + (P(AXIS),)
        return self._smap(local, specs, P(None, AXIS))(*args)

    def gathered_out_proj(self, o, w_out, idx):
        """o [B, Kh, Dh] sharded on Kh; w_out [H, Dh, D] sharded -> [B, D] replicated (attention's all-reduce)."""
        def local(o, w, idx):
            return jax.lax.psum(self.base.gathered_out_proj(o, w, self._local(idx, w.shape[0])), AXIS)

        return self._smap(local, (P(None, AXIS), P(AXIS), P(AXIS)), P())(o, w_out, idx)

    def sparse_decode_attention(self, q, k, v, valid, head_idx, *, scale, num_heads=None):
        """q [B, Kh, Dh] sharded on Kh; k, v [B, KV, S, Dh] sharded on KV; valid [B, S] -> [B, Kh, Dh]."""
        tp = tp_size(self.mesh)
        h_local = (num_heads or k.shape[1]) // tp

        def local(q, k, v, valid, idx):
            return self.base.sparse_decode_attention(q, k, v, valid, self._local(idx, h_local), scale=scale,
                                                     num_heads=h_local)

        specs = (P(None, AXIS), P(None, AXIS), P(None, AXIS), P(), P(AXIS))
        return self._smap(local, specs, P(None, AXIS))(q, k, v, valid, head_idx)


def sharded_ops(ops, mesh: Mesh) -> ShardedOps:
    return ShardedOps(ops, mesh)


def decode_setup(selector, ops, mesh: Mesh | None = None, *, batch_select: str = "union", combine: str = "sum"):
    """(selector, ops, place_cache) for a decode run (generate / bench) with a batch policy and optional TP.

    Without a mesh: the selector wrapped for `batch_select`, ops unchanged, place_cache None.
    With a mesh: per-shard top-K selection with its predictor weights placed on the mesh, shard_map'ed
    ops, and place_cache(cache) -> the cache sharded on its KV-head axis. A sparse.FixedSelector passes
    through unchanged: it must already be blockwise (`blockwise_fixed_selector`).
    """
    from dejavu_jax.batching import wrap_selector
    from dejavu_jax.sparse import FixedSelector

    if mesh is None:
        return wrap_selector(selector, batch_select=batch_select, combine=combine), ops, None
    if not isinstance(selector, FixedSelector):
        selector = shard_selector(tp_selector(selector, mesh, batch_select=batch_select, combine=combine), mesh)
    return selector, None if ops is None else sharded_ops(ops, mesh), functools.partial(shard_cache, mesh=mesh)


# --------------------------------------------------------------------------------------------
# A jitted decode step with explicit shardings, and HLO inspection
# --------------------------------------------------------------------------------------------
def decode_step_fn(cfg: ModelConfig, mesh: Mesh, cache: KVCache, *, selector=None, ops=None,
                   vocab_parallel: bool = False, donate: bool = True):
    """jit(forward) for one decode token with params/cache shardings pinned (cache donated).

    Call as step(params, selector, tokens [B, 1], positions [B, 1], cache) -> (logits [B, 1, V], cache).
    The selector is an argument (its predictor weights are traced leaves, placed by shard_selector).
    """
    from dejavu_jax.model import forward

    p_shard = param_shardings(cfg, mesh, vocab_parallel=vocab_parallel)
    c_shard = cache_shardings(cache, mesh)
    rep = NamedSharding(mesh, P())

    def step(params, sel, tokens, positions, cache):
        return forward(params, cfg, tokens, positions, cache, selector=sel, ops=ops)

    return jax.jit(step, in_shardings=(p_shard, None, rep, rep, c_shard), out_shardings=(rep, c_shard),
                   donate_argnums=(4,) if donate else ())


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many of each collective a compiled HLO module holds (async start/done pairs count once)."""
    counts = {}
    for op in COLLECTIVES:
        pattern = rf"=\s*[^=]*?\b{op}(-start)?\("
        counts[op] = len(re.findall(pattern, hlo_text))
    return counts


def collective_shapes(hlo_text: str, op: str) -> list[str]:
    """The result shapes of every `op` in a compiled HLO module, e.g. ['f32[1,32]', ...]."""
    return re.findall(rf"=\s*(\(?[a-z0-9]+\[[^\]]*\][^=]*?)\s+{op}(?:-start)?\(", hlo_text)


__all__ = ["AXIS", "LOGICAL_AXES", "RULES", "ShardingError", "ShardedOps", "blockwise_fixed_selector",
           "cache_shardings", "check_tp", "collective_counts", "collective_shapes", "decode_setup", "decode_step_fn",
           "init_params_sharded", "make_mesh", "param_shardings", "param_specs", "predictor_shardings",
           "shard_cache", "shard_params", "shard_selector", "sharded_ops", "tp_selector"]

"""OPT and Llama decoders as pure functions over a parameter pytree, with an explicit KV cache.

Parameter layout (per layer; chosen so that a selected neuron or head is contiguous rows):
  attn_norm, mlp_norm: {"scale": [D], "bias": [D] (LayerNorm only)}
  q:        [H, Dh, D]       head-major query projection      q_bias:  [H, Dh]
  kv:       [2, KV, Dh, D]   key (0) and value (1) projection kv_bias: [2, KV, Dh]
  out:      [H, Dh, D]       out projection, attn = sum_h o_h @ out[h]   out_bias: [D]
  up:       [F, U, D]        neuron-major; U=1 (ReLU) or U=2 (gate, up for SwiGLU)  up_bias: [F, U]
  down:     [F, D]           down projection stored transposed                      down_bias: [D]
Top level: embed [V, E], pos_embed [P, D] (learned positions), project_in [E, D], project_out [D, E],
final_norm, lm_head [V, E] (untied only). Biases/projections exist only when the config says so.

Query and key/value projections are separate arrays for every family, so MHA and GQA share one
code path and a sparse step gathers only what it needs (Q rows of the selected heads; K/V rows only
in the lazy KV mode).

Sparsity enters through a `Selector` (see `dejavu_jax.sparse`): at each block the selector returns,
for the attention heads and the MLP neurons, either nothing (dense), a keep-mask over the dense
activations (quality evaluation, any number of tokens), or row indices to gather (decode).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from dejavu_jax.config import ModelConfig
from pallas_kernels._common import apply_norm
from pallas_kernels.gather_attention import rotate_half_split

Params = dict[str, Any]

NEG_INF = -1e30


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
def param_shapes(cfg: ModelConfig) -> Params:
    """The exact shape of every parameter: the single source of truth for converters and init."""
    D, F, H, KV, Dh, E = cfg.hidden_size, cfg.ffn_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim

    def norm() -> dict:
        return {"scale": (D,), "bias": (D,)} if cfg.norm == "layernorm" else {"scale": (D,)}

    layer: dict[str, Any] = {
        "attn_norm": norm(),
        "mlp_norm": norm(),
        "q": (H, Dh, D),
        "kv": (2, KV, Dh, D),
        "out": (H, Dh, D),
        "up": (F, cfg.up_rows, D),
        "down": (F, D),
    }
    if cfg.attn_bias:
        layer.update(q_bias=(H, Dh), kv_bias=(2, KV, Dh), out_bias=(D,))
    if cfg.mlp_bias:
        layer.update(up_bias=(F, cfg.up_rows), down_bias=(D,))
    if cfg.qk_norm:
        layer.update(q_norm={"scale": (Dh,)}, k_norm={"scale": (Dh,)})
    shapes: Params = {"embed": (cfg.vocab_size, E), "layers": [dict(layer) for _ in range(cfg.num_layers)]}
    if cfg.positions == "learned":
        shapes["pos_embed"] = (cfg.max_positions + cfg.position_offset, D)
    if cfg.has_projections:
        shapes["project_in"] = (E, D)
        shapes["project_out"] = (D, E)
    if cfg.final_norm:
        shapes["final_norm"] = norm()
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, E)
    return shapes


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def check_params(params: Params, cfg: ModelConfig) -> None:
    """Raise ValueError naming the first parameter whose presence or shape disagrees with cfg."""
    expected = param_shapes(cfg)
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected, is_leaf=_is_shape)[0])
    flat_actual = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    name = lambda path: jax.tree_util.keystr(path)  # noqa: E731
    exp_names = {name(p): s for p, s in flat_expected.items()}
    act_names = {name(p): a for p, a in flat_actual.items()}
    missing = sorted(set(exp_names) - set(act_names))
    extra = sorted(set(act_names) - set(exp_names))
    if missing:
        raise ValueError(f"missing parameters: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise ValueError(f"unexpected parameters: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for key, shape in exp_names.items():
        if tuple(act_names[key].shape) != shape:
            raise ValueError(f"parameter {key} has shape {tuple(act_names[key].shape)}, config expects {shape}")


RANDOM_BLOCK_ELEMENTS = 1 << 24  # one RNG block: ~16 bytes of temporaries per element (bits, counters, fp32)


def _random_blocks(shape: tuple[int, ...]) -> tuple[int, int]:
    """(n_blocks, rows per block) for random init of a leaf: whole leading-axis rows, at most
    RANDOM_BLOCK_ELEMENTS elements per block (fewest blocks). The split depends only on the shape, so
    every execution strategy (sequential, vmapped, sharded) draws the same values."""
    rows, row_size = shape[0], math.prod(shape[1:])
    per_block = max(1, RANDOM_BLOCK_ELEMENTS // max(row_size, 1))
    block_rows = max(d for d in range(1, min(rows, per_block) + 1) if rows % d == 0)
    return rows // block_rows, block_rows


def random_leaf(key: jax.Array, shape: tuple[int, ...], dtype, *, sharded: bool = False) -> jax.Array:
    """0.02 * N(0, 1) at `shape` in `dtype`, drawn block by block of leading-axis rows (traceable).

    Block b is drawn from fold_in(key, b) in float32 and cast. Unsharded, the blocks run one after
    another (lax.map writes each into the output in place), so the temporaries are one block's,
    not the leaf's (RNG bits plus a float32 copy are ~8x the fp16 leaf, e.g. 5 GB for an OPT-66B
    MLP matrix). Sharded, the blocks are vmapped so each device draws its own rows.
    """
    if not shape:
        return (0.02 * jax.random.normal(key, (), jnp.float32)).astype(dtype)
    n_blocks, block_rows = _random_blocks(shape)

    def draw(b):  # -> [block_rows, *shape[1:]]
        return (0.02 * jax.random.normal(jax.random.fold_in(key, b), (block_rows,) + shape[1:],
                                         jnp.float32)).astype(dtype)

    blocks = jnp.arange(n_blocks)
    if n_blocks == 1:
        out = draw(0)[None]
    else:
        out = jax.vmap(draw)(blocks) if sharded else jax.lax.map(draw, blocks)
    return out.reshape(shape)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.bfloat16, shardings: Params | None = None) -> Params:
    """Random parameters at the config's shapes (for benchmarks at real sizes and tests).

    Created on the device one leaf at a time (`random_leaf`: one jitted call per leaf, compiled
    once per shape), so peak memory is the weights plus one RNG block, never a host copy, a
    float32 model or a second copy made by casting: OPT-66B in fp16 fits one 141 GB GPU.
    shardings: an optional pytree of shardings shaped like `param_shapes(cfg)`; each array is then
    created directly in its shards (nothing is materialised whole on one device).
    """
    shapes = param_shapes(cfg)
    entries, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    flat_shardings = ([None] * len(entries) if shardings is None
                      else jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: x is None))
    if len(flat_shardings) != len(entries):
        raise ValueError(f"shardings has {len(flat_shardings)} leaves, the parameters {len(entries)}")
    jitted: dict = {}  # (shape, is_scale, sharding) -> jitted initialiser, compiled once per shape

    def make(shape, is_scale, sharding):
        if is_scale:  # norm scales start at one, like the checkpoints they stand in for
            return jax.jit(lambda k: jnp.ones(shape, dtype), out_shardings=sharding)
        return jax.jit(lambda k: random_leaf(k, shape, dtype, sharded=sharding is not None), out_shardings=sharding)

    out = []
    for ((path, shape), sharding), k in zip(zip(entries, flat_shardings), jax.random.split(key, len(entries))):
        name = jax.tree_util.keystr(path)
        is_scale = "norm" in name and name.endswith("['scale']")
        fn_key = (shape, is_scale, sharding)
        if fn_key not in jitted:
            jitted[fn_key] = make(shape, is_scale, sharding)
        out.append(jitted[fn_key](k))
    return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values for every layer.

    k, v:  per layer [B, KV, S, Dh]
    valid: [B, S] bool, slots holding real tokens (left padding and unwritten slots are False)
    index: [] int32, next slot to write (shared by the batch; rows are aligned by left padding)
    win_x, win_pos: only in the lazy KV mode (`sparse.init_sparse_cache`): per layer [B, W, D], the
      normed attention inputs of the last W tokens (ring buffer, slot t at t % W), and their
      positions [B, W]; None in the exact mode.
    """

    k: list[jax.Array]
    v: list[jax.Array]
    valid: jax.Array
    index: jax.Array
    win_x: list[jax.Array] | None = None
    win_pos: jax.Array | None = None

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        v=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        valid=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


# --------------------------------------------------------------------------------------------
# Sparsity hooks
# --------------------------------------------------------------------------------------------
class Selection(NamedTuple):
    """How one block site (heads or neurons) is made sparse; at most one field is set."""

    idx: jax.Array | None = None  # [K] int32 rows to gather; decode only (one token per row)
    mask: jax.Array | None = None  # [B, T, N] bool keep-mask over the dense activations
    from_importance: Callable[[jax.Array], jax.Array] | None = None  # importance [B,T,N] -> keep-mask


@dataclasses.dataclass
class SelectContext:
    """What a selector may look at when it chooses layer `layer`'s heads or neurons.

    prev_input: the residual stream entering layer-1 (pre-norm), None at layer 0 (lookahead input)
    block_input: the residual stream entering this layer
    mlp_input: the residual stream entering this layer's MLP (only for the neuron site)
    ops: the forward's gathered-op backend, whose `topk_rows` turns scores into row indices
    """

    layer: int
    params: Params
    prev_input: jax.Array | None
    block_input: jax.Array
    mlp_input: jax.Array | None = None
    ops: Ops | None = None
    scratch: dict = dataclasses.field(default_factory=dict)  # a selector's values from heads() for neurons()


class Selector(Protocol):
    def heads(self, ctx: SelectContext) -> Selection | None: ...

    def neurons(self, ctx: SelectContext) -> Selection | None: ...


class Ops(Protocol):
    """The gathered matmuls of `pallas_kernels` (XLA references or Pallas kernels)."""

    gathered_up: Callable
    gathered_down: Callable
    gathered_head_proj: Callable
    gathered_out_proj: Callable
    sparse_decode_attention: Callable
    gathered_window_kv_update: Callable  # lazy KV mode: selected heads' window K/V into the cache
    gathered_window_qkv_update: Callable  # the same with Q (and, with fused_norm, the attention norm)
    fused_step: bool  # the lazy KV step takes Q and the window K/V from one op (pallas_kernels.Ops)
    topk_pair: bool  # rank a layer's heads and MLP blocks in one code_topk_pair launch
    mlp_norm_in_up: bool  # the gathered MLP step passes its norm to gathered_up
    fused_norm: bool  # the fused step's op normalises too


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def norm(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    return apply_norm(x, p["scale"], p.get("bias"), kind=cfg.norm, eps=cfg.norm_eps)


def head_norm(p: Params | None, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Qwen3's RMSNorm of every query or key head over Dh (p: lp["q_norm"] or lp["k_norm"]); x
    unchanged for models without it (p None). x [..., Dh]."""
    return x if p is None else apply_norm(x, p["scale"], kind="rmsnorm", eps=cfg.norm_eps)


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles at `positions`. positions [B, T] -> two [B, T, Dh/2] float32."""
    Dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh))  # [Dh/2]
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / jnp.asarray(cfg.rope_freq_factors, jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    if cfg.rope_attention_factor != 1.0:  # YaRN
        return jnp.cos(angles) * cfg.rope_attention_factor, jnp.sin(angles) * cfg.rope_attention_factor
    return jnp.cos(angles), jnp.sin(angles)


def rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary embedding, half-split convention (as Hugging Face Llama). x [B, T, N, Dh]."""
    cos, sin = rope_cos_sin(positions, cfg)
    return rotate_half_split(x, cos[:, :, None, :], sin[:, :, None, :])


def _apply_keep(act: jax.Array, importance: jax.Array, sel: Selection | None) -> jax.Array:
    """Zero the activations a mask-style selection drops. act [B, T, N, ...], importance [B, T, N]."""
    if sel is None or sel.idx is not None:
        return act
    keep = sel.mask if sel.mask is not None else sel.from_importance(importance)
    keep = keep.reshape(keep.shape + (1,) * (act.ndim - keep.ndim))
    return jnp.where(keep, act, jnp.zeros((), act.dtype))


def mlp_activations(lp: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Dense MLP hidden activations. x [B, T, D] (normed) -> [B, T, F]."""
    h = jnp.einsum("btd,fud->btfu", x, lp["up"])
    if "up_bias" in lp:
        h = h + lp["up_bias"]
    if cfg.activation == "relu":
        return jax.nn.relu(h[..., 0])
    return jax.nn.silu(h[..., 0]) * h[..., 1]


def mlp(lp: Params, cfg: ModelConfig, x: jax.Array, sel: Selection | None, ops: Ops | None,
        record: dict | None = None, *, norm_inside: bool = False) -> jax.Array:
    """x [B, T, D] (normed; with norm_inside the residual, which the gathered up projection normalises
    with lp["mlp_norm"] itself) -> [B, T, D]."""
    if sel is not None and sel.idx is not None:
        B, T, D = x.shape
        norm_arg = {}
        if norm_inside:
            p = lp["mlp_norm"]
            norm_arg["norm"] = (cfg.norm, cfg.norm_eps, p["scale"], p.get("bias"))
        a = ops.gathered_up(x.reshape(B * T, D), lp["up"], sel.idx, lp.get("up_bias"), activation=cfg.activation,
                            **norm_arg)
        y = ops.gathered_down(a, lp["down"], sel.idx).reshape(B, T, D)
    else:
        a = mlp_activations(lp, cfg, x)  # [B, T, F]
        if record is not None:
            record["neuron_importance"] = jnp.abs(a)
        a = _apply_keep(a, jnp.abs(a), sel)
        y = jnp.einsum("btf,fd->btd", a, lp["down"])
    if "down_bias" in lp:
        y = y + lp["down_bias"]
    return y


def _project_heads(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """x [B, T, D], w [N, Dh, D] -> [B, T, N, Dh]."""
    y = jnp.einsum("btd,nhd->btnh", x, w)
    return y + b if b is not None else y


def kv_project(cfg: ModelConfig, x: jax.Array, positions: jax.Array, w: jax.Array, b: jax.Array | None,
               k_norm: Params | None = None):
    """Keys and values of some KV heads. x [B, T, D]; positions [B, T]; w [2, N, Dh, D]; b [2, N, Dh];
    k_norm: the layer's key-head norm (Qwen3) or None.

    Returns (k, v), each [B, N, T, Dh], k normed and with RoPE applied where the model uses them.
    """
    kv = jnp.einsum("btd,ckhd->cbtkh", x, w)  # [2, B, T, N, Dh]
    if b is not None:
        kv = kv + b[:, None, None]
    k_new, v_new = head_norm(k_norm, kv[0], cfg), kv[1]
    if cfg.positions == "rope":
        k_new = rope(k_new, positions, cfg)
    return k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)


def attention(lp: Params, cfg: ModelConfig, x: jax.Array, positions: jax.Array, layer_cache,
              key_valid: jax.Array, query_slot: jax.Array, key_slot: jax.Array, sel: Selection | None,
              ops: Ops | None, record: dict | None = None, *, fused_inputs: bool = False,
              norm_inside: bool = False):
    """Self-attention over the cache (or over the chunk itself when layer_cache is None).

    x [B, T, D] normed input (with fused_inputs and norm_inside: the residual, which the lazy KV
    mode's fused op normalises, `sparse.lazy_attention_inputs`); positions [B, T]; layer_cache (k, v, index) with
    k/v [B, KV, S, Dh]; key_valid [B, S]; query_slot [T] and key_slot [S] are absolute slots for the
    causal mask. Returns (out [B, T, D], (k, v) updated).
    """
    B, T, D = x.shape
    H, KV, Dh, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.kv_group_size
    q = None  # the selected heads' queries, when the fused lazy-KV op computes them
    if layer_cache is not None and len(layer_cache) == 5:
        # Lazy KV mode (dejavu_jax.sparse): K/V only for the selected heads' KV groups.
        from dejavu_jax.sparse import lazy_attention_inputs, lazy_kv_update

        if fused_inputs:
            q, k_all, v_all, win_x = lazy_attention_inputs(lp, cfg, x, layer_cache, sel, ops,
                                                           normed=not norm_inside)
        else:
            k_all, v_all, win_x = lazy_kv_update(lp, cfg, x, positions, layer_cache, sel, ops)
        new_cache = (k_all, v_all, win_x)
    else:
        k_new, v_new = kv_project(cfg, x, positions, lp["kv"], lp.get("kv_bias"), lp.get("k_norm"))  # [B, KV, T, Dh]
        if layer_cache is None:
            k_all, v_all = k_new, v_new
            new_cache = None
        else:
            k_cache, v_cache, index = layer_cache
            k_all = jax.lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), (0, 0, index, 0))
            v_all = jax.lax.dynamic_update_slice(v_cache, v_new.astype(v_cache.dtype), (0, 0, index, 0))
            new_cache = (k_all, v_all)

    scale = 1.0 / math.sqrt(Dh)
    if sel is not None and sel.idx is not None:
        # Decode fast path: only the selected query heads are projected, attended and mixed out.
        assert T == 1, "gathered heads are a decode-only path (one token per row)"
        if q is None:
            q = ops.gathered_head_proj(x[:, 0], lp["q"], sel.idx, lp.get("q_bias"))  # [B, K, Dh]
            q = head_norm(lp.get("q_norm"), q, cfg)
            if cfg.positions == "rope":
                q = rope(q[:, None], positions, cfg)[:, 0]
        valid = key_valid & (key_slot[None, :] <= query_slot[0])
        o = ops.sparse_decode_attention(q, k_all, v_all, valid, sel.idx, scale=scale,
                                        num_heads=H)  # [B, K, Dh]; GQA: head h reads kv head h // G
        out = ops.gathered_out_proj(o, lp["out"], sel.idx)[:, None]  # [B, 1, D]
    else:
        q = head_norm(lp.get("q_norm"), _project_heads(x, lp["q"], lp.get("q_bias")), cfg)  # [B, T, H, Dh]
        if cfg.positions == "rope":
            q = rope(q, positions, cfg)
        q = q.reshape(B, T, KV, G, Dh)
        scores = jnp.einsum("btkgh,bksh->bkgts", q, k_all.astype(q.dtype)).astype(jnp.float32) * scale
        mask = key_valid[:, None, None, None, :] & (key_slot[None, :] <= query_slot[:, None])[None, None, None]
        scores = jnp.where(mask, scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        o = jnp.einsum("bkgts,bksh->btkgh", probs, v_all.astype(x.dtype)).reshape(B, T, H, Dh)
        importance = jnp.linalg.norm(o.astype(jnp.float32), axis=-1)  # [B, T, H]
        if record is not None:
            record["head_importance"] = importance
        o = _apply_keep(o, importance, sel)
        out = jnp.einsum("btnh,nhd->btd", o, lp["out"])
    if "out_bias" in lp:
        out = out + lp["out_bias"]
    return out, new_cache


def block(lp: Params, cfg: ModelConfig, h: jax.Array, prev_input: jax.Array | None, positions: jax.Array,
          layer_cache, key_valid, query_slot, key_slot, *, layer: int, selector: Selector | None,
          ops: Ops | None, record: dict | None = None):
    """One decoder layer. h [B, T, D] residual stream -> ([B, T, D], updated (k, v))."""
    ctx = SelectContext(layer=layer, params=lp, prev_input=prev_input, block_input=h, ops=ops)
    head_sel = selector.heads(ctx) if selector is not None else None
    from dejavu_jax.sparse import fuses_attention_inputs
    from pallas_kernels import fused_norm_enabled

    fused = fuses_attention_inputs(cfg, layer_cache, head_sel, ops)
    norm_inside = fused and fused_norm_enabled(ops)
    x = norm(lp["attn_norm"], h, cfg) if cfg.pre_norm and not norm_inside else h
    attn_out, new_cache = attention(lp, cfg, x, positions, layer_cache, key_valid, query_slot, key_slot,
                                    head_sel, ops, record, fused_inputs=fused, norm_inside=norm_inside)
    h = h + attn_out
    if not cfg.pre_norm:
        h = norm(lp["attn_norm"], h, cfg)
    if selector is not None:
        ctx.mlp_input = h
        neuron_sel = selector.neurons(ctx)
    else:
        neuron_sel = None
    # A gathered MLP step may normalise inside the up projection (saves the norm's two launches).
    norm_inside = (cfg.pre_norm and neuron_sel is not None and neuron_sel.idx is not None
                   and getattr(ops, "mlp_norm_in_up", False))
    x = norm(lp["mlp_norm"], h, cfg) if cfg.pre_norm and not norm_inside else h
    h = h + mlp(lp, cfg, x, neuron_sel, ops, record, norm_inside=norm_inside)
    if not cfg.pre_norm:
        h = norm(lp["mlp_norm"], h, cfg)
    return h, new_cache


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
def embed(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, dtype) -> jax.Array:
    h = params["embed"][tokens].astype(dtype)  # [B, T, E]
    if cfg.has_projections:
        h = h @ params["project_in"].astype(dtype)
    if cfg.positions == "learned":
        h = h + params["pos_embed"][positions + cfg.position_offset].astype(dtype)
    return h


def unembed(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    if cfg.final_norm:
        h = norm(params["final_norm"], h, cfg)
    if cfg.has_projections:
        h = h @ params["project_out"].astype(h.dtype)
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("bte,ve->btv", h, head.astype(h.dtype)).astype(jnp.float32)


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
            cache: KVCache | None = None, valid: jax.Array | None = None, *, selector: Selector | None = None,
            ops: Ops | None = None, record: list | None = None, return_hidden: bool = False):
    """Run the decoder on a chunk of tokens.

    tokens, positions: [B, T] int32; valid: [B, T] bool (False for padding; default all True).
    With a cache, the chunk is written at cache.index and attends to everything valid before it;
    without one, it attends causally within the chunk (evaluation, training-data collection).
    record: if a list is given, one dict per layer is appended with the block input ("input"
    [B,T,D]) and true importances ("neuron_importance" [B,T,F], "head_importance" [B,T,H]).
    Returns (logits [B, T, V] float32, new cache or None) or, with return_hidden, the final
    residual [B, T, D] in place of the logits.
    """
    B, T = tokens.shape
    dtype = params["layers"][0]["up"].dtype
    if valid is None:
        valid = jnp.ones((B, T), bool)
    h = embed(params, cfg, tokens, positions, dtype)
    if cache is None:
        key_valid, query_slot, key_slot = valid, jnp.arange(T), jnp.arange(T)
    else:
        key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
        query_slot = cache.index + jnp.arange(T)
        key_slot = jnp.arange(cache.max_len)
    new_k, new_v, new_win = [], [], []
    lazy = cache is not None and cache.win_x is not None
    if lazy:  # the ring buffer keeps the positions of the last W tokens (slot t at t % W)
        from dejavu_jax.sparse import ring_write

        win_pos = ring_write(cache.win_pos, positions, cache.index)
    prev_input = None
    for layer, lp in enumerate(params["layers"]):
        rec = {"input": h} if record is not None else None
        layer_cache = None if cache is None else (cache.k[layer], cache.v[layer], cache.index)
        if lazy:
            layer_cache = layer_cache + (cache.win_x[layer], win_pos)
        h_next, kv = block(lp, cfg, h, prev_input, positions, layer_cache, key_valid, query_slot, key_slot,
                           layer=layer, selector=selector, ops=ops, record=rec)
        prev_input, h = h, h_next
        if record is not None:
            record.append(rec)
        if kv is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
            if lazy:
                new_win.append(kv[2])
    new_cache = None if cache is None else KVCache(new_k, new_v, key_valid, cache.index + T)
    if lazy:
        new_cache = dataclasses.replace(new_cache, win_x=new_win, win_pos=win_pos)
    if return_hidden:
        return h, new_cache
    return unembed(params, cfg, h), new_cache


def positions_from_valid(valid: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """Position ids for (left-)padded rows: 0 at each row's first real token. valid [B, T] -> [B, T]."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0) + start

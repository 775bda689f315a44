"""Batch-1 decode latency: our JAX decoder next to transformers and the bandwidth floor, in one run.

    python -m dejavu_jax.bench --preset opt-6.7b --dtype fp16 --prompt-len 128 --new-tokens 128
    python -m dejavu_jax.bench --model checkpoints/opt-125m --baselines none

Prefill and decode are reported separately. Decode ms/token is the time of the jitted decode loop
(`new_tokens` steps, EOS disabled) divided by the steps. The floor is the bytes one decode step
must read (every weight once) over the device copy bandwidth measured in the same run.
Writes `bench.json` and `bench.md` into --out.

    python -m dejavu_jax.bench --preset opt-6.7b --batches 1,2,4,8,16,32 --sparse 0.25:0.5 --kernels pallas

A batch sweep (--batches) times dense and sparse decode at each batch size instead: ms per decode
step and tokens/s (batch / step time), written as `sweep.json`, `sweep.md` and `sweep.png`.

Memory: random weights are created on the device leaf by leaf, the KV cache holds prompt + new
tokens, and before anything large is allocated the run prints its estimated peak (weights, KV
caches, predictors) and stops with an error if it exceeds the allocator's limit. JAX's GPU
allocator stops at XLA_CLIENT_MEM_FRACTION of the GPU (0.75 by default, also without
preallocation): OPT-66B in fp16 (132 GB) on a 141 GB GPU needs XLA_CLIENT_MEM_FRACTION=0.95.
The transformers baselines run first, in their own process that exits before JAX allocates, so
at 66B the GPU holds one copy of the weights at a time.

    python -m dejavu_jax.bench --preset opt-66b --tp 2 --baselines copy --sparse 0.25:0.5 --kernels pallas

--tp N shards the model over the first N devices (Megatron-style, one all-reduce per block half);
`scripts/tp_scaling.py` puts the bench.json files of several TP degrees side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch baselines share the GPU after us

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.cli import DocHelpFormatter
from dejavu_jax.config import ModelConfig, preset
from dejavu_jax.generate import HOST_LOOP_OPTIONS, Generator, decode_compiler_options
from dejavu_jax.sparse import (
    LAZY_WINDOW,
    MLP_TOPK_BLOCK,
    init_sparse_cache,
    refresh_groups,
    step_fuses_attention_inputs,
)
from pallas_kernels import fused_norm_enabled

REPO_ROOT = Path(__file__).resolve().parent.parent


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30, reps: int = 5, chain: int | None = None) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written (as REFERENCE.md does).

    One jitted call runs `chain` dependent copies: a single 1 GiB copy takes ~0.7 ms on an H100,
    and the ~0.1-0.3 ms of host dispatch around one call read as 2.0-2.6 TB/s instead of 3.0.
    """
    chain = chain or (2 if jax.default_backend() == "cpu" else 16)  # CPU: no launch cost to hide, slow copies
    x = jnp.ones((nbytes // 2,), jnp.float16)
    copy = jax.jit(lambda a: jax.lax.fori_loop(0, chain, lambda i, v: v + jnp.float16(1), a))
    copy(x).block_until_ready()
    t = _median_time(lambda: copy(x), reps)
    return 2 * nbytes * chain / t / 1e9


def decode_weight_bytes(cfg: ModelConfig, itemsize: int, mlp_density: float = 1.0, head_density: float = 1.0,
                        kv_exact: bool = True, lazy_window: int = LAZY_WINDOW) -> int:
    """Bytes of weights one batch-1 decode step reads (one embedding row; the whole LM head).

    kv_exact=False: the lazy KV mode reads the K/V rows (and biases) of the selected heads' KV groups
    plus the ceil(KV / W) groups it refreshes round-robin each step (W = lazy_window), at most all KV.
    """
    D, F, H, KV, Dh, E = cfg.hidden_size, cfg.ffn_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    k_neurons = max(1, round(mlp_density * F))
    k_heads = max(1, round(head_density * H))
    if kv_exact:
        kv_heads = KV
    else:
        kv_heads = min(KV, max(1, round(head_density * KV)) + refresh_groups(KV, lazy_window))
    per_layer = (2 * k_heads * Dh * D + 2 * kv_heads * Dh * D + (cfg.up_rows + 1) * k_neurons * D)
    per_layer_bias = ((k_heads * Dh + 2 * kv_heads * Dh + D) * cfg.attn_bias
                      + (k_neurons * cfg.up_rows + D) * cfg.mlp_bias)
    per_layer += per_layer_bias + 4 * D  # norms
    total = cfg.num_layers * per_layer + cfg.vocab_size * E + E + D  # LM head (tied or not) + embedding row
    if cfg.has_projections:
        total += 2 * E * D
    return total * itemsize


def error_text(e: Exception) -> str:
    """One line for a table row whose run failed: the exception type and its first line."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def cache_len(prompt_len: int, new_tokens: int) -> int:
    """KV cache slots of a bench run: prompt + new tokens, rounded up to 64 (one compile per bucket)."""
    return -(-(prompt_len + new_tokens) // 64) * 64


def bench_jax(cfg: ModelConfig, params, *, prompt_len: int, new_tokens: int, batch: int = 1, selector=None,
              ops=None, reps: int = 5, kv_mode: str = "exact", place_cache=None, decode_options=None) -> dict:
    """Prefill ms and decode ms/token of our jitted path (compile excluded, medians of reps).

    place_cache: cache -> cache placed on devices (tensor parallelism: `sharding.shard_cache`).
    decode_options: the decode loop's XLA compiler options (`Generator.decode_options`).
    At most two KV caches are alive at once; the decode program is compiled ahead of time so its
    temporaries are checked against the free device memory before it runs (`decode_temp_bytes`).
    """
    cfg = cfg.replace(eos_token_id=None)  # decode exactly new_tokens steps
    gen = Generator(cfg, selector=selector, ops=ops, decode_options=decode_options)
    dtype = params["layers"][0]["up"].dtype
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    valid = jnp.ones((batch, prompt_len), bool)
    max_len = cache_len(prompt_len, new_tokens)
    key = jax.random.PRNGKey(0)
    new_cache = lambda: init_sparse_cache(cfg, batch, max_len, dtype, kv_mode=kv_mode)  # noqa: E731
    if place_cache is not None:
        make_cache = new_cache
        new_cache = lambda: place_cache(make_cache())  # noqa: E731

    t0 = time.perf_counter()
    logits, cache, pos = gen.prefill(params, tokens, valid, new_cache())
    decode = gen.decode.lower(params, gen._sel_dynamic, cache, logits, pos, key, max_new_tokens=new_tokens).compile()
    temp_bytes = compiled_temp_bytes(decode)
    check_fits(temp_bytes, "the decode program's temporaries", device_memory())
    out, _, cache = decode(params, gen._sel_dynamic, cache, logits, pos, key)
    out.block_until_ready()
    compile_s = time.perf_counter() - t0

    prefill_times = []
    for _ in range(reps):
        c = jax.block_until_ready(new_cache())
        t0 = time.perf_counter()
        logits, c, pos = gen.prefill(params, tokens, valid, c)
        logits.block_until_ready()
        prefill_times.append(time.perf_counter() - t0)
    del c
    decode_times = []
    for _ in range(reps):
        cache = None  # the last step's cache is freed before the next one is allocated
        logits, cache, pos = gen.prefill(params, tokens, valid, new_cache())
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        out, _, cache = decode(params, gen._sel_dynamic, cache, logits, pos, key)
        out.block_until_ready()
        decode_times.append(time.perf_counter() - t0)
    del gen, cache, decode
    gc.collect()  # the Generator's jit wrappers form a cycle that holds the selector's predictors
    return {"prefill_ms": statistics.median(prefill_times) * 1e3,
            "decode_ms_per_token": statistics.median(decode_times) / new_tokens * 1e3,
            "compile_s": compile_s, "decode_temp_bytes": temp_bytes}


# --------------------------------------------------------------------------------------------
# Device memory: estimate before allocating, refuse what cannot fit
# --------------------------------------------------------------------------------------------
class DeviceMemoryError(RuntimeError):
    """A run would not fit the device's memory (raised before the allocation that would fail)."""


MEM_FRACTION_HINT = ("JAX's GPU allocator stops at XLA_CLIENT_MEM_FRACTION of the GPU's memory (0.75 by default, "
                     "also with XLA_PYTHON_CLIENT_PREALLOCATE=false): raise it, e.g. XLA_CLIENT_MEM_FRACTION=0.95, "
                     "or shrink the run (batch, prompt + new tokens, dtype)")


def device_memory(device=None) -> dict | None:
    """{'bytes_limit', 'bytes_in_use'} of a device's allocator (default: the first device); None where
    the backend reports no limit (CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # backends without allocator statistics
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return {"bytes_limit": int(stats["bytes_limit"]), "bytes_in_use": int(stats.get("bytes_in_use", 0))}


def check_fits(need_bytes: int, what: str, memory: dict | None) -> None:
    """Raise DeviceMemoryError if need_bytes exceeds the allocator's free bytes (no-op when memory is None)."""
    if memory is None:
        return
    free = memory["bytes_limit"] - memory["bytes_in_use"]
    if need_bytes > free:
        gib = 1 << 30
        raise DeviceMemoryError(f"{what} need {need_bytes / gib:.1f} GiB but the device allocator has "
                                f"{free / gib:.1f} GiB free (limit {memory['bytes_limit'] / gib:.1f} GiB, "
                                f"{memory['bytes_in_use'] / gib:.1f} GiB in use). {MEM_FRACTION_HINT}")


def param_bytes(cfg: ModelConfig, itemsize: int, tp: int = 1) -> int:
    """Bytes of all parameters (per device under tensor parallelism: layers split, the rest replicated)."""
    shapes = M.param_shapes(cfg)
    count = lambda tree: sum(math.prod(s) for s in jax.tree_util.tree_leaves(tree, is_leaf=M._is_shape))  # noqa: E731
    layers = count(shapes.pop("layers"))
    return (-(-layers // tp) + count(shapes)) * itemsize


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype, kv_mode: str = "exact") -> int:
    """Bytes of one KV cache (shapes only: nothing is allocated)."""
    shape = jax.eval_shape(lambda: init_sparse_cache(cfg, batch, max_len, dtype, kv_mode=kv_mode))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shape))


def peak_bytes_estimate(cfg: ModelConfig, dtype, *, batch: int, prompt_len: int, new_tokens: int, rank: int = 0,
                        kv_modes: Sequence[str] = ("exact",), tp: int = 1) -> dict:
    """Estimated peak device bytes of a bench run, per device: weights + two KV caches + one predictor set.

    rank 0: no sparse runs (no predictors). Two caches: bench_jax keeps the one being decoded and at
    most one more alive. The predictor set is the bench's selector as built (the predictors and
    their transposed decode-step copies, `sparse.share_first_matmul`), counted whole on each device.
    Compiled programs' temporaries come on top and are checked when compiled.
    """
    itemsize = jnp.dtype(dtype).itemsize
    max_len = cache_len(prompt_len, new_tokens)
    est = {"weights": param_bytes(cfg, itemsize, tp),
           "kv_caches": 2 * max(cache_bytes(cfg, batch, max_len, dtype, kv) for kv in kv_modes) // tp,
           "predictors": selector_bytes(cfg, rank, dtype) if rank else 0}
    est["total"] = sum(est.values())
    return est


def compiled_temp_bytes(compiled) -> int:
    """Temporary buffer bytes of a compiled program (0 where the backend does not say)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return 0
    return int(getattr(stats, "temp_size_in_bytes", 0) or 0)


def describe_estimate(est: dict, memory: dict | None) -> str:
    gb = lambda n: f"{n / (1 << 30):.1f} GiB"  # noqa: E731
    parts = ", ".join(f"{k.replace('_', ' ')} {gb(v)}" for k, v in est.items() if k != "total")
    limit = f"allocator limit {gb(memory['bytes_limit'])}" if memory else "no device limit reported (CPU): not checked"
    return f"estimated peak device memory {gb(est['total'])} ({parts}); {limit}"


def random_predictor_selector(cfg: ModelConfig, key: jax.Array, *, mlp_density: float, head_density: float,
                              rank: int, dtype, lookahead: bool = True, transpose: bool = True,
                              mlp_topk_block: int = 0):
    """Predictors with random weights at real shapes: the latency of predicting in the loop, not its quality."""
    from dejavu_jax.sparse import PredictorSelector, SparsityConfig, share_first_matmul

    sp = SparsityConfig(mode="predictor", mlp_density=mlp_density, head_density=head_density, lookahead=lookahead,
                        mlp_topk_block=mlp_topk_block)
    D = cfg.hidden_size

    def layer(k):
        ka, kb, kc, kd = jax.random.split(k, 4)
        normal = lambda k, s: (jax.random.normal(k, s, jnp.float32) / np.sqrt(s[0])).astype(dtype)  # noqa: E731
        return {"mlp": {"a": normal(ka, (D, rank)), "b": normal(kb, (rank, cfg.ffn_size))},
                "heads": {"a": normal(kc, (D, rank)), "b": normal(kd, (rank, cfg.num_heads))}}

    preds = [layer(k) for k in jax.random.split(key, cfg.num_layers)]
    return share_first_matmul(PredictorSelector(preds, sp.mlp_schedule(cfg), sp.head_schedule(cfg), cfg.ffn_size,
                                                cfg.num_heads, lookahead, True, mlp_blocks=sp.mlp_topk_blocks(cfg)),
                              transpose=transpose)


def fixed_index_selector(cfg: ModelConfig, *, mlp_density: float, head_density: float, seed: int = 0):
    """The same K per layer as the predictor runs, with fixed random rows: the step without predictors."""
    from dejavu_jax.sparse import FixedSelector, SparsityConfig

    sp = SparsityConfig(mode="predictor", mlp_density=mlp_density, head_density=head_density)
    rng = np.random.default_rng(seed)
    pick = lambda n, k: None if k >= n else jnp.asarray(np.sort(rng.choice(n, k, replace=False)), jnp.int32)  # noqa: E731
    return FixedSelector([pick(cfg.ffn_size, k) for k in sp.mlp_schedule(cfg)],
                         [pick(cfg.num_heads, k) for k in sp.head_schedule(cfg)], cfg.ffn_size, cfg.num_heads)


def all_rows_selector(cfg: ModelConfig):
    """Every neuron and head selected: dense decode through the gathered kernels (no XLA matvecs)."""
    from dejavu_jax.sparse import FixedSelector

    return FixedSelector([jnp.arange(cfg.ffn_size, dtype=jnp.int32)] * cfg.num_layers,
                         [jnp.arange(cfg.num_heads, dtype=jnp.int32)] * cfg.num_layers, cfg.ffn_size, cfg.num_heads)


def selector_bytes(cfg: ModelConfig, rank: int, dtype) -> int:
    """Device bytes of `random_predictor_selector`'s arrays (shapes only: nothing is allocated)."""
    shape = jax.eval_shape(lambda: random_predictor_selector(cfg, jax.random.PRNGKey(0), mlp_density=0.5,
                                                             head_density=0.5, rank=rank, dtype=dtype))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shape))


def predictor_bytes(cfg: ModelConfig, rank: int, itemsize: int, mlp_predictor: str = "linear") -> int:
    """Bytes of all predictors: heads and MLP share D -> r; the magnitude MLP form has two r -> F heads
    (gate, up) plus three length-F vectors and a scale."""
    D, F = cfg.hidden_size, cfg.ffn_size
    mlp = D * rank + (rank * F if mlp_predictor == "linear" else 2 * rank * F + 3 * F + 1)
    return cfg.num_layers * (mlp + D * rank + rank * cfg.num_heads) * itemsize


SERIAL_SCHEDULING = "XLA's default CUDA graphs (kernels chained, loop on the host)"
HOST_LOOP = "decode loop on the host (not captured in the CUDA graph)"
# The decode loop's XLA options as extras (GPU only): label -> Generator.decode_options
DECODE_OPTION_EXTRAS = {HOST_LOOP: HOST_LOOP_OPTIONS, SERIAL_SCHEDULING: {}}
FUSED_STEP_CHOICES = {"auto": None, "on": True, "off": False}  # --fused-step -> pallas_kernels.Ops.fused_step
FUSED_NORM_CHOICES = {"on": True, "off": False}  # --fused-norm -> pallas_kernels.Ops.fused_norm


def _step_label(fused: bool, norm_inside: bool) -> str:
    """How a row's batch-1 lazy-KV step takes its attention inputs (pallas_kernels.Ops.fused_step/fused_norm)."""
    if not fused:
        return "unfused step"
    return "fused step, attention norm inside" if norm_inside else "fused step"


class _Variant(NamedTuple):
    """One sparse row's setup beside the density point's backend and KV mode."""

    label: str
    lookahead: bool = True
    fixed: bool = False  # fixed random indices instead of predictors
    transpose: bool = True  # the predictors' transposed decode-step layout (`sparse.share_first_matmul`)
    mlp_topk_block: int = 0
    ops_changes: dict = {}  # replaced fields of pallas_kernels.Ops (never mutated)
    decode_options: dict | None = None  # Generator.decode_options


def sparse_rows(cfg: ModelConfig, params, *, densities: list[tuple[float, float]], kernels: list[str], rank: int,
                kv_modes: list[str], prompt_len: int, new_tokens: int, reps: int, bw: float,
                extras: bool = True, batch: int = 1, mesh=None, batch_select: str = "union",
                mlp_topk_block: int = 0, fused_step: bool | None = None,
                fused_norm: bool = False) -> list[dict]:
    """End-to-end sparse decode (random predictors with lookahead in the loop) at each density point.

    mlp_topk_block: the predictors rank the MLP neurons per block of this many (0: one top-K per
    layer); with extras, the first point also runs the other setting for comparison. fused_step:
    the batch-1 lazy-KV step's attention inputs from one launch (`pallas_kernels.Ops.fused_step`;
    None: the backend's default) and fused_norm whether that launch normalises too
    (`pallas_kernels.Ops.fused_norm`); extras time the other settings too (all three steps).

    batch > 1 uses `batch_select` (union: one index set per step; per-row: masks); a mesh runs
    tensor-parallel (per-shard top-K, shard_map'ed gathers, sharded KV cache; see dejavu_jax.sharding).

    The first density point is timed with every kernel backend and KV mode (and, with extras, also
    without lookahead and with fixed indices, i.e. without predictors: the predictor's share of the
    step); the other points with the first backend and KV mode only, which draws the density curve.
    """
    from pallas_kernels import get_ops

    dtype = params["layers"][0]["up"].dtype
    itemsize = jnp.dtype(dtype).itemsize
    pbytes = predictor_bytes(cfg, rank, itemsize)
    rows = []
    for i, (mlp_d, head_d) in enumerate(densities):
        combos = [(b, kv) for b in kernels for kv in kv_modes] if i == 0 else [(kernels[0], kv_modes[0])]
        for j, (backend, kv_mode) in enumerate(combos):
            ops = get_ops(backend, fused_step=fused_step, fused_norm=fused_norm)
            wbytes = decode_weight_bytes(cfg, itemsize, mlp_d, head_d, kv_exact=kv_mode == "exact")
            if batch > 1 and batch_select == "per-row":  # masks over dense activations read every weight
                wbytes = decode_weight_bytes(cfg, itemsize)
            block = mlp_topk_block
            base = "predictor+lookahead" + (f", MLP top-K per {block} rows" if block else "")
            fused = step_fuses_attention_inputs(cfg, kv_mode, ops)
            norm_inside = fused_norm_enabled(ops)
            main = base + (f", {_step_label(True, norm_inside)}" if fused else "")
            variants = [_Variant(main, mlp_topk_block=block)]
            if extras and i == 0 and j == 0:
                if block:
                    variants.append(_Variant("predictor+lookahead, one MLP top-K per layer"))
                elif mesh is None and cfg.ffn_size % MLP_TOPK_BLOCK == 0:
                    variants.append(_Variant(f"predictor+lookahead, MLP top-K per {MLP_TOPK_BLOCK} rows",
                                             mlp_topk_block=MLP_TOPK_BLOCK))
                variants += [_Variant("predictor, no lookahead", lookahead=False, mlp_topk_block=block),
                             _Variant("fixed indices (no predictor)", fixed=True)]
                if decode_compiler_options():  # a GPU: the same step without the loop's XLA options
                    variants += [_Variant(f"{main}, {what}", mlp_topk_block=block, decode_options=options)
                                 for what, options in DECODE_OPTION_EXTRAS.items()]
                if batch == 1 and mesh is None:  # the layout and the fused ops only matter to the batch-1 step
                    variants.append(_Variant("predictor+lookahead, [D, r] predictor layout", transpose=False,
                                             mlp_topk_block=block))
                    if cfg.pre_norm and backend == "pallas":  # the other settings of the fused launches
                        if fused:  # the fused step with the norm on the other side, and the unfused step
                            others = [(True, not norm_inside), (False, norm_inside)]
                        else:  # the fused step both ways
                            others = [(True, norm_inside), (True, not norm_inside)]
                        for f, n in others:
                            variants.append(_Variant(f"{base}, {_step_label(f, n)}", mlp_topk_block=block,
                                                     ops_changes={"fused_step": f, "fused_norm": n}))
                        variants.append(_Variant(f"{main}, MLP norm inside the up kernel", mlp_topk_block=block,
                                                 ops_changes={"mlp_norm_in_up": True}))
                    if block and backend == "pallas":  # Ops.topk_pair off: heads and MLP ranked apart
                        variants.append(_Variant(f"{main}, top-K of heads and MLP in two launches",
                                                 mlp_topk_block=block, ops_changes={"topk_pair": False}))
            for v in variants:
                label, fixed, block = v.label, v.fixed, 0 if v.fixed else v.mlp_topk_block
                if fixed and mesh is not None:
                    from dejavu_jax.sharding import blockwise_fixed_selector

                    sel = blockwise_fixed_selector(cfg, mesh.shape["model"], mlp_density=mlp_d, head_density=head_d)
                elif fixed:
                    sel = fixed_index_selector(cfg, mlp_density=mlp_d, head_density=head_d)
                else:
                    sel = random_predictor_selector(cfg, jax.random.PRNGKey(1), mlp_density=mlp_d,
                                                    head_density=head_d, rank=rank, dtype=dtype,
                                                    lookahead=v.lookahead, transpose=v.transpose,
                                                    mlp_topk_block=block)
                step_ops, place_cache = dataclasses.replace(ops, **v.ops_changes), None
                if batch > 1 or mesh is not None:  # batch policy / tensor parallelism (batch-1 path unchanged)
                    from dejavu_jax.sharding import decode_setup

                    sel, step_ops, place_cache = decode_setup(sel, ops, mesh, batch_select=batch_select)
                nbytes = wbytes + (0 if fixed else pbytes)
                row = {"impl": f"dejavu_jax sparse {backend} ({label}, kv {kv_mode})", "kernels": backend,
                       "variant": label, "kv_mode": kv_mode, "mlp_density": mlp_d, "head_density": head_d,
                       "rank": 0 if fixed else rank, "mlp_topk_block": 0 if fixed else block, "main": label == main,
                       "bytes_per_token": nbytes,
                       "floor_ms_per_token": nbytes / (bw * 1e9) * 1e3}
                try:
                    row.update(bench_jax(cfg, params, prompt_len=prompt_len, new_tokens=new_tokens, selector=sel,
                                         ops=step_ops, reps=reps, kv_mode=kv_mode, batch=batch,
                                         place_cache=place_cache, decode_options=v.decode_options))
                except Exception as e:  # report a failing variant and keep measuring the others
                    row["error"] = error_text(e)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def torch_lines(rows: list[dict]) -> dict[str, float]:
    """{impl: ms/token} of the transformers rows that finished (the plot's baseline lines)."""
    return {r["impl"]: r["decode_ms_per_token"] for r in rows
            if r.get("impl", "").startswith("transformers") and "error" not in r and r.get("decode_ms_per_token")}


def plot_sparse(rows: list[dict], dense_ms: float, floor_dense_ms: float, title: str, path: Path,
                baselines: dict[str, float] | None = None) -> None:
    """ms/token of the main sparse rows against MLP density, their bytes-read floor (marked at each
    point, so a single density shows it too), our dense step, its floor and the `baselines`
    ({label: ms/token}, e.g. the transformers rows) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list] = {}
    for r in rows:
        if "error" in r or not r.get("main"):
            continue
        series.setdefault(f"{r['kernels']} kernels, kv {r['kv_mode']}", []).append(
            (r["mlp_density"], r["decode_ms_per_token"], r["floor_ms_per_token"]))
    for label, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"sparse, {label}")
    first = next((r for r in rows if r.get("main")), None)
    floor_pts = sorted({(r["mlp_density"], r["floor_ms_per_token"]) for r in rows if first is not None
                        and r.get("main") and r["kernels"] == first["kernels"]
                        and r["kv_mode"] == first["kv_mode"]})
    if floor_pts:
        ax.plot([p[0] for p in floor_pts], [p[1] for p in floor_pts], "kx:",
                label=f"bytes-read floor (kv {first['kv_mode']}, with predictors)")
    ax.axhline(dense_ms, color="C3", ls="--", label="dejavu_jax dense")
    ax.axhline(floor_dense_ms, color="gray", ls=":", label="dense floor")
    for i, (label, ms) in enumerate((baselines or {}).items()):
        ax.axhline(ms, color=f"C{4 + i}", ls="-.", lw=1.2, label=label)
    ax.set_xlabel("MLP density (fraction of neurons read)")
    ax.set_ylabel("decode ms/token")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Batch sweep
# --------------------------------------------------------------------------------------------
def kv_read_bytes(cfg: ModelConfig, batch: int, max_len: int, itemsize: int, head_density: float = 1.0) -> int:
    """K/V bytes one decode step reads: each row's whole preallocated cache, for the attended KV heads."""
    kv_heads = cfg.num_kv_heads if head_density >= 1 else min(cfg.num_kv_heads,
                                                              max(1, round(head_density * cfg.num_heads)))
    return batch * cfg.num_layers * 2 * kv_heads * cfg.head_dim * max_len * itemsize


def batch_sweep(cfg: ModelConfig, params, *, batches: Sequence[int], densities: list[tuple[float, float]],
                kernels: list[str], rank: int, kv_mode: str, prompt_len: int, new_tokens: int, reps: int, bw: float,
                batch_select: str = "union", mesh=None, place_cache=None, on_batch=None) -> list[dict]:
    """Dense and sparse decode at each batch size: ms per decode step and tokens/s (batch / step time).

    Sparse rows are `sparse_rows` at that batch (random predictors with lookahead, no extras): the
    first density point with every kernel backend, the others with the first. Each row adds
      floor_ms_per_step  (weights read once, serving every row, + every row's K/V) / bandwidth
      union_density_if_independent  (union, sparse, B > 1) 1 - (1 - d)^B: the MLP density an exact union
          of B rows' top-K sets would need if rows chose independently. A reference for what union's
          fixed K gives up, not a measurement (scripts/union_density.py measures it on real text).
    on_batch(rows so far) runs after each batch size (to save partial results).
    """
    from tqdm.auto import tqdm

    from dejavu_jax.batching import expected_random_union

    itemsize = jnp.dtype(params["layers"][0]["up"].dtype).itemsize
    max_len = cache_len(prompt_len, new_tokens)
    rows: list[dict] = []
    for b in tqdm(batches, desc="batch sweep", unit="batch size", dynamic_ncols=True):
        dense = {"impl": "dejavu_jax dense", "bytes_per_token": decode_weight_bytes(cfg, itemsize)}
        try:
            dense.update(bench_jax(cfg, params, prompt_len=prompt_len, new_tokens=new_tokens, batch=b, reps=reps,
                                   place_cache=place_cache))
        except Exception as e:  # e.g. out of memory at the largest batch: keep the sparse rows and smaller batches
            dense["error"] = error_text(e)
        print(json.dumps(dense), flush=True)
        sparse = sparse_rows(cfg, params, densities=densities, kernels=kernels, rank=rank, kv_modes=[kv_mode],
                             prompt_len=prompt_len, new_tokens=new_tokens, reps=reps, bw=bw, extras=False, batch=b,
                             mesh=mesh, batch_select=batch_select) if densities else []
        for r in [dense, *sparse]:
            gathered = "mlp_density" in r and (b == 1 or batch_select == "union")  # per-row masks read every head
            r["batch"] = b
            r["kv_bytes_per_step"] = kv_read_bytes(cfg, b, max_len, itemsize, r["head_density"] if gathered else 1.0)
            r["floor_ms_per_step"] = (r["bytes_per_token"] + r["kv_bytes_per_step"]) / (bw * 1e9) * 1e3
            if "error" not in r:
                r["tokens_per_s"] = b / r["decode_ms_per_token"] * 1e3
            if "mlp_density" in r and b > 1 and batch_select == "union":
                r["union_density_if_independent"] = expected_random_union(r["mlp_density"], b)
        rows += [dense, *sparse]
        if on_batch is not None:
            on_batch(rows)
    return rows


def _sweep_label(r: dict) -> str:
    if "mlp_density" not in r:
        return "dense"
    return f"sparse {r['kernels']}, mlp {r['mlp_density']}, heads {r['head_density']}"


def sweep_markdown(result: dict) -> str:
    """sweep.md: one row per (batch size, implementation); tokens/s ratios against dense at that batch."""
    text = (f"{result['model']}, {result['dtype']}, prompt {result['prompt_len']}, {result['new_tokens']} new tokens, "
            f"sparse batch selection {result['batch_select']}, kv {result['kv_mode']}, {result['device']}, "
            f"jax {result['jax']}; floor bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s"
            f"{'' if result['complete'] else '; INCOMPLETE (stopped before the last batch size)'}\n\n"
            "ms/step is one decode step of the whole batch (each row's ms/token); tokens/s = batch / step time. "
            "The floor reads the weights once per step plus every row's K/V.\n\n")
    lines = ["| batch | implementation | ms/step | tokens/s | floor ms/step | x floor | tokens/s vs dense | "
             "exact-union MLP density if rows were independent |", "|---|---|---|---|---|---|---|---|"]
    dense = {r["batch"]: r for r in result["rows"] if "mlp_density" not in r and "error" not in r}
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {_sweep_label(r)} | failed: {r['error']} | | | | | |")
            continue
        ref = dense.get(r["batch"])
        vs = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref is not None else "-"
        union = f"{r['union_density_if_independent']:.2f}" if "union_density_if_independent" in r else "-"
        lines.append(f"| {r['batch']} | {_sweep_label(r)} | {r['decode_ms_per_token']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['floor_ms_per_step']:.3f} | {r['decode_ms_per_token'] / r['floor_ms_per_step']:.2f} | "
                     f"{vs} | {union} |")
    return text + "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], title: str, path: Path) -> None:
    """ms/step and tokens/s against batch size, one line per implementation (dense floor dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    for r in rows:
        if "error" not in r:
            series.setdefault(_sweep_label(r), []).append((r["batch"], r["decode_ms_per_token"], r["tokens_per_s"]))
    floor = sorted({(r["batch"], r["floor_ms_per_step"]) for r in rows if "mlp_density" not in r})
    fig, (ax_ms, ax_tps) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, pts in series.items():
        pts.sort()
        style = "s--" if label == "dense" else "o-"
        ax_ms.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax_tps.plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
    if floor:
        ax_ms.plot([p[0] for p in floor], [p[1] for p in floor], "k:", label="dense bytes floor")
        ax_tps.plot([p[0] for p in floor], [p[0] / p[1] * 1e3 for p in floor], "k:", label="dense bytes floor")
    for ax, ylabel in ((ax_ms, "ms per decode step"), (ax_tps, "tokens/s (batch / step time)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_tps.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep(result: dict, out: Path) -> None:
    """sweep.json, sweep.md and (with any measured row) sweep.png in out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "sweep.md").write_text(sweep_markdown(result))
    if any("error" not in r for r in result["rows"]):
        plot_sweep(result["rows"], f"{result['model']} {result['dtype']}, prompt {result['prompt_len']}, "
                   f"{result['batch_select']} selection, {result['device']}", out / "sweep.png")


def parse_batches(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    try:
        batches = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"bad --batches {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batches needs batch sizes >= 1, got {text!r}")
    return batches


def run_torch_baselines(preset_name: str, dtype: str, prompt_len: int, new_tokens: int, variants: str,
                        timeout: int = 1200) -> list[dict]:
    cmd = [sys.executable, "-m", "dejavu_jax.bench_torch", "--preset", preset_name, "--dtype", dtype,
           "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--variants", variants]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
        stdout, failure = proc.stdout, proc.returncode != 0 and proc.stderr.strip().splitlines()[-1:]
    except subprocess.TimeoutExpired as e:  # report what finished (e.g. the copy probe) and go on without it
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        failure = [f"timed out after {timeout} s"]
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if failure:  # one error row naming the variants that did not finish
        done = {r["impl"] for r in rows}
        missing = [v for v in variants.split(",") if f"transformers {v}" not in done]
        rows.append({"impl": f"transformers ({','.join(missing)})", "error": failure})
    return rows


def scaling_table(results: Sequence[dict]) -> str:
    """Markdown: ms/token of each implementation at every TP degree of the given bench.json results
    (same model and settings), the speedup over TP=1 and the scaling efficiency t1 / (TP * t_TP)."""
    by_tp = {r.get("tp", 1): {_label(row): row for row in r["rows"] if "error" not in row and "prefill_ms" in row}
             for r in results}  # measured rows only (not the floor)
    if 1 not in by_tp:
        raise ValueError("scaling needs a TP=1 result among the inputs")
    degrees = sorted(by_tp)
    head = "| implementation | " + " | ".join(f"TP={t} ms/token" for t in degrees)
    head += "".join(f" | TP={t} speedup | TP={t} efficiency" for t in degrees[1:]) + " |"
    lines = [head, "|---" * (1 + len(degrees) + 2 * (len(degrees) - 1)) + "|"]
    for label in by_tp[1]:
        if not all(label in by_tp[t] for t in degrees):
            continue
        ms = [by_tp[t][label]["decode_ms_per_token"] for t in degrees]
        cells = [f"{m:.3f}" for m in ms]
        cells += [f"{ms[0] / m:.2f}x | {ms[0] / (t * m):.0%}" for t, m in zip(degrees[1:], ms[1:])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(r: dict) -> str:
    if "mlp_density" in r:
        return f"{r['impl']}, mlp {r['mlp_density']}, heads {r['head_density']}"
    return r["impl"]


def markdown_table(rows: list[dict], floor_ms: float) -> str:
    lines = ["| implementation | prefill ms | decode ms/token | bytes-read floor ms | x floor |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {_label(r)} | failed: {r['error']} | | | |")
            continue
        own_floor = r.get("floor_ms_per_token", floor_ms)
        prefill = f"{r['prefill_ms']:.2f}" if "prefill_ms" in r else "-"
        lines.append(f"| {_label(r)} | {prefill} | {r['decode_ms_per_token']:.3f} | {own_floor:.3f} | "
                     f"{r['decode_ms_per_token'] / own_floor:.2f} |")
    return "\n".join(lines)


def render_markdown(result: dict) -> str:
    """The bench.md text for a bench.json result."""
    rows = result["rows"]
    dense = [r for r in rows if "mlp_density" not in r]
    sparse = [r for r in rows if "mlp_density" in r and "error" not in r]
    text = (f"{result['model']}, {result['dtype']}, batch {result['batch']}, prompt {result['prompt_len']}, "
            f"{result['new_tokens']} new tokens, {result['device']}, jax {result['jax']}; floor bandwidth "
            f"{result['copy_bandwidth_gbs']:.0f} GB/s ({result['bandwidth_source']})\n\n")
    text += markdown_table(rows, result["floor_ms_per_token"]) + "\n"
    if sparse:
        text += "\n" + speedup_table(dense, sparse) + "\n"
    return text


def parse_densities(text: str) -> list[tuple[float, float]]:
    """'0.25:0.5,0.5:0.5' -> [(0.25, 0.5), (0.5, 0.5)] (MLP density : head density)."""
    points = []
    for item in text.split(","):
        try:
            mlp_d, head_d = (float(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"bad density point {item!r}: expected MLP:HEADS, e.g. 0.25:0.5") from None
        if not (0 < mlp_d <= 1 and 0 < head_d <= 1):
            raise ValueError(f"densities must be in (0, 1], got {item!r}")
        points.append((mlp_d, head_d))
    return points


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dejavu_jax.bench", description=__doc__,
                                formatter_class=DocHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="random weights at a preset's shapes (e.g. opt-6.7b)")
    src.add_argument("--model", help="a checkpoint directory")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="weights, activations and KV cache")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (random ids)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed per run")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--batch-select", choices=["union", "per-row"], default="union",
                   help="sparse decode with --batch > 1: one index set for the batch (top-K of the rows' summed "
                        "predictor probabilities) or per-row keep-masks (dense compute)")
    p.add_argument("--batches", default="",
                   help="batch sweep: comma-separated batch sizes (e.g. 1,2,4,8,16,32); times dense and every "
                        "--sparse point at each and writes sweep.json/.md/.png instead of bench.*")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: a mesh over the first N devices")
    p.add_argument("--reps", type=int, default=5, help="timed runs per row of the table (the median is reported)")
    p.add_argument("--baselines", default="eager,static-compile",
                   help="comma list of transformers variants to time (eager, static-compile), 'copy' for only the "
                        "cudaMemcpy bandwidth of the floor, or 'none'. They run first in their own process, which "
                        "exits before JAX allocates, so a model that fills the GPU can be timed by both")
    p.add_argument("--baselines-timeout", type=int, default=1200, metavar="S",
                   help="seconds the transformers process may take; past it, the rows it finished are kept")
    sp = p.add_argument_group("sparse decode (random predictors with lookahead in the loop)")
    sp.add_argument("--sparse", default="", help="density points MLP:HEADS, comma separated, e.g. "
                                                  "0.25:0.5,0.1:0.5,0.5:0.5 (empty: dense only)")
    sp.add_argument("--kernels", default="xla,pallas", help="gathered-matmul backends to time")
    sp.add_argument("--kv-modes", default="exact", help="exact and/or lazy (Deja Vu's recompute window)")
    sp.add_argument("--rank", type=int, default=128, help="predictor rank r (D -> r -> N)")
    sp.add_argument("--mlp-topk-block", type=int, default=0, metavar="B",
                    help="the predictors rank MLP neurons per block of B rows, each keeping its share of K (0: one "
                         "top-K per layer); the extras also time the other setting")
    sp.add_argument("--fused-step", choices=FUSED_STEP_CHOICES, default="auto",
                    help="the batch-1 lazy-KV decode step takes its attention inputs (Q and the window K/V, "
                         "written into the cache) from one kernel instead of two: auto (default: on for the "
                         "Pallas kernels), on, off; the extras also time the other settings")
    sp.add_argument("--fused-norm", choices=FUSED_NORM_CHOICES, default="off",
                    help="that kernel also computes the attention norm and writes the window ring (on), or XLA "
                         "does both first and the kernel only reads the ring (off, default: faster on an H200 "
                         "at every OPT width measured)")
    sp.add_argument("--no-extras", action="store_true",
                    help="skip the extra variants (no lookahead, no predictor, other kernel and layout settings "
                         "at the first density point; on a GPU, dense and sparse under XLA's default graph "
                         "scheduling)")
    sp.add_argument("--dense-pallas", action="store_true",
                    help="also time dense decode through the Pallas gathered kernels with every row selected "
                         "(on the H100 at OPT-6.7B: 5.47 ms/token vs 5.30 for XLA's dense matvecs)")
    p.add_argument("--out", default="results/bench", help="directory for bench.json, bench.md and bench.png")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dejavu_jax.checkpoint import load_checkpoint, load_config, parse_dtype

    dtype = parse_dtype(args.dtype)
    for name in ("prompt_len", "new_tokens", "batch", "reps", "rank", "tp"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        densities = parse_densities(args.sparse) if args.sparse else []
        batches = parse_batches(args.batches) if args.batches else []
        cfg = preset(args.preset) if args.preset else load_config(args.model)
    except ValueError as e:
        parser.error(str(e))
    kernels = [k for k in args.kernels.split(",") if k]
    kv_modes = [k for k in args.kv_modes.split(",") if k]
    for k in kernels:
        if k not in ("xla", "pallas"):
            parser.error(f"unknown kernels {k!r}; choose from xla, pallas")
    for k in kv_modes:
        if k not in ("exact", "lazy"):
            parser.error(f"unknown kv mode {k!r}; choose from exact, lazy")
    if args.prompt_len + args.new_tokens > cfg.max_positions:
        parser.error(f"prompt-len + new-tokens exceeds the model's {cfg.max_positions} positions")
    if batches and len(kv_modes) != 1:
        parser.error("--batches times one KV mode: give a single --kv-modes")
    if args.tp > 1 and densities and kv_modes != ["exact"]:
        parser.error("--tp runs the exact KV mode only (--kv-modes exact)")

    # transformers first, in its own process, while the GPU is still empty (JAX's allocator keeps
    # what it grows into, so torch could not fit a 30B model after us).
    torch_rows: list[dict] = []
    if args.baselines != "none" and args.preset:
        if args.batch != 1 or batches:
            print("transformers baselines run at batch 1 without --batches only; skipped", file=sys.stderr)
        else:
            for r in run_torch_baselines(args.preset, args.dtype, args.prompt_len, args.new_tokens, args.baselines,
                                         timeout=args.baselines_timeout):
                print(json.dumps(r), flush=True)
                torch_rows.append(r)

    # Before anything large is allocated: will the weights, caches and predictors fit?
    memory = device_memory()
    est = peak_bytes_estimate(cfg, dtype, batch=max(batches or [args.batch]), prompt_len=args.prompt_len,
                              new_tokens=args.new_tokens, rank=args.rank if densities else 0,
                              kv_modes=kv_modes if densities else ["exact"], tp=args.tp)
    print(describe_estimate(est, memory), flush=True)
    try:
        check_fits(est["total"], "weights + KV caches + predictors", memory)
    except DeviceMemoryError as e:
        parser.exit(2, f"error: {e}\n")
    device = jax.devices()[0].device_kind
    bw = copy_bandwidth_gbs()  # before the weights: its 2 GiB of buffers are freed again
    bw_source = "XLA elementwise copy"
    for r in torch_rows:
        if r.get("copy_bandwidth_gbs", 0) > bw:  # cudaMemcpy beats an XLA copy: the stricter floor
            bw, bw_source = r["copy_bandwidth_gbs"], "cudaMemcpy (torch)"

    mesh, place_cache = None, None
    try:
        if args.tp > 1:
            from dejavu_jax import sharding as S

            mesh = S.make_mesh(args.tp)
            place_cache = lambda c: S.shard_cache(c, mesh)  # noqa: E731
            if args.preset:  # created in place: no device ever holds the whole model
                params = S.init_params_sharded(cfg, jax.random.PRNGKey(0), mesh, dtype)
            else:
                cfg, params = load_checkpoint(args.model, dtype, sharding=S.param_shardings(cfg, mesh))
        elif args.preset:
            params = M.init_params(cfg, jax.random.PRNGKey(0), dtype)
        else:
            cfg, params = load_checkpoint(args.model, dtype)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    weight_bytes = decode_weight_bytes(cfg, jnp.dtype(dtype).itemsize)
    bw *= args.tp  # TP: every device reads its 1/TP of the weights at once (floor = bytes / aggregate bandwidth)
    floor_ms = weight_bytes / (bw * 1e9) * 1e3
    print(f"{cfg.name or args.model} on {device}: {weight_bytes / 1e9:.2f} GB of weights per token, "
          f"copy bandwidth {bw:.0f} GB/s ({bw_source}) -> floor {floor_ms:.3f} ms/token", flush=True)
    out = Path(args.out)
    info = {"model": cfg.name or args.model, "device": device, "dtype": args.dtype, "tp": args.tp,
            "batch_select": args.batch_select, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "copy_bandwidth_gbs": bw, "bandwidth_source": bw_source, "weight_bytes_per_token": weight_bytes,
            "peak_bytes_estimate": est, "jax": jax.__version__}
    if batches:
        sweep_result = lambda rows, complete: {**info, "kv_mode": kv_modes[0], "batches": batches,  # noqa: E731
                                               "complete": complete, "rows": rows}
        try:
            rows = batch_sweep(cfg, params, batches=batches, densities=densities, kernels=kernels, rank=args.rank,
                               kv_mode=kv_modes[0], prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                               reps=args.reps, bw=bw, batch_select=args.batch_select, mesh=mesh,
                               place_cache=place_cache,
                               on_batch=lambda rows: write_sweep(sweep_result(rows, False), out))
        except DeviceMemoryError as e:
            parser.exit(2, f"error: {e}\n")
        write_sweep(sweep_result(rows, True), out)
        print((out / "sweep.md").read_text())
        return 0

    rows = [{"impl": "bandwidth floor (dense weights / copy bandwidth)", "decode_ms_per_token": floor_ms}]
    try:
        rows.append({"impl": "dejavu_jax dense", "floor_ms_per_token": floor_ms,
                     **bench_jax(cfg, params, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                 batch=args.batch, reps=args.reps, place_cache=place_cache)})
    except DeviceMemoryError as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(rows[-1]), flush=True)
    if not args.no_extras and decode_compiler_options():  # a GPU: what the decode loop's XLA options are worth
        for what, options in DECODE_OPTION_EXTRAS.items():
            row = {"impl": f"dejavu_jax dense, {what}", "floor_ms_per_token": floor_ms}
            try:
                row.update(bench_jax(cfg, params, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                     batch=args.batch, reps=args.reps, place_cache=place_cache,
                                     decode_options=options))
            except Exception as e:  # a failing variant is reported, the others still run
                row["error"] = error_text(e)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.dense_pallas and mesh is None and args.batch == 1:
        from pallas_kernels import get_ops

        row = {"impl": "dejavu_jax dense, pallas kernels (every row selected)", "floor_ms_per_token": floor_ms}
        try:
            row.update(bench_jax(cfg, params, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                 selector=all_rows_selector(cfg), ops=get_ops("pallas"), reps=args.reps))
        except Exception as e:  # a failing variant is reported, the others still run
            row["error"] = error_text(e)
        print(json.dumps(row), flush=True)
        rows.append(row)
    rows += [r for r in torch_rows if "copy_bandwidth_gbs" not in r]
    sparse = []
    if densities:
        sparse = sparse_rows(cfg, params, densities=densities, kernels=kernels, rank=args.rank, kv_modes=kv_modes,
                             prompt_len=args.prompt_len, new_tokens=args.new_tokens, reps=args.reps, bw=bw,
                             extras=not args.no_extras, batch=args.batch, mesh=mesh, batch_select=args.batch_select,
                             mlp_topk_block=args.mlp_topk_block,
                             fused_step=FUSED_STEP_CHOICES[args.fused_step],
                             fused_norm=FUSED_NORM_CHOICES[args.fused_norm])
    result = {**info, "batch": args.batch, "floor_ms_per_token": floor_ms, "rows": rows + sparse}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    header = (f"{result['model']}, {args.dtype}, batch {args.batch}, prompt {args.prompt_len}, "
              f"{args.new_tokens} new tokens, {device}{f' x{args.tp} (TP)' if args.tp > 1 else ''}, "
              f"jax {jax.__version__}; floor bandwidth {bw:.0f} GB/s "
              f"({bw_source})\n\n")
    text = header + markdown_table(rows + sparse, floor_ms) + "\n"
    ok_sparse = [r for r in sparse if "error" not in r]
    if ok_sparse:
        text += "\n" + speedup_table(rows, ok_sparse) + "\n"
        plot_sparse(ok_sparse, rows[1]["decode_ms_per_token"], floor_ms,
                    f"{result['model']} {args.dtype} batch {args.batch}, {device}", out / "bench.png",
                    baselines=torch_lines(rows))
    (out / "bench.md").write_text(text)
    print(text)
    return 0


def speedup_table(rows: list[dict], sparse: list[dict]) -> str:
    """For each sparse point: speedup over our dense path and each transformers baseline."""
    refs = [r for r in rows[1:] if "error" not in r]
    head = "| sparse variant | ms/token | " + " | ".join(f"vs {r['impl']}" for r in refs) + " |"
    lines = [head, "|" + "---|" * (2 + len(refs))]
    for s in sparse:
        ratios = " | ".join(f"{r['decode_ms_per_token'] / s['decode_ms_per_token']:.2f}x" for r in refs)
        lines.append(f"| {_label(s)} | {s['decode_ms_per_token']:.3f} | {ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

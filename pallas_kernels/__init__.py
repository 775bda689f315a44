"""Gathered matmuls and top-K selection for sparse decode: Pallas (Triton) kernels, XLA references.

`get_ops("xla")` returns the references (jnp.take + dot, lax.top_k), `get_ops("pallas")` the
kernels; both expose the same ten functions with the same signatures, so the model code picks a
backend once.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from pallas_kernels._common import on_cpu
from pallas_kernels.gather_attention import (
    gathered_head_proj,
    gathered_head_proj_reference,
    gathered_out_proj,
    gathered_out_proj_reference,
    gathered_window_kv,
    gathered_window_kv_reference,
    gathered_window_kv_update,
    gathered_window_kv_update_reference,
    gathered_window_qkv_update,
    gathered_window_qkv_update_reference,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)
from pallas_kernels.select_topk import (
    code_topk_pair,
    code_topk_pair_reference,
    code_topk_rows,
    code_topk_rows_reference,
    topk_rows,
    topk_rows_reference,
)
from pallas_kernels.gather_mlp import (
    gathered_down,
    gathered_down_reference,
    gathered_up,
    gathered_up_reference,
)

BACKENDS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Ops:
    """The gathered ops of one backend (gather_mlp.py, gather_attention.py; gathered_window_kv_update
    is the lazy KV mode's window recompute, written into the cache, and gathered_window_qkv_update
    the same with the attention norm, the window ring write and the Q projection in one op) and its
    top-K selections (select_topk.py: from scores, and from a predictor's code, scores included, for
    one site or both).

    fused_step: the batch-1 lazy-KV decode step takes its attention inputs from one launch
    (gathered_window_qkv_update: the attention norm, the ring write, Q and the window K/V) instead of
    five. None (the Pallas default): where the model width is at most FUSED_STEP_MAX_D_MODEL
    (`fused_step_enabled`). On the H200 the fused kernel beat the launches it replaces at D 2560
    and 4096 (16.6 against 18.2 us at OPT-2.7B shapes; end to end 1.538 against 1.572 ms/token at
    OPT-2.7B, 2.223 against 2.314 at 6.7B) and lost at 5120 and 7168 (48.6 against 34.7 us at
    OPT-13B, 65.8 against 52.4 at 30B, no tile of the sweep closing it; end to end 4.298 against
    3.638 and 7.494 against 6.679) (pallas_kernels/NOTES.md, sessions 7-9). `python -m
    dejavu_jax.bench` times both settings.
    fused_norm: the fused step's launch also computes the attention norm and writes the ring (one
    launch in all); False: XLA normalises and writes ring row cur first (two small fusions) and the
    launch only reads the ring (`gathered_window_qkv_update` with h None), which keeps the norm's
    extra loads out of its loop over D. None (default): inside where the model width is at most
    FUSED_STEP_MAX_D_MODEL (`fused_norm_enabled`).
    mlp_norm_in_up: the batch-1 step normalises the MLP input inside gathered_up (its `norm`) instead
    of in XLA before it. Off: on the H200 (session 8) the up kernel with the norm took 14.5-16.1 us
    at OPT-6.7B density 0.25, against 13.4 for XLA's two norm kernels and the plain up kernel.
    topk_pair: a layer's heads and MLP blocks are ranked in one launch (code_topk_pair) where both
    fit its programs. On by default: in the H200 profile of session 7 the pair took 4.7 us per layer
    against 2.0 + 4.6 for the two launches it replaces (bench extras time it off).
    """

    backend: str
    gathered_up: Callable
    gathered_down: Callable
    gathered_head_proj: Callable
    gathered_out_proj: Callable
    sparse_decode_attention: Callable
    topk_rows: Callable
    code_topk_rows: Callable
    code_topk_pair: Callable
    gathered_window_kv_update: Callable
    gathered_window_qkv_update: Callable
    fused_step: bool | None = False
    topk_pair: bool = True
    mlp_norm_in_up: bool = False
    fused_norm: bool | None = None


# The widest model whose batch-1 lazy-KV step fuses its attention inputs by default (Ops.fused_step).
FUSED_STEP_MAX_D_MODEL = 4096


def fused_step_enabled(ops, d_model: int) -> bool:
    """Whether `ops` (an Ops, or any object with a fused_step attribute) fuse the attention inputs of
    a model `d_model` wide: their fused_step, or for None whether d_model <= FUSED_STEP_MAX_D_MODEL."""
    fused = getattr(ops, "fused_step", False)
    return d_model <= FUSED_STEP_MAX_D_MODEL if fused is None else bool(fused)


def fused_norm_enabled(ops, d_model: int) -> bool:
    """Whether the fused step of `ops` also normalises inside its launch (Ops.fused_norm; None: by width,
    as fused_step_enabled's rule); ops without the field do."""
    fused = getattr(ops, "fused_norm", True)
    return d_model <= FUSED_STEP_MAX_D_MODEL if fused is None else bool(fused)


def get_ops(backend: str, *, fused_step: bool | None = None, topk_pair: bool = True,
            mlp_norm_in_up: bool = False, fused_norm: bool | None = None) -> Ops:
    """Ops for backend "xla" (references) or "pallas" (kernels; interpreted when JAX runs on CPU).

    fused_step None: the Pallas kernels fuse by model width (`fused_step_enabled`); the XLA
    references do not fuse (their fused op exists as the kernel's oracle)."""
    if backend == "xla":
        fused_step = bool(fused_step)
        return Ops(backend, gathered_up_reference, gathered_down_reference,
                   gathered_head_proj_reference, gathered_out_proj_reference,
                   sparse_decode_attention_reference, topk_rows_reference, code_topk_rows_reference,
                   code_topk_pair_reference, gathered_window_kv_update_reference,
                   gathered_window_qkv_update_reference, fused_step, topk_pair, mlp_norm_in_up, fused_norm)
    if backend == "pallas":
        fns = (gathered_up, gathered_down, gathered_head_proj, gathered_out_proj,
               sparse_decode_attention, topk_rows, code_topk_rows, code_topk_pair, gathered_window_kv_update,
               gathered_window_qkv_update)
        if on_cpu():
            fns = tuple(functools.partial(f, interpret=True) for f in fns)
        return Ops(backend, *fns, fused_step, topk_pair, mlp_norm_in_up, fused_norm)
    raise ValueError(f"unknown backend {backend!r}; valid backends are {BACKENDS}")


__all__ = [
    "BACKENDS", "FUSED_STEP_MAX_D_MODEL", "Ops", "fused_norm_enabled", "fused_step_enabled", "get_ops",
    "gathered_up", "gathered_up_reference", "gathered_down", "gathered_down_reference",
    "gathered_head_proj", "gathered_head_proj_reference", "gathered_out_proj",
    "gathered_out_proj_reference", "gathered_window_kv", "gathered_window_kv_reference",
    "gathered_window_kv_update", "gathered_window_kv_update_reference",
    "gathered_window_qkv_update", "gathered_window_qkv_update_reference",
    "sparse_decode_attention", "sparse_decode_attention_reference",
    "topk_rows", "topk_rows_reference", "code_topk_rows", "code_topk_rows_reference",
    "code_topk_pair", "code_topk_pair_reference",
]

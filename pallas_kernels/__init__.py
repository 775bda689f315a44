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
    the same with the Q projection in one op, optionally the attention norm and ring write too) and its
    top-K selections (select_topk.py: from scores, and from a predictor's code, scores included, for
    one site or both).

    fused_step: the batch-1 lazy-KV decode step takes its attention inputs (Q of the selected heads
    and the window K/V of their groups, written into the cache) from one launch of
    gathered_window_qkv_update instead of two (gathered_head_proj, gathered_window_kv_update).
    On by default for the Pallas kernels (`get_ops`).
    fused_norm: that launch also computes the attention norm and writes the window ring. Off by
    default: XLA normalises and writes ring row cur first (two small fusions) and the launch only
    reads the ring (gathered_window_qkv_update with h None), which keeps the norm's loads out of its
    loop over D. On the H200 (session 10, pallas_kernels/NOTES.md) the attention inputs of one layer
    took, five launches / norm inside / norm in XLA: 18.4 / 16.6 / 14.7 us at OPT-2.7B shapes,
    27.8 / 25.1 / 21.3 at 6.7B, 34.6 / 48.5 / 29.4 at 13B, 52.1 / 65.1 / 46.9 at 30B; end to end
    at 6.7B 2.316 / 2.267 / 2.146 ms/token, at 13B 3.663 against 3.566 (unfused / norm in XLA), at
    30B 6.619 against 6.477. `python -m dejavu_jax.bench` times all three.
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
    fused_step: bool = False
    topk_pair: bool = True
    mlp_norm_in_up: bool = False
    fused_norm: bool = False


def fused_step_enabled(ops) -> bool:
    """Whether `ops` (an Ops, or any object with a fused_step attribute) fuse the attention inputs."""
    return bool(getattr(ops, "fused_step", False))


def fused_norm_enabled(ops) -> bool:
    """Whether the fused step of `ops` also normalises inside its launch (ops without the field do)."""
    return bool(getattr(ops, "fused_norm", True))


def get_ops(backend: str, *, fused_step: bool | None = None, topk_pair: bool = True,
            mlp_norm_in_up: bool = False, fused_norm: bool = False) -> Ops:
    """Ops for backend "xla" (references) or "pallas" (kernels; interpreted when JAX runs on CPU).

    fused_step None: the backend's default, on for the Pallas kernels, off for the XLA references
    (their fused op exists as the kernel's oracle)."""
    if backend == "xla":
        fused_step = bool(fused_step)
        return Ops(backend, gathered_up_reference, gathered_down_reference,
                   gathered_head_proj_reference, gathered_out_proj_reference,
                   sparse_decode_attention_reference, topk_rows_reference, code_topk_rows_reference,
                   code_topk_pair_reference, gathered_window_kv_update_reference,
                   gathered_window_qkv_update_reference, fused_step, topk_pair, mlp_norm_in_up, fused_norm)
    if backend == "pallas":
        def kernel(f):  # interpreted where JAX runs on CPU
            return functools.partial(f, interpret=True) if on_cpu() else f

        fns = (gathered_up, gathered_down, gathered_head_proj, gathered_out_proj,
               sparse_decode_attention, topk_rows, code_topk_rows, code_topk_pair, gathered_window_kv_update,
               gathered_window_qkv_update)
        fused_step = True if fused_step is None else bool(fused_step)
        return Ops(backend, *map(kernel, fns), fused_step, topk_pair, mlp_norm_in_up, fused_norm)
    raise ValueError(f"unknown backend {backend!r}; valid backends are {BACKENDS}")


__all__ = [
    "BACKENDS", "Ops", "fused_norm_enabled", "fused_step_enabled", "get_ops",
    "gathered_up", "gathered_up_reference", "gathered_down", "gathered_down_reference",
    "gathered_head_proj", "gathered_head_proj_reference", "gathered_out_proj",
    "gathered_out_proj_reference", "gathered_window_kv", "gathered_window_kv_reference",
    "gathered_window_kv_update", "gathered_window_kv_update_reference",
    "gathered_window_qkv_update", "gathered_window_qkv_update_reference",
    "sparse_decode_attention", "sparse_decode_attention_reference",
    "topk_rows", "topk_rows_reference", "code_topk_rows", "code_topk_rows_reference",
    "code_topk_pair", "code_topk_pair_reference",
]

"""An L2 prefetch instruction inside Pallas (Triton) kernels: `l2_prefetch(ref.at[...])`.

Pallas exposes loads, not prefetches. A load-based prefetch kernel holds registers and SM slots
for as long as the reads take (pallas_kernels/NOTES.md, session 12), which is what the decode
step's other kernels need at the same time. PTX's `prefetch.global.L2::evict_last` (one 128-byte
line per lane) and sm_90's `cp.async.bulk.prefetch.L2.global` (a whole contiguous range per lane)
return nothing and hold nothing: the L2 fetches the lines while the program moves on. This module
adds a primitive that lowers to one of them, using the Triton lowering's pointer arithmetic (JAX
internals: checked on jax 0.10 and 0.11).

In interpret mode (CPU) the primitive reads nothing and returns zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src import state
from jax._src import tree_util
from jax._src.pallas import core as pallas_core
from jax._src.state import discharge as state_discharge
from jax._src.state import primitives as sp

l2_prefetch_p = jax_core.Primitive("l2_prefetch")


@l2_prefetch_p.def_effectful_abstract_eval
def _abstract_eval(*avals_flat, args_tree, bulk_bytes):
    del bulk_bytes
    ref_aval, transforms = args_tree.unflatten(avals_flat)
    shape = pallas_core.TransformedRef(ref_aval, transforms).shape
    return jax_core.ShapedArray(shape, jnp.int32), {state.ReadEffect(0)}


@state_discharge.register_discharge_rule(l2_prefetch_p)
def _discharge(in_avals, out_avals, *args_flat, args_tree, bulk_bytes):
    del args_flat, args_tree, bulk_bytes
    return (None,) * len(in_avals), jnp.zeros(out_avals[0].shape, jnp.int32)


def l2_prefetch(ref_at, *, bulk_bytes: int = 0) -> jax.Array:
    """Asks L2 for the addresses of `ref_at` (a ref indexed like a load's, e.g. w.at[rows, cols]).

    bulk_bytes 0: each element's 128-byte line (index one element per line); > 0: each element
    starts a contiguous range of that many bytes (a multiple of 16, 16-byte aligned; sm_90+).
    Returns int32 zeros of the indexed shape; the kernel must use them (e.g. store their max), which
    keeps the instruction alive and lets a consumer order itself after the prefetches.
    """
    if bulk_bytes % 16:
        raise ValueError(f"bulk_bytes must be a multiple of 16, got {bulk_bytes}")
    ref, transforms = sp.get_ref_and_transforms(ref_at, None, "l2_prefetch")
    args_flat, args_tree = tree_util.tree_flatten((ref, transforms))
    return l2_prefetch_p.bind(*args_flat, args_tree=args_tree, bulk_bytes=bulk_bytes)


def _register_triton_lowering() -> None:
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering as tl

    @tl.register_lowering(l2_prefetch_p)
    def _lowering(ctx, *args_flat, args_tree, bulk_bytes):
        ptr, transforms = args_tree.unflatten(args_flat)
        (idx,) = transforms
        block_info = ctx.block_infos[0]
        shape = idx.get_indexer_shape_static()
        ptrs = tl._add(tl._bcast_to(ptr, shape), tl._compute_offsets_from_indices(block_info, idx))
        if bulk_bytes:
            asm = f"cp.async.bulk.prefetch.L2.global [$1], {bulk_bytes}; mov.u32 $0, 0;"
        else:
            asm = "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;"
        out_type = ir.RankedTensorType.get(shape, ir.IntegerType.get_signless(32))
        zeros = tt_dialect.elementwise_inline_asm([out_type], asm, constraints="=r,l", pure=False,
                                                  packed_element=1, args=[ptrs])
        return zeros[0] if isinstance(zeros, (list, tuple)) else zeros


_register_triton_lowering()

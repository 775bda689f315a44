"""Probe: decode attention and the out projection of the selected heads in one kernel. GPU timing.

The sparse step runs three launches between the attention inputs and the out projection's partial
sums: `sparse_decode_attention` (programs per head and sequence split), XLA's merge of the splits,
and `gathered_out_proj` (split-K over the selected heads' rows of W_out). A head's output only
feeds its own Dh rows of W_out, so the chain needs no grid-wide sync: one program can attend one
head over the whole cache and multiply the result straight into its tile of W_out. The price is
that every program of a head re-reads that head's K (and its slice of V) from L2.

The fused kernel (`fused_attention_out` below; it was `gather_attention.attention_out_proj` in
7d1c3e8 until this probe measured it, see pallas_kernels/NOTES.md, session 24): program (b, i, r, j)
takes selected head idx[i], rows r * R .. r * R + R - 1 of the head's Dh and columns
j * C .. j * C + C - 1 of D. It requests its [R, C] tile of W_out first (the weights never depend on
the attention), attends over all S slots with the attention kernel's online-softmax loop
(`gather_attention._attend`: scores need all Dh columns of K, the output only its R columns of V),
and writes o[rows] @ W_out[rows, cols] as fp32 partial sums that XLA adds up (as it already adds up
the out projection's split-K sums). This probe times it at each tile of CONFIGS.

Cases, per application (GPU span, profiler events; 4 weight/cache copies in rotation):
* "attention + merge + out proj": the production ops as the sparse step calls them;
* "fused R x C, warps": the kernel above;
* "attention only", "out proj only": the parts of the production chain.

python scripts/attn_out_probe.py --out DIR     (GPU: DIR/attn_out.{json,md})
python scripts/attn_out_probe.py --check       (CPU, interpret mode, against the XLA references)
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from pallas_kernels import gather_attention as ga  # noqa: E402
from pallas_kernels._common import cdiv, check_pow2, pow2_ceil  # noqa: E402

H, DH, D = 32, 128, 4096  # OPT-6.7B
COPIES = 4
# (rows R, columns C, warps, block_s)
CONFIGS = (
    (128, 256, 8, 64), (128, 512, 8, 64), (64, 512, 8, 64), (32, 512, 4, 64), (32, 1024, 8, 64),
    (16, 1024, 4, 64), (16, 2048, 8, 64), (32, 512, 4, 128),
)


def _fused_kernel(q_ref, idx_ref, k_ref, v_ref, valid_ref, w_ref, out_ref, *, scale, group, seq_len,
                  head_dim, d_model, block_dh, rows, cols, block_s, steps):
    # q_ref [B, Kh, Dh]; idx_ref [Kh]; k_ref, v_ref [B, KV, S, Dh]; valid_ref [B, S] int8;
    # w_ref [H * Dh, D]; out_ref [B, Kh * NR, D] fp32, NR = cdiv(Dh, rows): one partial sum per program
    b, i, r, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    head = idx_ref[i]
    dr = r * rows + jnp.arange(rows, dtype=jnp.int32)  # the program's rows of the head
    dr_ok = dr < head_dim
    c = j * cols + jnp.arange(cols, dtype=jnp.int32)
    c_ok = c < d_model
    # The weight tile is requested before the attention: it does not depend on it.
    w = plgpu.load(w_ref.at[head * head_dim + dr[:, None], c[None, :]], mask=dr_ok[:, None] & c_ok[None, :],
                   other=0.0)  # [R, C]
    d = jnp.arange(block_dh, dtype=jnp.int32)
    d_ok = d < head_dim
    q = plgpu.load(q_ref.at[b, i, d], mask=d_ok, other=0.0).astype(jnp.float32) * scale  # [Dhp]
    o, _, l = ga._attend(q, k_ref, v_ref, valid_ref, b, head // group, d, d_ok, dr, dr_ok, first=0, steps=steps,
                         block_s=block_s, seq_len=seq_len)
    part = jnp.sum(ga._normalised(o, l)[:, None] * w.astype(jnp.float32), axis=0)  # [C]
    plgpu.store(out_ref.at[b, i * cdiv(head_dim, rows) + r, c], part, mask=c_ok)


@functools.partial(jax.jit, static_argnames=("scale", "rows", "cols", "num_warps", "block_s", "interpret"))
def fused_attention_out(q, k, v, valid, idx, w_out, *, scale, rows, cols, num_warps=4, block_s=64,
                        interpret=False):
    """q [B, Kh, Dh]; k, v [B, KV, S, Dh]; valid [B, S]; idx [Kh]; w_out [H, Dh, D] -> [B, D] in q.dtype."""
    batch, n_sel, head_dim = q.shape
    n_heads, _, d_model = w_out.shape
    seq_len = k.shape[2]
    check_pow2(rows=rows, cols=cols, block_s=block_s)
    n_rows = cdiv(head_dim, rows)
    kernel = functools.partial(
        _fused_kernel, scale=scale, group=n_heads // k.shape[1], seq_len=seq_len, head_dim=head_dim,
        d_model=d_model, block_dh=pow2_ceil(head_dim), rows=rows, cols=cols, block_s=block_s,
        steps=cdiv(seq_len, block_s))
    parts = pl.pallas_call(
        kernel,
        grid=(batch, n_sel, n_rows, cdiv(d_model, cols)),
        out_shape=jax.ShapeDtypeStruct((batch, n_sel * n_rows, d_model), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="attention_out_proj",
    )(q, idx.astype(jnp.int32), k, v, valid.astype(jnp.int8), w_out.reshape(n_heads * head_dim, d_model))
    return parts.sum(axis=1).astype(q.dtype)


def production(q, k, v, valid, idx, w_out, *, scale):
    o = ga.sparse_decode_attention(q, k, v, valid, idx, scale=scale, num_heads=w_out.shape[0])
    return ga.gathered_out_proj(o, w_out, idx)


def reference(q, k, v, valid, idx, w_out, *, scale):
    o = ga.sparse_decode_attention_reference(q, k, v, valid, idx, scale=scale, num_heads=w_out.shape[0])
    return ga.gathered_out_proj_reference(o, w_out, idx)


def make_inputs(key, *, n_sel, seq_len, filled, n_heads=H, head_dim=DH, d_model=D):
    """One layer's operands: the first `filled` slots hold tokens (the rest are the cache's empty tail)."""
    kq, kk, kv, kw, ki = jax.random.split(key, 5)
    q = jax.random.normal(kq, (1, n_sel, head_dim), jnp.float16)
    k = jax.random.normal(kk, (1, n_heads, seq_len, head_dim), jnp.float16)
    v = jax.random.normal(kv, (1, n_heads, seq_len, head_dim), jnp.float16)
    w = (jax.random.normal(kw, (n_heads, head_dim, d_model), jnp.float32) / math.sqrt(head_dim * n_sel)
         ).astype(jnp.float16)
    idx = jnp.sort(jax.random.choice(ki, n_heads, (n_sel,), replace=False)).astype(jnp.int32)
    valid = (jnp.arange(seq_len) < filled)[None]
    return q, (k, v, valid, idx, w)


def check() -> None:
    """Interpret mode at small shapes (GQA, a part-empty cache, every row/column tiling)."""
    scale = 1 / math.sqrt(32)
    q, (k, v, valid, idx, w) = make_inputs(jax.random.key(1), n_sel=3, seq_len=40, filled=29, n_heads=4,
                                           head_dim=32, d_model=64)
    k, v = k[:, :2], v[:, :2]  # 2 KV heads for 4 query heads
    ref = reference(q, k, v, valid, idx, w, scale=scale).astype(jnp.float32)
    for rows, cols, block_s in ((32, 64, 16), (16, 32, 32), (8, 16, 64)):
        got = fused_attention_out(q, k, v, valid, idx, w, scale=scale, rows=rows, cols=cols, block_s=block_s,
                                  interpret=True).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - ref)))
        print(json.dumps(dict(rows=rows, cols=cols, block_s=block_s, max_err=err,
                              scale=float(jnp.max(jnp.abs(ref))))))
        assert err < 1e-2 * float(jnp.max(jnp.abs(ref))), err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--check", action="store_true", help="CPU interpret-mode correctness check only")
    p.add_argument("--heads", type=int, default=16, help="selected heads (OPT-6.7B at head density 0.5)")
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024],
                   help="cache lengths (the bench's prompt 128 + 128 new tokens fills 256)")
    args = p.parse_args()
    if args.check:
        check()
        return
    if args.out is None:
        p.error("--out is required for the GPU run")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from l2_probe import timed_case
    from pallas_kernels.microbench import copy_bandwidth_gbs, write_rows

    args.out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth_gbs()
    scale = 1 / math.sqrt(DH)
    rows_out = []
    for seq in args.seq:
        keys = jax.random.split(jax.random.key(seq), COPIES)
        inputs = [make_inputs(kk, n_sel=args.heads, seq_len=seq, filled=seq - 3) for kk in keys]
        xs = [q for q, _ in inputs]
        layers = [layer for _, layer in inputs]
        ref = reference(xs[0], *layers[0], scale=scale)
        nbytes = args.heads * DH * D * 2 + 2 * args.heads * seq * DH * 2  # W_out rows + the heads' K/V
        label = f"Kh {args.heads} of {H}, S {seq}"

        def case(name, fn, floor=nbytes, whole=True):  # whole: the full product, checked against ref
            want = ref if whole else jax.jit(fn)(xs[0], layers[0])  # a part: max_err is 0 by construction
            rows_out.append(timed_case(label, name, lambda: fn, xs, layers, want, floor / bw / 1e3))

        case("attention + merge + out proj (production)",
             lambda x, layer: production(x, *layer, scale=scale))
        case("attention only (production)",
             lambda x, layer: ga.sparse_decode_attention(x, *layer[:4], scale=scale).reshape(1, -1),
             2 * args.heads * seq * DH * 2, whole=False)
        case("out proj only (production)",
             lambda x, layer: ga.gathered_out_proj(x, layer[4], layer[3]), args.heads * DH * D * 2, whole=False)
        for rows, cols, warps, block_s in CONFIGS:
            case(f"fused R={rows} C={cols} warps={warps} block_s={block_s}",
                 lambda x, layer, cfg=(rows, cols, warps, block_s): fused_attention_out(
                     x, *layer, scale=scale, rows=cfg[0], cols=cfg[1], num_warps=cfg[2], block_s=cfg[3]))
    device = jax.devices()[0].device_kind
    write_rows(args.out, "attn_out", f"Decode attention + out projection of the selected heads, {device}, "
               f"copy {bw:.0f} GB/s, per application", ["flags", "case", "time_us", "kernel_us", "floor_us",
                                                          "max_err", "error", "kernels"], rows_out,
               device=device, jax=jax.__version__)


if __name__ == "__main__":
    main()

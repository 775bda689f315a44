"""pallas_kernels: every kernel against its XLA reference.

On CPU the kernels run in Pallas interpret mode (small shapes, odd sizes that exercise the power-of-
two padding and masks); the Triton lowering itself is checked on CPU too by lowering for CUDA. Tests
marked gpu compile the kernels on a GPU at model-sized shapes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels._common import apply_norm
from pallas_kernels import gather_attention as ga
from pallas_kernels import gather_mlp as gm
from pallas_kernels import select_topk as st

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
gpu = pytest.mark.gpu
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU backend")

# Relative L2 error bounds: fp32 sums differ from XLA's only by summation order; bf16 outputs
# differ by at most a rounding step of the output (2^-8 relative).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


@pytest.fixture(autouse=True)
def _exact_fp32_references():
    """XLA on GPU runs fp32 dots as TF32 by default (~1e-3 error); the references must not."""
    with jax.default_matmul_precision("highest"):
        yield


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), "kernel output has non-finite values"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


# Inputs come from numpy generators: eager jax.random ops would each compile an XLA program, which
# costs more CPU time than the interpreted kernels themselves.
def keys(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, i]) for i in range(n)]


def normal(rng, shape, dtype, scale=1.0):
    return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32), dtype=dtype)


def f64(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def with_dtypes(cases, bf16_rows):
    """Every case in fp32, and the cases at bf16_rows again in bf16 (keeps the CPU run short)."""
    return ([(*c, jnp.float32) for c in cases]
            + [(*cases[i], jnp.bfloat16) for i in bf16_rows])


def pick(rng, n, k):
    """k distinct indices of range(n) in random order."""
    return jnp.asarray(rng.permutation(n)[:k].astype(np.int32))


# --------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------

UP_CASES = [
    # B, D, F, U, K, activation, bias
    (1, 64, 32, 1, 1, "relu", True),  # K = 1
    (1, 300, 96, 1, 37, "relu", True),  # odd D and K
    (3, 576, 64, 2, 21, "swiglu", False),  # Llama-style stacked gate/up, batch 3
    (2, 160, 48, 2, 48, "none", True),  # K = F, part 0 of a U=2 weight
    (1, 128, 40, 2, 40, "relu", True),  # K = F, relu reads only part 0
]


@pytest.mark.parametrize("B,D,F,U,K,activation,bias,dtype", with_dtypes(UP_CASES, (1, 2)))
def test_gathered_up_matches_reference(B, D, F, U, K, activation, bias, dtype):
    ks = keys(B * 1000 + D + K, 4)
    x = normal(ks[0], (B, D), dtype)
    w = normal(ks[1], (F, U, D), dtype, D ** -0.5)
    b = normal(ks[2], (F, U), dtype) if bias else None
    idx = pick(ks[3], F, K)
    out = gm.gathered_up(x, w, idx, b, activation=activation, interpret=INTERPRET)
    ref = gm.gathered_up_reference(x, w, idx, b, activation=activation)
    assert out.dtype == x.dtype and out.shape == (B, K)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("B,D,F,U,K,activation,kind,blocks,dtype", [
    (1, 300, 96, 1, 37, "relu", "layernorm", {}, jnp.float32),  # odd D: a masked column block
    (3, 576, 64, 2, 21, "swiglu", "rmsnorm", {}, jnp.float32),  # Llama-style, batch 3
    (1, 160, 48, 1, 20, "relu", "layernorm", dict(block_d=64), jnp.bfloat16),  # three steps over D
])
def test_gathered_up_normalises_its_input(B, D, F, U, K, activation, kind, blocks, dtype):
    """norm=(kind, eps, scale, bias): x is the residual; the kernel applies the MLP's norm first, as
    apply_norm does (a residual with a large mean, where LayerNorm's centring matters)."""
    ks = keys(B * 10 + D, 6)
    x = normal(ks[0], (B, D), dtype, 4.0) + 3.0
    w, idx = normal(ks[1], (F, U, D), dtype, D ** -0.5), pick(ks[2], F, K)
    b = normal(ks[3], (F, U), dtype)
    norm = (kind, 1e-5, normal(ks[4], (D,), dtype), normal(ks[5], (D,), dtype) if kind == "layernorm" else None)
    out = gm.gathered_up(x, w, idx, b, activation=activation, norm=norm, interpret=INTERPRET, **blocks)
    ref = gm.gathered_up_reference(x, w, idx, b, activation=activation, norm=norm)
    normed = gm.gathered_up_reference(apply_norm(x, *norm[2:], kind=kind, eps=1e-5), w, idx, b,
                                      activation=activation)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(normed))
    assert rel_err(out, ref) < TOL[dtype]
    with pytest.raises(ValueError, match="norm must be"):
        gm.gathered_up(x, w, idx, b, activation=activation, norm=(kind, 1e-5, norm[2][:-1], norm[3]),
                       interpret=True)


@pytest.mark.parametrize("blocks", [dict(block_e=4, block_d=64), dict(block_e=1, block_d=512),
                                    dict(block_e=16, block_d=32, num_warps=2)])
def test_gathered_up_block_sizes(blocks):
    """Any power-of-two tiling gives the same result, including tiles larger than the problem."""
    ks = keys(7, 4)
    x, w = normal(ks[0], (2, 200), jnp.float32), normal(ks[1], (50, 2, 200), jnp.float32)
    b, idx = normal(ks[2], (50, 2), jnp.float32), pick(ks[3], 50, 13)
    out = gm.gathered_up(x, w, idx, b, activation="swiglu", interpret=INTERPRET, **blocks)
    ref = gm.gathered_up_reference(x, w, idx, b, activation="swiglu")
    assert rel_err(out, ref) < TOL[jnp.float32]


def test_gathered_up_all_rows_is_dense():
    """Selecting every neuron (in order) equals the dense matmul with bias and ReLU."""
    ks = keys(3, 3)
    F, D = 72, 136
    x, w, b = normal(ks[0], (2, D), jnp.float32), normal(ks[1], (F, 1, D), jnp.float32), \
        normal(ks[2], (F, 1), jnp.float32)
    out = gm.gathered_up(x, w, jnp.asarray(np.arange(F, dtype=np.int32)), b, interpret=INTERPRET)
    dense = np.maximum(np.einsum("BD,FD->BF", f64(x), f64(w)[:, 0]) + f64(b)[:, 0], 0.0)
    assert rel_err(out, dense) < TOL[jnp.float32]


DOWN_CASES = [
    # B, D, F, K, blocks
    (1, 64, 32, 1, {}),  # K = 1
    (1, 300, 96, 37, {}),  # odd sizes, default split-K (per-split partials)
    (1, 300, 96, 37, dict(combine="atomic")),  # split-K with atomics
    (3, 576, 64, 21, dict(k_splits=1)),  # one program per column block, direct store
    (2, 100, 48, 48, dict(block_e=4, block_d=32, k_splits=5, combine="atomic")),  # K = F
    (2, 100, 48, 30, dict(block_e=4, block_d=32, k_splits=3, combine="partials")),
    (3, 100, 48, 30, dict(block_e=4, block_d=32, k_splits=3, combine="atomic_last")),
    (1, 257, 40, 39, dict(block_e=2, block_d=512, k_splits=1)),  # tile wider than D, long loop
]


@pytest.mark.parametrize("B,D,F,K,blocks,dtype", with_dtypes(DOWN_CASES, (1, 4)))
def test_gathered_down_matches_reference(B, D, F, K, blocks, dtype):
    ks = keys(B * 1000 + D + K, 3)
    a = normal(ks[0], (B, K), dtype)
    w = normal(ks[1], (F, D), dtype, K ** -0.5)
    idx = pick(ks[2], F, K)
    out = gm.gathered_down(a, w, idx, interpret=INTERPRET, **blocks)
    ref = gm.gathered_down_reference(a, w, idx)
    assert out.dtype == a.dtype and out.shape == (B, D)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("k_splits,combine", [(1, "atomic"), (3, "atomic"), (3, "partials"),
                                              (3, "atomic_last")])
def test_gathered_down_all_rows_is_dense(k_splits, combine):
    """All neurons selected in a shuffled order: the permuted sum equals the dense matmul."""
    ks = keys(5, 3)
    F, D = 64, 120
    a_dense, w = normal(ks[0], (2, F), jnp.float32), normal(ks[1], (F, D), jnp.float32)
    idx = pick(ks[2], F, F)
    out = gm.gathered_down(a_dense[:, idx], w, idx, interpret=INTERPRET, k_splits=k_splits,
                           block_e=8, combine=combine)
    dense = np.einsum("BF,FD->BD", f64(a_dense), f64(w))
    assert rel_err(out, dense) < TOL[jnp.float32]


def test_mlp_sparse_equals_masked_dense():
    """up -> down over the selected neurons equals the dense MLP with the other neurons zeroed."""
    ks = keys(11, 5)
    F, D, K = 80, 96, 30
    x, w_up = normal(ks[0], (1, D), jnp.float32), normal(ks[1], (F, 1, D), jnp.float32)
    b_up, w_down = normal(ks[2], (F, 1), jnp.float32), normal(ks[3], (F, D), jnp.float32)
    idx = pick(ks[4], F, K)
    y = gm.gathered_down(gm.gathered_up(x, w_up, idx, b_up, interpret=INTERPRET), w_down, idx,
                         interpret=INTERPRET)
    keep = np.zeros((F,), bool)
    keep[np.asarray(idx)] = True
    h = np.maximum(np.einsum("BD,FD->BF", f64(x), f64(w_up)[:, 0]) + f64(b_up)[:, 0], 0.0)
    dense = np.einsum("BF,FD->BD", np.where(keep, h, 0.0), f64(w_down))
    assert rel_err(y, dense) < TOL[jnp.float32]


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------

HEAD_CASES = [
    # B, H, Dh, D, Kh
    (1, 9, 64, 576, 1),  # SmolLM2 shape, one head
    (1, 9, 64, 576, 9),  # all heads
    (2, 6, 48, 100, 4),  # non power-of-two Dh and D
]


@pytest.mark.parametrize("B,H,Dh,D,Kh,dtype", with_dtypes(HEAD_CASES, (2,)))
def test_gathered_head_proj_matches_reference(B, H, Dh, D, Kh, dtype):
    ks = keys(H * 100 + Kh, 4)
    x, w = normal(ks[0], (B, D), dtype), normal(ks[1], (H, Dh, D), dtype, D ** -0.5)
    b, idx = normal(ks[2], (H, Dh), dtype), pick(ks[3], H, Kh)
    out = ga.gathered_head_proj(x, w, idx, b, interpret=INTERPRET)
    ref = ga.gathered_head_proj_reference(x, w, idx, b)
    assert out.shape == (B, Kh, Dh)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("B,H,Dh,D,Kh,dtype", with_dtypes(HEAD_CASES, (2,)))
def test_gathered_out_proj_matches_reference(B, H, Dh, D, Kh, dtype):
    ks = keys(H * 100 + Kh + 1, 3)
    o, w = normal(ks[0], (B, Kh, Dh), dtype), normal(ks[1], (H, Dh, D), dtype, (Kh * Dh) ** -0.5)
    idx = pick(ks[2], H, Kh)
    out = ga.gathered_out_proj(o, w, idx, interpret=INTERPRET)
    ref = ga.gathered_out_proj_reference(o, w, idx)
    assert out.shape == (B, D)
    assert rel_err(out, ref) < TOL[dtype]


def test_head_proj_all_heads_is_dense():
    ks = keys(13, 3)
    H, Dh, D = 5, 24, 72
    x, w, b = normal(ks[0], (1, D), jnp.float32), normal(ks[1], (H, Dh, D), jnp.float32), \
        normal(ks[2], (H, Dh), jnp.float32)
    all_heads = jnp.asarray(np.arange(H, dtype=np.int32))
    q = ga.gathered_head_proj(x, w, all_heads, b, interpret=INTERPRET)
    assert rel_err(q, np.einsum("BD,NHD->BNH", f64(x), f64(w)) + f64(b)) < TOL[jnp.float32]
    o = normal(ks[0], (1, H, Dh), jnp.float32)
    y = ga.gathered_out_proj(o, w, all_heads, interpret=INTERPRET)
    assert rel_err(y, np.einsum("BNH,NHD->BD", f64(o), f64(w))) < TOL[jnp.float32]


ATTN_CASES = [
    # B, H, KV, Dh, S, Kh, blocks
    (1, 4, 4, 64, 40, 2, {}),  # MHA, default sequence splits
    (2, 9, 3, 64, 37, 5, dict(block_s=16, seq_splits=1)),  # GQA (SmolLM2 heads), one split
    (1, 6, 2, 48, 100, 6, dict(block_s=16, seq_splits=3)),  # odd Dh, all heads, uneven splits
    (1, 8, 8, 32, 16, 1, dict(block_s=32)),  # one head, block longer than the cache
]


@pytest.mark.parametrize("B,H,KV,Dh,S,Kh,blocks,dtype", with_dtypes(ATTN_CASES, (1,)))
def test_sparse_decode_attention_matches_reference(B, H, KV, Dh, S, Kh, blocks, dtype):
    ks = keys(S * 10 + Kh, 5)
    q = normal(ks[0], (B, Kh, Dh), dtype)
    k, v = normal(ks[1], (B, KV, S, Dh), dtype), normal(ks[2], (B, KV, S, Dh), dtype)
    valid = ks[3].random((B, S)) < 0.6
    valid[:, 0] = True
    valid = jnp.asarray(valid)
    idx = pick(ks[4], H, Kh)
    kw = dict(scale=Dh ** -0.5, num_heads=H)
    out = ga.sparse_decode_attention(q, k, v, valid, idx, interpret=INTERPRET, **kw, **blocks)
    ref = ga.sparse_decode_attention_reference(q, k, v, valid, idx, **kw)
    assert out.shape == (B, Kh, Dh) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_sparse_decode_attention_is_dense_softmax_attention():
    """All heads, GQA: equals softmax(q k^T) v written out per query head, masked slots ignored."""
    ks = keys(17, 4)
    B, H, KV, Dh, S = 2, 6, 3, 16, 24
    q = normal(ks[0], (B, H, Dh), jnp.float32)
    k, v = normal(ks[1], (B, KV, S, Dh), jnp.float32), normal(ks[2], (B, KV, S, Dh), jnp.float32)
    valid = np.arange(S)[None, :] < np.array([[S], [9]])  # second row: only 9 tokens so far
    out = ga.sparse_decode_attention(q, k, v, jnp.asarray(valid), jnp.asarray(np.arange(H, dtype=np.int32)),
                                     scale=0.3, num_heads=H, interpret=INTERPRET, block_s=16)
    k_h, v_h = np.repeat(f64(k), H // KV, axis=1), np.repeat(f64(v), H // KV, axis=1)  # [B,H,S,Dh]
    s = np.where(valid[:, None], np.einsum("bhd,bhsd->bhs", f64(q), k_h) * 0.3, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert rel_err(out, np.einsum("bhs,bhsd->bhd", p, v_h)) < 1e-5


@pytest.mark.parametrize("blocks", [{}, dict(block_s=16)])  # one split (the kernel normalises), two (XLA merges)
def test_sparse_decode_attention_row_without_valid_slots_is_zero(blocks):
    ks = keys(19, 3)
    q = normal(ks[0], (2, 2, 8), jnp.float32)
    k, v = normal(ks[1], (2, 2, 20, 8), jnp.float32), normal(ks[2], (2, 2, 20, 8), jnp.float32)
    valid = np.zeros((2, 20), bool)
    valid[0, 3] = True
    valid = jnp.asarray(valid)
    idx = jnp.array([1, 0], jnp.int32)
    out = ga.sparse_decode_attention(q, k, v, valid, idx, scale=1.0, interpret=INTERPRET, **blocks)
    ref = ga.sparse_decode_attention_reference(q, k, v, valid, idx, scale=1.0)
    assert np.all(np.asarray(out[1]) == 0.0)
    np.testing.assert_allclose(out[0], v[0, idx, 3], rtol=1e-6)  # one valid slot: its value row
    assert rel_err(out, ref) < 1e-6


WINDOW_KV_CASES = [
    # B, W, D, KV, Dh, heads, bias, blocks
    (1, 5, 100, 4, 24, [3, 0, 3, 4, -1], True, {}),  # W < 16, odd D and Dh, a repeat, two skipped ids
    (1, 16, 96, 3, 16, [2, 1, 0], False, {}),  # W = 16, every head once
    (2, 16, 72, 2, 48, [1, 1, 0], True, dict(block_m=16, block_n=16, block_d=32)),  # GQA-like KV = 2:
    # two window-row blocks (B*W = 32), three Dh blocks, ragged D loop
    (3, 7, 64, 8, 32, [7, 2], False, dict(block_m=16, block_n=16, block_d=16)),  # B*W = 21: 2nd
    # row block half masked
]


@pytest.mark.parametrize("B,W,D,KV,Dh,heads,bias,blocks,dtype", with_dtypes(WINDOW_KV_CASES, (0, 2)))
def test_gathered_window_kv_matches_reference(B, W, D, KV, Dh, heads, bias, blocks, dtype):
    ks = keys(W * 100 + D, 3)
    x, w = normal(ks[0], (B, W, D), dtype), normal(ks[1], (2, KV, Dh, D), dtype, D ** -0.5)
    b = normal(ks[2], (2, KV, Dh), dtype) if bias else None
    heads = jnp.asarray(np.array(heads, np.int32))
    out = ga.gathered_window_kv(x, w, heads, b, interpret=INTERPRET, **blocks)
    ref = ga.gathered_window_kv_reference(x, w, heads, b)
    assert out.shape == (2, B, heads.shape[0], W, Dh) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    expect = np.einsum("BTD,CKHD->CBKTH", f64(x), f64(w)[:, np.clip(heads, 0, KV - 1)])
    if bias:
        expect = expect + f64(b)[:, np.clip(heads, 0, KV - 1)][:, None, :, None, :]
    skipped = (np.asarray(heads) < 0) | (np.asarray(heads) >= KV)
    expect[:, :, skipped] = 0.0  # ids outside [0, KV) give zeros
    assert rel_err(out, expect) < TOL[dtype]


def test_gathered_window_kv_reads_only_the_named_heads():
    """Weights of heads not named (and of the skip id's would-be rows) are never loaded: NaNs there
    do not reach the output."""
    ks = keys(53, 2)
    B, W, D, KV, Dh = 1, 3, 40, 5, 16
    x = normal(ks[0], (B, W, D), jnp.float32)
    w = np.asarray(normal(ks[1], (2, KV, Dh, D), jnp.float32)).copy()
    w[:, [0, 2, 4]] = np.nan
    heads = jnp.asarray(np.array([3, 1, 5, 3], np.int32))  # 5 = KV: skipped
    out = ga.gathered_window_kv(x, jnp.asarray(w), heads, interpret=INTERPRET)
    ref = ga.gathered_window_kv_reference(x, jnp.asarray(w), heads)
    assert rel_err(out, ref) < TOL[jnp.float32]
    assert np.all(np.asarray(out[:, :, 2]) == 0.0)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 3])  # a repeated head: equal values


WINDOW_UPDATE_CASES = [
    # B, W, D, KV, Dh, S, heads, slots, bias, rotary, blocks
    (1, 3, 100, 4, 8, 6, [3, 0, 4], [5, 3, 4], True, False, {}),  # a skip, W < Ka
    (2, 3, 72, 5, 16, 9, [4, 1, 4, -1, 2], [7, 9, 8], False, False, {}),  # a repeat, a dropped slot
    (1, 16, 96, 4, 12, 20, [2, 0, 3, 1], [16, 17, 18, 19] + list(range(4, 16)), True, False,
     dict(block_m=16, block_n=16, block_d=32)),  # ring order, ragged D loop, Dh < block_n
    (2, 16, 40, 5, 16, 16, [0, 5, 3], [-1] * 5 + list(range(11)), True, True, {}),  # RoPE; the first
    # five window tokens not written yet (negative and >= S would both be dropped)
    (2, 3, 56, 4, 48, 7, [1, 3, 1], [2, 40, 0], False, True, dict(block_m=16, block_n=16, block_d=16)),
    # RoPE over two column blocks per half (24 = 16 + 8 masked), B*W = 6 rows of a 16-row block
]


def _window_update_inputs(B, W, D, KV, Dh, S, heads, slots, bias, rotary, dtype, cache_dtype):
    ks = keys(W * 1000 + D + KV, 6)
    x, w = normal(ks[0], (B, W, D), dtype), normal(ks[1], (2, KV, Dh, D), dtype, D ** -0.5)
    b = normal(ks[2], (2, KV, Dh), dtype) if bias else None
    k, v = normal(ks[3], (B, KV, S, Dh), cache_dtype), normal(ks[4], (B, KV, S, Dh), cache_dtype)
    rot = None
    if rotary:  # the angles at random positions, as model.rope_cos_sin computes them
        pos = ks[5].integers(0, 500, (B, W)).astype(np.float32)
        angles = pos[..., None] / 10000.0 ** (np.arange(0, Dh, 2, dtype=np.float32) / Dh)
        rot = (jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32))
    heads, slots = jnp.asarray(np.array(heads, np.int32)), jnp.asarray(np.array(slots, np.int32))
    return x, w, heads, slots, k, v, b, rot


@pytest.mark.parametrize("B,W,D,KV,Dh,S,heads,slots,bias,rotary,blocks,dtype",
                         with_dtypes(WINDOW_UPDATE_CASES, (1, 3)))
def test_gathered_window_kv_update_matches_reference(B, W, D, KV, Dh, S, heads, slots, bias, rotary,
                                                     blocks, dtype):
    args = _window_update_inputs(B, W, D, KV, Dh, S, heads, slots, bias, rotary, dtype, dtype)
    x, w, heads, slots, k, v, b, rot = args
    k_out, v_out = ga.gathered_window_kv_update(*args, interpret=INTERPRET, **blocks)
    k_ref, v_ref = ga.gathered_window_kv_update_reference(*args)
    assert k_out.shape == k.shape and k_out.dtype == dtype and v_out.dtype == dtype
    # Independently: the written entries in float64 (window K/V, keys rotated), the rest untouched.
    kv_w = np.einsum("BTD,CKHD->CBKTH", f64(x), f64(w)[:, np.clip(heads, 0, KV - 1)])
    if bias:
        kv_w = kv_w + f64(b)[:, np.clip(heads, 0, KV - 1)][:, None, :, None, :]
    if rotary:
        cos, sin = (f64(r)[:, None] for r in rot)  # [B, 1, W, Dh/2]
        k1, k2 = np.split(kv_w[0], 2, axis=-1)
        kv_w[0] = np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)
    want = [f64(k).copy(), f64(v).copy()]
    written = np.zeros(k.shape, bool)
    for a, h in enumerate(np.asarray(heads)):
        for t, s in enumerate(np.asarray(slots)):
            if 0 <= h < KV and 0 <= s < S:
                for c in range(2):
                    want[c][:, h, s] = kv_w[c][:, a, t]
                written[:, h, s] = True
    for out, ref, expect, old in ((k_out, k_ref, want[0], k), (v_out, v_ref, want[1], v)):
        assert rel_err(out, ref) < TOL[dtype] and rel_err(out, expect) < TOL[dtype]
        np.testing.assert_array_equal(np.asarray(out)[~written], np.asarray(old)[~written])


def test_gathered_window_kv_update_rounds_like_the_window_op():
    """bf16 window, fp32 cache: the written values are the window op's bf16 K/V (rotated in fp32
    and rounded to bf16 again), exactly as the reference (the current lazy-KV path) writes them."""
    case = (2, 5, 48, 4, 16, 8, [3, 1], [3, 4, 5, 6, 7], True, True)
    args = _window_update_inputs(*case, jnp.bfloat16, jnp.float32)
    out = ga.gathered_window_kv_update(*args, interpret=INTERPRET)
    ref = ga.gathered_window_kv_update_reference(*args)
    for o, r in zip(out, ref):
        assert o.dtype == jnp.float32
        # One bf16 step, relative to the values' scale: the GPU may fuse the rotation's multiply-adds,
        # so a value that cancels to near zero can land one rounding away from the reference's.
        scale = float(np.max(np.abs(np.asarray(r))))
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=2e-2, atol=2e-2 * scale)
        written = np.asarray(o)[:, [3, 1], 3:8]  # heads 3, 1 at slots 3 .. 7
        assert np.array_equal(written.astype(jnp.bfloat16).astype(np.float32), written)


def test_gathered_window_kv_update_reads_only_the_named_heads():
    """NaN weights of unnamed heads never reach the cache (nor does the skip id read any)."""
    args = list(_window_update_inputs(1, 3, 40, 5, 16, 4, [3, 1, 5, 3], [0, 1, 2], True, False,
                                      jnp.float32, jnp.float32))
    w = np.asarray(args[1]).copy()
    w[:, [0, 2, 4]] = np.nan
    args[1] = jnp.asarray(w)
    k_out, v_out = ga.gathered_window_kv_update(*args, interpret=INTERPRET)
    k_ref, v_ref = ga.gathered_window_kv_update_reference(*args)
    assert rel_err(k_out, k_ref) < TOL[jnp.float32] and rel_err(v_out, v_ref) < TOL[jnp.float32]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gathered_window_kv_update_with_key_norm(dtype):
    """Qwen3's per-head key RMSNorm, before the rotation: the kernel path (window op, then XLA's norm,
    rotation and scatter) and the reference against float64, heads repeated and skipped, a slot
    dropped; values untouched by the norm."""
    B, W, D, KV, Dh, S = 2, 5, 72, 4, 16, 9
    args = _window_update_inputs(B, W, D, KV, Dh, S, [2, 0, 2, 7], [4, 5, 6, 7, 9], True, True, dtype, dtype)
    x, w, heads, slots, k, v, b, rot = args
    scale = jnp.asarray(keys(7, 1)[0].normal(1.0, 0.3, Dh), jnp.float32)
    out = ga.gathered_window_kv_update(*args, k_norm=scale, norm_eps=1e-6, interpret=INTERPRET)
    ref = ga.gathered_window_kv_update_reference(*args, k_norm=scale, norm_eps=1e-6)
    kv_w = np.einsum("BTD,CKHD->CBKTH", f64(x), f64(w)[:, [2, 0]]) + f64(b)[:, [2, 0]][:, None, :, None, :]
    kn = kv_w[0] / np.sqrt(np.mean(kv_w[0] ** 2, axis=-1, keepdims=True) + 1e-6) * f64(scale)
    cos, sin = (f64(r)[:, None] for r in rot)  # [B, 1, W, Dh/2]
    k1, k2 = np.split(kn, 2, axis=-1)
    want_k, want_v = f64(k).copy(), f64(v).copy()
    want_k[:, [2, 0], 4:8] = np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)[:, :, :4]
    want_v[:, [2, 0], 4:8] = kv_w[1][:, :, :4]
    for got in (out, ref):
        assert rel_err(got[0], want_k) < TOL[dtype] and rel_err(got[1], want_v) < TOL[dtype]
    plain = ga.gathered_window_kv_update_reference(*args)
    assert rel_err(plain[0], want_k) > 10 * TOL[dtype]  # the norm changed the keys


QKV_UPDATE_CASES = [
    # B, W, D, H, KV, Dh, S, q_idx, refresh, cur, bias, rotary, norm, blocks
    (1, 5, 100, 4, 4, 24, 9, [3, 0], [0, 4], 2, True, False, "layernorm", {}),  # MHA, odd D and Dh; a
    # refreshed group that is also active (computed once) and a refresh id past KV (skipped)
    (2, 16, 72, 6, 2, 16, 20, [5, 1, 4], [1], 15, False, True, "rmsnorm",
     dict(block_m=16, block_n=16, block_d=32)),  # GQA (3 heads a group), RoPE, two row blocks, ragged D
    (3, 7, 64, 8, 8, 32, 12, [7, 2, 6, 0], [3], 0, True, True, "layernorm",
     dict(block_m=16, block_n=16, block_d=16)),  # B*W = 21: the 2nd row block half masked; cur = 0
]


def _qkv_update_inputs(B, W, D, H, KV, Dh, S, q_idx, refresh, cur, bias, rotary, norm, dtype):
    ks = keys(W * 1000 + D + H, 8)
    h = normal(ks[0], (B, D), dtype, 3.0) + 0.5  # a residual with a mean: LayerNorm's centring matters
    scale, nbias = normal(ks[1], (D,), dtype), normal(ks[2], (D,), dtype) if norm == "layernorm" else None
    x_win = normal(ks[3], (B, W, D), dtype)
    w_q, w_kv = normal(ks[4], (H, Dh, D), dtype, D ** -0.5), normal(ks[5], (2, KV, Dh, D), dtype, D ** -0.5)
    b_q, b_kv = (normal(ks[6], (H, Dh), dtype), normal(ks[6], (2, KV, Dh), dtype)) if bias else (None, None)
    k, v = normal(ks[7], (B, KV, S, Dh), dtype), normal(ks[7], (B, KV, S, Dh), dtype, 0.5)
    slots = jnp.asarray(ks[7].permutation(S)[:W].astype(np.int32))
    rot = None
    if rotary:
        angles = ks[0].integers(0, 500, (B, W, 1)) / 10000.0 ** (np.arange(0, Dh, 2) / Dh)
        rot = (jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32))
    ids = [jnp.asarray(np.array(i, np.int32)) for i in (q_idx, refresh)]
    return (h, scale, nbias, x_win, w_q, w_kv, *ids, jnp.int32(cur), slots, k, v, b_q, b_kv, rot)


@pytest.mark.parametrize("B,W,D,H,KV,Dh,S,q_idx,refresh,cur,bias,rotary,norm,blocks,dtype",
                         with_dtypes(QKV_UPDATE_CASES, (1,)))
def test_gathered_window_qkv_update_matches_reference(B, W, D, H, KV, Dh, S, q_idx, refresh, cur, bias,
                                                      rotary, norm, blocks, dtype):
    args = _qkv_update_inputs(B, W, D, H, KV, Dh, S, q_idx, refresh, cur, bias, rotary, norm, dtype)
    h, scale, nbias, x_win, w_q, w_kv, qi, ri, _, slots, k, v, b_q, b_kv, rot = args
    out = ga.gathered_window_qkv_update(*args, norm_kind=norm, norm_eps=1e-5, interpret=INTERPRET, **blocks)
    ref = ga.gathered_window_qkv_update_reference(*args, norm_kind=norm, norm_eps=1e-5)
    for o, r, old in zip(out, ref, (None, x_win, k, v)):
        assert o.shape == r.shape and o.dtype == dtype
        assert rel_err(o, r) < TOL[dtype]
    # Independently, in float64: the ring's row cur is norm(h), the rest of the ring unchanged ...
    x = f64(h)
    if norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt(np.square(x).mean(-1, keepdims=True) + 1e-5) * f64(scale)
    x = x + (f64(nbias) if nbias is not None else 0.0)
    ring = np.asarray(out[1], np.float64)
    assert rel_err(ring[:, cur], x) < TOL[dtype]
    np.testing.assert_array_equal(np.delete(ring, cur, axis=1), np.delete(f64(x_win), cur, axis=1))
    # ... and q the selected heads' projections of it (RoPE'd at the row's angles).
    q = np.einsum("BD,KHD->BKH", x, f64(w_q)[np.asarray(qi)]) + (f64(b_q)[np.asarray(qi)] if bias else 0.0)
    if rotary:
        cos, sin = (f64(r)[:, cur][:, None] for r in rot)
        q1, q2 = np.split(q, 2, axis=-1)
        q = np.concatenate([q1 * cos - q2 * sin, q2 * cos + q1 * sin], axis=-1)
    assert rel_err(out[0], q) < TOL[dtype]
    # The cache rows of unnamed groups are untouched.
    named = set(int(g) for g in np.asarray(qi) // (H // KV)) | set(int(g) for g in np.asarray(ri) if g < KV)
    for o, old in ((out[2], k), (out[3], v)):
        for g in set(range(KV)) - named:
            np.testing.assert_array_equal(np.asarray(o)[:, g], np.asarray(old)[:, g])


@pytest.mark.parametrize("B,W,D,H,KV,Dh,S,q_idx,refresh,cur,bias,rotary,norm,blocks", QKV_UPDATE_CASES)
def test_gathered_window_qkv_from_a_normed_ring_equals_the_normalising_kernel(B, W, D, H, KV, Dh, S, q_idx,
                                                                              refresh, cur, bias, rotary,
                                                                              norm, blocks):
    """h None: the kernel reads this token's normed row from the ring (written by the caller) and gives
    the q and caches the normalising kernel gives, the ring untouched; the reference agrees."""
    args = _qkv_update_inputs(B, W, D, H, KV, Dh, S, q_idx, refresh, cur, bias, rotary, norm, jnp.float32)
    kw = dict(norm_kind=norm, norm_eps=1e-5)
    fused = ga.gathered_window_qkv_update(*args, interpret=INTERPRET, **kw, **blocks)
    ring = fused[1]  # row cur = norm(h), as the caller's XLA norm and ring write leave it
    normed = (None, None, None, ring, *args[4:])
    out = ga.gathered_window_qkv_update(*normed, interpret=INTERPRET, **kw, **blocks)
    ref = ga.gathered_window_qkv_update_reference(*normed, **kw)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(ring))
    for o, f, r in zip(out, fused, ref):
        assert o.shape == f.shape == r.shape
        np.testing.assert_allclose(np.asarray(o), np.asarray(f), rtol=1e-6, atol=1e-6)
        assert rel_err(o, r) < TOL[jnp.float32]
    with pytest.raises(ValueError, match="no norm weights"):
        ga.gathered_window_qkv_update(None, args[1], None, *args[3:], interpret=INTERPRET, **kw)


def test_gathered_window_qkv_update_reads_only_the_named_heads():
    """NaN weights of unselected query heads and unnamed KV groups never reach q or the caches."""
    args = list(_qkv_update_inputs(1, 4, 40, 6, 3, 16, 6, [4, 1], [0], 1, True, False, "layernorm",
                                   jnp.float32))
    w_q, w_kv = np.asarray(args[4]).copy(), np.asarray(args[5]).copy()
    w_q[[0, 2, 3, 5]] = np.nan
    w_kv[:, 1] = np.nan  # groups 0 (refreshed) and 2 (heads 4, 5 at 2 heads a group) are named
    args[4], args[5] = jnp.asarray(w_q), jnp.asarray(w_kv)
    kw = dict(norm_kind="layernorm", norm_eps=1e-5)
    out = ga.gathered_window_qkv_update(*args, interpret=INTERPRET, **kw)
    ref = ga.gathered_window_qkv_update_reference(*args, **kw)
    for o, r in zip(out, ref):
        assert rel_err(o, r) < TOL[jnp.float32]


# --------------------------------------------------------------------------------------------------
# Backend switch, argument checks, Triton lowering
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Top-K selection
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G,N,K,chunk", [
    (1, 37, 5, None),       # one padded chunk
    (1, 100, 99, 32),       # K = N - 1, four chunks, the last one partial
    (3, 1000, 250, 256),    # several rows (tensor-parallel shards), chunk loop
    (1, 1536, 384, None),   # SmolLM2 MLP width at density 0.25
    (2, 9, 9, None),        # K = N
])
def test_topk_rows_matches_lax_top_k(G, N, K, chunk):
    s = normal(keys(41, 1)[0], (G, N), jnp.float32)
    got = np.asarray(st.topk_rows(s, K, interpret=INTERPRET, chunk=chunk))
    np.testing.assert_array_equal(got, np.asarray(st.topk_rows_reference(s, K)))
    assert np.all(np.diff(got, axis=1) > 0), "indices must be strictly ascending"


def test_topk_rows_ties_and_special_values():
    """Ties at the K-th value go to the lower indices (lax.top_k's set); signed zeros, infinities and
    the largest finite magnitudes order like the floats."""
    rng = keys(43, 1)[0]
    ties = jnp.asarray(np.round(rng.standard_normal((2, 300)) * 2).astype(np.float32))  # ~9 distinct values
    for scores, k in [(ties, 77), (jnp.zeros((1, 50)), 10),
                      (jnp.asarray([[-np.inf, 1.0, -0.0, 0.0, np.inf, -5.0, 3e38, -3e38]]), 4)]:
        got = st.topk_rows(scores, k, interpret=INTERPRET, chunk=64)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(st.topk_rows_reference(scores, k)))
    with pytest.raises(ValueError, match="k must be"):
        st.topk_rows(ties, 301, interpret=True)
    with pytest.raises(ValueError, match=r"\[G, N\]"):
        st.topk_rows(ties[0], 3, interpret=True)


def _check_blockwise_topk(idx, scores, k, blocks, tol=0.0):
    """idx is a valid per-block top-k of scores (float64 [N]): ascending within each block, in the
    block's rows, and no unselected row of a block beats a selected one by more than tol."""
    n = scores.shape[0]
    nb, kb = n // blocks, -(-k // blocks)
    assert idx.shape == (blocks * kb,)
    for s in range(blocks):
        part = idx[s * kb:(s + 1) * kb] - s * nb
        assert np.all(np.diff(part) > 0) and part.min() >= 0 and part.max() < nb
        keep = np.zeros(nb, bool)
        keep[part] = True
        block = scores[s * nb:(s + 1) * nb]
        if kb < nb:
            assert block[keep].min() >= block[~keep].max() - tol


@pytest.mark.parametrize("N,r,K,blocks,dtype", [
    (1536, 64, 384, 12, jnp.float16),   # SmolLM2 MLP width, 128-row blocks
    (9, 16, 4, 1, jnp.float32),         # SmolLM2's 9 heads: one block, padded to 16 lanes
    (100, 10, 7, 4, jnp.float32),       # K not a multiple of the blocks: ceil(7 / 4) = 2 per block
    (30, 5, 30, 3, jnp.bfloat16),       # K = N
    (256, 128, 64, 1, jnp.float16),     # the largest block
])
def test_code_topk_rows_matches_reference(N, r, K, blocks, dtype):
    """Small-integer weights and codes make every score exact in fp32, with many ties: the kernel must
    return exactly the reference's rows (ties to the lower index); Gaussian ones must give a valid top-K."""
    rng = keys(53, 1)[0]
    z = jnp.asarray(rng.integers(-3, 4, r).astype(np.float32))
    w = jnp.asarray(rng.integers(-2, 3, (N, r)).astype(np.float32), dtype)
    got = np.asarray(st.code_topk_rows(z, w, K, blocks=blocks, interpret=INTERPRET))
    np.testing.assert_array_equal(got, np.asarray(st.code_topk_rows_reference(z, w, K, blocks=blocks)))
    both = jnp.concatenate([jnp.ones(3), z])  # the code at an offset, as in the shared predictor matvec
    at_offset = st.code_topk_rows(both, w, K, blocks=blocks, start=3, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(at_offset), got)
    z, w = normal(rng, (r,), jnp.float32), normal(rng, (N, r), dtype)
    got = np.asarray(st.code_topk_rows(z, w, K, blocks=blocks, interpret=INTERPRET))
    scores = f64(w) @ f64(z.astype(dtype))
    _check_blockwise_topk(got, scores, K, blocks, tol=1e-5 * np.abs(scores).max())


@pytest.mark.parametrize("H,rh,Kh,N,r,K,blocks,dtype", [
    (9, 8, 4, 1536, 64, 384, 12, jnp.float16),  # SmolLM2: 9 heads, 128-row MLP blocks
    (32, 16, 16, 256, 16, 100, 2, jnp.float32),  # 32 heads beside two 128-row blocks, odd K
    (5, 4, 5, 30, 8, 30, 3, jnp.bfloat16),       # K = N at both sites
])
def test_code_topk_pair_matches_two_calls(H, rh, Kh, N, r, K, blocks, dtype):
    """One launch for both sites returns exactly the two code_topk_rows calls' indices (and the
    references'), from one code with the heads' part at 0 and the MLP's at rh; integer weights and
    codes give exact scores with many ties."""
    rng = keys(61, 1)[0]
    z = jnp.asarray(rng.integers(-3, 4, rh + r).astype(np.float32))
    w_h = jnp.asarray(rng.integers(-2, 3, (H, rh)).astype(np.float32), dtype)
    w_m = jnp.asarray(rng.integers(-2, 3, (N, r)).astype(np.float32), dtype)
    got = st.code_topk_pair(z, w_h, Kh, w_m, K, mlp_blocks=blocks, mlp_start=rh, interpret=INTERPRET)
    two = (st.code_topk_rows(z, w_h, Kh, interpret=INTERPRET),
           st.code_topk_rows(z, w_m, K, blocks=blocks, start=rh, interpret=INTERPRET))
    ref = st.code_topk_pair_reference(z, w_h, Kh, w_m, K, mlp_blocks=blocks, mlp_start=rh)
    assert [a.shape for a in got] == [(Kh,), (blocks * -(-K // blocks),)]
    for g, t, f in zip(got, two, ref):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(t))
        np.testing.assert_array_equal(np.asarray(g), np.asarray(f))
    # The heads' code need not come first: the MLP's at 0, the heads' after it.
    swapped = jnp.concatenate([z[rh:], z[:rh]])
    moved = st.code_topk_pair(swapped, w_h, Kh, w_m, K, mlp_blocks=blocks, mlp_start=0, heads_start=r,
                              interpret=INTERPRET)
    for g, m in zip(got, moved):
        np.testing.assert_array_equal(np.asarray(m), np.asarray(g))


def test_code_topk_pair_rejects_bad_arguments():
    z, w_h, w_m = jnp.zeros(16), jnp.zeros((300, 8)), jnp.zeros((64, 8))
    for args, kwargs, match in [((z, w_h, 4, w_m, 8), dict(mlp_blocks=2, mlp_start=8), "at most 256 rows"),
                                ((z, w_h[:32], 4, w_m, 8), dict(mlp_blocks=3, mlp_start=8), "cannot be split"),
                                ((z, w_h[:32], 4, w_m, 8), dict(mlp_blocks=2, mlp_start=9), "code at start"),
                                ((z, w_h[:32], 0, w_m, 8), dict(mlp_blocks=2, mlp_start=8), "k must be")]:
        with pytest.raises(ValueError, match=match):
            st.code_topk_pair(*args, interpret=True, **kwargs)


def test_code_topk_rows_rejects_bad_arguments():
    z, w = jnp.zeros(8), jnp.zeros((600, 8))
    for args, kwargs, match in [((z, w, 10), dict(blocks=7), "cannot be split into 7"),
                                ((z, w, 10), dict(blocks=2), "at most 256 rows per block"),
                                ((z, w, 0), dict(blocks=3), "k must be"),
                                ((z[:4], w, 10), dict(blocks=3), "code at start"),
                                ((z, w, 10), dict(blocks=3, start=1), "code at start")]:
        with pytest.raises(ValueError, match=match):
            st.code_topk_rows(*args, interpret=True, **kwargs)


def test_get_ops_backends():
    xla = pk.get_ops("xla")
    assert xla.gathered_up is gm.gathered_up_reference
    assert xla.sparse_decode_attention is ga.sparse_decode_attention_reference
    assert xla.gathered_window_kv_update is ga.gathered_window_kv_update_reference
    assert xla.gathered_window_kv_update is ga.gathered_window_kv_update_reference
    pallas = pk.get_ops("pallas")
    ks = keys(23, 3)
    x, w, idx = normal(ks[0], (1, 48), jnp.float32), normal(ks[1], (20, 1, 48), jnp.float32), \
        pick(ks[2], 20, 7)
    # Interpret mode is switched on automatically on CPU, so this call runs anywhere.
    assert rel_err(pallas.gathered_up(x, w, idx), xla.gathered_up(x, w, idx)) < TOL[jnp.float32]
    with pytest.raises(ValueError, match="xla.*pallas"):
        pk.get_ops("triton")


def test_bad_arguments_are_rejected():
    x, w, idx = jnp.asarray(np.ones((1, 8), np.float32)), jnp.asarray(np.ones((4, 1, 8), np.float32)), \
        jnp.asarray(np.arange(2, dtype=np.int32))
    with pytest.raises(ValueError, match="power of two"):
        gm.gathered_up(x, w, idx, interpret=True, block_e=3)
    with pytest.raises(TypeError, match="unknown block"):
        gm.gathered_down(x[:, :2], w[:, 0], idx, interpret=True, block_k=4)
    with pytest.raises(ValueError, match="swiglu"):
        gm.gathered_up(x, w, idx, activation="swiglu", interpret=True)
    with pytest.raises(ValueError, match="activation"):
        gm.gathered_up(x, w, idx, activation="gelu", interpret=True)
    x_win, w_kv, slots = jnp.ones((1, 3, 8)), jnp.ones((2, 2, 5, 8)), jnp.arange(3, dtype=jnp.int32)
    cache = jnp.zeros((1, 2, 4, 5))
    with pytest.raises(ValueError, match="slots"):
        ga.gathered_window_kv_update(x_win, w_kv, idx, slots[:2], cache, cache, interpret=True)
    with pytest.raises(ValueError, match="caches"):
        ga.gathered_window_kv_update(x_win, w_kv, idx, slots, cache, cache[:, :1], interpret=True)
    rot = (jnp.ones((1, 3, 2)),) * 2
    with pytest.raises(ValueError, match="even head_dim"):
        ga.gathered_window_kv_update(x_win, w_kv, idx, slots, cache, cache, None, rot, interpret=True)


def _lowers_to_triton(fn, *args) -> bool:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return "__gpu$xla.gpu.triton" in text


def test_kernels_lower_to_triton_for_odd_shapes():
    """Lowering for CUDA runs the Triton lowering rules (power-of-two shapes, supported ops) on
    CPU; the SmolLM2 sizes (D=576, F=1536, Dh=64, H=9) and an odd K must all lower."""
    def spec(*shape, dtype=jnp.float16):  # abstract inputs: lowering needs shapes only
        return jax.ShapeDtypeStruct(shape, dtype)

    x, idx, heads = spec(1, 576), spec(37, dtype=jnp.int32), spec(5, dtype=jnp.int32)
    w_up, w_down, a = spec(1536, 2, 576), spec(1536, 576), spec(1, 37)
    assert _lowers_to_triton(functools.partial(gm.gathered_up, activation="swiglu"), x, w_up, idx)
    def up_normed(x, w, idx, scale, *bias):
        kind = "layernorm" if bias else "rmsnorm"
        return gm.gathered_up(x, w, idx, activation="swiglu", norm=(kind, 1e-5, scale, *(bias or (None,))))

    for norm_weights in ((spec(576),), (spec(576), spec(576))):
        assert _lowers_to_triton(up_normed, x, w_up, idx, *norm_weights)
    for blocks in ({}, dict(k_splits=1), dict(k_splits=4, combine="atomic"),
                   dict(k_splits=4, combine="atomic_last")):
        assert _lowers_to_triton(functools.partial(gm.gathered_down, **blocks), a, w_down, idx)
    w_q = spec(9, 64, 576)
    assert _lowers_to_triton(ga.gathered_head_proj, x, w_q, heads, spec(9, 64))
    assert _lowers_to_triton(ga.gathered_out_proj, spec(1, 5, 64), w_q, heads)
    kv = spec(1, 3, 70, 64)
    attn = functools.partial(ga.sparse_decode_attention, scale=0.125, num_heads=9)
    assert _lowers_to_triton(attn, spec(1, 5, 64), kv, kv, spec(1, 70, dtype=jnp.bool_), heads)
    window_kv = spec(2, 3, 64, 576)  # SmolLM2's 3 KV heads, a 5-token window, bias
    assert _lowers_to_triton(ga.gathered_window_kv, spec(1, 5, 576), window_kv, heads, spec(2, 3, 64))
    cache, slots = spec(1, 3, 70, 64), spec(5, dtype=jnp.int32)
    rotary = (spec(1, 5, 32, dtype=jnp.float32),) * 2  # RoPE: each program computes both halves
    for b_kv, rot in ((spec(2, 3, 64), None), (None, rotary)):
        assert _lowers_to_triton(ga.gathered_window_kv_update, spec(1, 5, 576), window_kv, heads, slots,
                                 cache, cache, b_kv, rot)
    qkv = functools.partial(ga.gathered_window_qkv_update, norm_kind="rmsnorm", norm_eps=1e-5)
    assert _lowers_to_triton(qkv, spec(1, 576), spec(576), None, spec(1, 5, 576), w_q, window_kv, heads,
                             spec(1, dtype=jnp.int32), spec(dtype=jnp.int32), slots, cache, cache,
                             None, None, rotary)
    qkv = functools.partial(ga.gathered_window_qkv_update, norm_kind="layernorm", norm_eps=1e-5)
    assert _lowers_to_triton(qkv, spec(1, 576), spec(576), spec(576), spec(1, 5, 576), w_q, window_kv,
                             heads, spec(1, dtype=jnp.int32), spec(dtype=jnp.int32), slots, cache,
                             cache, spec(9, 64), spec(2, 3, 64))
    for n, k in ((1536, 384), (9, 4), (36864, 9216)):
        assert _lowers_to_triton(functools.partial(st.topk_rows, k=k), spec(1, n, dtype=jnp.float32))
    for n, r, k, blocks in ((1536, 64, 384, 12), (9, 64, 4, 1), (16384, 128, 4096, 128), (49152, 128, 5000, 192)):
        assert _lowers_to_triton(functools.partial(st.code_topk_rows, k=k, blocks=blocks),
                                 spec(r, dtype=jnp.float32), spec(n, r))
    for (h, rh, kh), (n, r, k, blocks) in (((9, 64, 4), (1536, 64, 384, 12)),
                                           ((32, 128, 16), (16384, 128, 4096, 128))):
        pair = functools.partial(st.code_topk_pair, k_heads=kh, k_mlp=k, mlp_blocks=blocks, mlp_start=rh)
        assert _lowers_to_triton(lambda z, w_h, w_m: pair(z, w_h, mlp_w_t=w_m),
                                 spec(rh + r, dtype=jnp.float32), spec(h, rh), spec(n, r))


# --------------------------------------------------------------------------------------------------
# GPU: compiled kernels at model sizes
# --------------------------------------------------------------------------------------------------


@gpu
@requires_gpu
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("U,activation", [(1, "relu"), (2, "swiglu")])
def test_gpu_mlp_model_size(density, U, activation):
    D, F = 4096, 16384
    K = max(int(F * density), 1)
    ks = keys(29, 5)
    x, w_up = normal(ks[0], (1, D), jnp.float16), normal(ks[1], (F, U, D), jnp.float16, D ** -0.5)
    b_up = normal(ks[2], (F, U), jnp.float16) if U == 1 else None
    w_down, idx = normal(ks[3], (F, D), jnp.float16, K ** -0.5), pick(ks[4], F, K)
    a = gm.gathered_up(x, w_up, idx, b_up, activation=activation)
    assert rel_err(a, gm.gathered_up_reference(x, w_up, idx, b_up, activation=activation)) < 2e-3
    y = gm.gathered_down(a, w_down, idx)
    assert rel_err(y, gm.gathered_down_reference(a, w_down, idx)) < 2e-3
    for blocks in (dict(k_splits=1), dict(combine="atomic"), dict(combine="atomic_last")):
        y1 = gm.gathered_down(a, w_down, idx, **blocks)
        assert rel_err(y1, gm.gathered_down_reference(a, w_down, idx)) < 2e-3
    # The MLP norm inside the up kernel, on a residual with OPT-like outlier columns.
    h = x.astype(jnp.float32) * 4.0 + 1.0
    h = h.at[0, :8].set(300.0).astype(jnp.float16)
    kind = "layernorm" if U == 1 else "rmsnorm"
    norm = (kind, 1e-5, normal(ks[0], (D,), jnp.float16), normal(ks[1], (D,), jnp.float16) if U == 1 else None)
    a = gm.gathered_up(h, w_up, idx, b_up, activation=activation, norm=norm)
    assert rel_err(a, gm.gathered_up_reference(h, w_up, idx, b_up, activation=activation, norm=norm)) < 2e-3


@gpu
@requires_gpu
@pytest.mark.parametrize("G,N,K", [(1, 16384, 4096), (1, 16384, 819), (2, 18432, 2500), (1, 32, 16)])
def test_gpu_topk_rows_model_size(G, N, K):
    s = normal(keys(47, 1)[0], (G, N), jnp.float32)
    np.testing.assert_array_equal(np.asarray(st.topk_rows(s, K)), np.asarray(st.topk_rows_reference(s, K)))
    logits = s.astype(jnp.float16).astype(jnp.float32)  # fp16 predictor logits: many exact ties
    np.testing.assert_array_equal(np.asarray(st.topk_rows(logits, K)),
                                  np.asarray(st.topk_rows_reference(logits, K)))


@gpu
@requires_gpu
@pytest.mark.parametrize("N,K,blocks", [(16384, 4096, 128), (16384, 1638, 128), (32, 16, 1), (49152, 5000, 192)])
def test_gpu_code_topk_rows_model_size(N, K, blocks):
    rng = keys(59, 1)[0]
    z, w = normal(rng, (128,), jnp.float32), normal(rng, (N, 128), jnp.float16)
    got = np.asarray(st.code_topk_rows(z, w, K, blocks=blocks))
    scores = f64(w) @ f64(z.astype(jnp.float16))
    _check_blockwise_topk(got, scores, K, blocks, tol=1e-5 * np.abs(scores).max())
    ref = np.asarray(st.code_topk_rows_reference(z, w, K, blocks=blocks))
    assert np.mean(np.isin(got, ref)) > 0.999  # only near-ties may differ (summation order)


@gpu
@requires_gpu
def test_gpu_code_topk_pair_model_size():
    """A 7B-size layer: 32 heads of rank 128 beside 16384 neurons of rank 128 in 128 blocks. Integer
    weights and codes keep the scores exact whatever the warp count (the pair runs the heads at the
    MLP blocks' 8 warps, code_topk_rows at 4), so all three must agree exactly."""
    rng = keys(67, 1)[0]
    z = jnp.asarray(rng.integers(-3, 4, 256).astype(np.float32))
    w_h, w_m = (jnp.asarray(rng.integers(-2, 3, (n, 128)).astype(np.float32), jnp.float16) for n in (32, 16384))
    got = st.code_topk_pair(z, w_h, 16, w_m, 4096, mlp_blocks=128, mlp_start=128)
    two = (st.code_topk_rows(z, w_h, 16), st.code_topk_rows(z, w_m, 4096, blocks=128, start=128))
    ref = st.code_topk_pair_reference(z, w_h, 16, w_m, 4096, mlp_blocks=128, mlp_start=128)
    for g, t, f in zip(got, two, ref):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(t))
        np.testing.assert_array_equal(np.asarray(g), np.asarray(f))


@gpu
@requires_gpu
@pytest.mark.parametrize("B", [1, 4])
def test_gpu_attention_model_size(B):
    H, KV, Dh, D, S, Kh = 32, 8, 128, 4096, 1000, 12
    ks = keys(31, 7)
    x, w = normal(ks[0], (B, D), jnp.float16), normal(ks[1], (H, Dh, D), jnp.float16, D ** -0.5)
    idx = pick(ks[2], H, Kh)
    q = ga.gathered_head_proj(x, w, idx)
    assert rel_err(q, ga.gathered_head_proj_reference(x, w, idx)) < 2e-3
    k, v = normal(ks[3], (B, KV, S, Dh), jnp.float16), normal(ks[4], (B, KV, S, Dh), jnp.float16)
    valid = jnp.asarray(np.arange(S)[None, :] < np.arange(S - B, S)[:, None] + 1)
    kw = dict(scale=Dh ** -0.5, num_heads=H)
    o = ga.sparse_decode_attention(q, k, v, valid, idx, **kw)
    assert rel_err(o, ga.sparse_decode_attention_reference(q, k, v, valid, idx, **kw)) < 2e-3
    y = ga.gathered_out_proj(o, w, idx)
    assert rel_err(y, ga.gathered_out_proj_reference(o, w, idx)) < 2e-3


@gpu
@requires_gpu
@pytest.mark.parametrize("W", [16, 5])
def test_gpu_window_kv_model_size(W):
    """OPT-6.7B K/V at head density 0.5 plus the lazy mode's 2 refreshed heads (a repeat, a skip)."""
    KV, Dh, D = 32, 128, 4096
    ks = keys(59, 4)
    x, w = normal(ks[0], (1, W, D), jnp.float16), normal(ks[1], (2, KV, Dh, D), jnp.float16, D ** -0.5)
    b = normal(ks[2], (2, KV, Dh), jnp.float16)
    active = pick(ks[3], KV, 16)
    heads = jnp.concatenate([active, active[:1], jnp.array([KV], jnp.int32)])  # a repeat, a skip
    out = ga.gathered_window_kv(x, w, heads, b)
    assert rel_err(out, ga.gathered_window_kv_reference(x, w, heads, b)) < 2e-3


@gpu
@requires_gpu
@pytest.mark.parametrize("rotary,kind", [(False, "layernorm"), (True, "rmsnorm")])
def test_gpu_window_qkv_update_model_size(rotary, kind):
    """OPT-6.7B's lazy-KV attention inputs (16 query heads, 2 refreshed groups, one of them also
    active) in one kernel, jitted with the ring and the caches donated as in the decode step: in
    place, equal to the reference (its five separate ops)."""
    H, Dh, D, W, S = 32, 128, 4096, 16, 256
    ks = keys(67, 8)
    q_idx = jnp.sort(pick(ks[0], H, 16))
    refresh = jnp.asarray([int(q_idx[3]), 31 if int(q_idx[3]) != 31 else 30], jnp.int32)
    s = 100
    slots = jnp.asarray(s - np.mod(s - np.arange(W), W), jnp.int32)
    h = (normal(ks[1], (1, D), jnp.float32) * 3.0 + 0.5).at[0, :4].set(200.0).astype(jnp.float16)
    scale, nbias = normal(ks[2], (D,), jnp.float16), normal(ks[3], (D,), jnp.float16) if kind == "layernorm" else None
    x_win = normal(ks[4], (1, W, D), jnp.float16)
    w_q, w_kv = normal(ks[5], (H, Dh, D), jnp.float16, D ** -0.5), normal(ks[6], (2, H, Dh, D), jnp.float16, D ** -0.5)
    b_q, b_kv = (normal(ks[7], (H, Dh), jnp.float16), normal(ks[7], (2, H, Dh), jnp.float16)) if not rotary else (None, None)
    k, v = normal(ks[7], (1, H, S, Dh), jnp.float16), normal(ks[6], (1, H, S, Dh), jnp.float16, 0.5)
    rot = None
    if rotary:
        angles = (s - W + 1 + np.arange(W, dtype=np.float32))[None, :, None] / 10000.0 ** (
            np.arange(0, Dh, 2, dtype=np.float32) / Dh)
        rot = (jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles)))
    args = (h, scale, nbias, x_win, w_q, w_kv, q_idx, refresh, jnp.int32(s % W), slots, k, v, b_q, b_kv, rot)
    kw = dict(norm_kind=kind, norm_eps=1e-5)
    ref = ga.gathered_window_qkv_update_reference(*args, **kw)
    ptrs = [a.unsafe_buffer_pointer() for a in (x_win, k, v)]
    update = jax.jit(functools.partial(ga.gathered_window_qkv_update, **kw), donate_argnums=(3, 10, 11))
    out = update(*args)
    for o, r in zip(out, ref):
        assert rel_err(o, r) < 2e-3
    assert [a.unsafe_buffer_pointer() for a in out[1:]] == ptrs, "the donated ring / caches were not updated in place"


@gpu
@requires_gpu
@pytest.mark.parametrize("rotary", [False, True])
def test_gpu_window_kv_update_model_size(rotary):
    """OPT-6.7B's lazy-KV update (Ka = 16 active + 2 refreshed, a repeat, a skip) into a 256-slot
    cache, jitted with the caches donated as in the decode step: in place, equal to the reference."""
    KV, Dh, D, W, S = 32, 128, 4096, 16, 256
    ks = keys(61, 5)
    x, w = normal(ks[0], (1, W, D), jnp.float16), normal(ks[1], (2, KV, Dh, D), jnp.float16, D ** -0.5)
    b = normal(ks[2], (2, KV, Dh), jnp.float16)
    active = pick(ks[3], KV, 16)
    heads = jnp.concatenate([active, active[:1], jnp.array([KV], jnp.int32)])  # a repeat, a skip
    s = 100  # this token's slot; the window holds slots s-15 .. s in ring order
    slots = jnp.asarray(s - np.mod(s - np.arange(W), W), jnp.int32)
    rot = None
    if rotary:
        angles = (s - W + 1 + np.arange(W, dtype=np.float32))[None, :, None] / 10000.0 ** (
            np.arange(0, Dh, 2, dtype=np.float32) / Dh)
        rot = (jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles)))
    k, v = normal(ks[4], (1, KV, S, Dh), jnp.float16), normal(ks[4], (1, KV, S, Dh), jnp.float16, 0.5)
    k_ref, v_ref = ga.gathered_window_kv_update_reference(x, w, heads, slots, k, v, b, rot)
    k_ptr = k.unsafe_buffer_pointer()
    update = jax.jit(ga.gathered_window_kv_update, donate_argnums=(4, 5))
    k_out, v_out = update(x, w, heads, slots, k, v, b, rot)
    assert rel_err(k_out, k_ref) < 2e-3 and rel_err(v_out, v_ref) < 2e-3
    assert k_out.unsafe_buffer_pointer() == k_ptr, "the donated cache was not updated in place"

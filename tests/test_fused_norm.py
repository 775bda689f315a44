"""pallas_kernels.fused_norm: the add + norm kernel (interpret mode on CPU) against its reference and
against the model's unfused code, and decode with it equal to decode without."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax import model as M
from pallas_kernels import add_norm, add_norm_reference, get_ops

INTERPRET = jax.default_backend() != "gpu"


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 3, 100)])  # odd D: padded lanes must not count
def test_add_norm_matches_reference(norm, dtype, shape):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    h = (jax.random.normal(k1, shape) * 3 + 1).astype(dtype)
    delta = jax.random.normal(k2, shape).astype(dtype)
    scale = (1 + 0.1 * jax.random.normal(k3, shape[-1:])).astype(dtype)
    shift = None if norm == "rmsnorm" else (0.1 * jax.random.normal(k4, shape[-1:])).astype(dtype)
    tol = 1e-5 if dtype == jnp.float32 else 2e-3
    for d in (delta, None):
        s, y = add_norm(h, d, scale, shift, eps=1e-5, norm=norm, interpret=INTERPRET)
        s_ref, y_ref = add_norm_reference(h, d, scale, shift, eps=1e-5, norm=norm)
        assert s.dtype == y.dtype == dtype and s.shape == y.shape == shape
        np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=tol, rtol=tol)
    # the reference is the model's own unfused add + norm
    p = {"scale": scale} if shift is None else {"scale": scale, "bias": shift}
    cfg = M.ModelConfig(vocab_size=8, hidden_size=shape[-1], num_layers=1, num_heads=1, num_kv_heads=1,
                        head_dim=shape[-1], ffn_size=8, max_positions=8, norm=norm)
    np.testing.assert_allclose(np.asarray(M.norm(p, h + delta, cfg), np.float32),
                               np.asarray(add_norm_reference(h, delta, scale, shift, eps=cfg.norm_eps,
                                                             norm=norm)[1], np.float32), atol=tol, rtol=tol)


def test_add_norm_rejects_bad_shapes():
    h = jnp.zeros((2, 16))
    with pytest.raises(ValueError, match="residual's shape"):
        add_norm(h, jnp.zeros((2, 8)), jnp.ones(16), eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match=r"scale/shift must be \[16\]"):
        add_norm(h, None, jnp.ones(8), eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="norm must be one of"):
        add_norm(h, None, jnp.ones(16), eps=1e-5, norm="batchnorm", interpret=True)


CONFIGS = {
    "opt-pre": M.ModelConfig(vocab_size=50, hidden_size=24, num_layers=2, num_heads=3, num_kv_heads=3, head_dim=8,
                             ffn_size=40, max_positions=32, position_offset=2, attn_bias=True, mlp_bias=True),
    "opt-post": M.ModelConfig(vocab_size=50, hidden_size=24, num_layers=2, num_heads=3, num_kv_heads=3, head_dim=8,
                              ffn_size=40, max_positions=32, position_offset=2, attn_bias=True, mlp_bias=True,
                              pre_norm=False, final_norm=False, word_embed_dim=16),
    "llama": M.ModelConfig(vocab_size=50, hidden_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=6,
                           ffn_size=40, max_positions=32, norm="rmsnorm", activation="swiglu", positions="rope",
                           tie_embeddings=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_with_fused_add_norm_equals_unfused(name):
    """ops given (no selector): the blocks' residual adds and norms run through add_norm; prefill and a
    decode step equal the plain XLA forward (pre-LN, OPT-350m's post-LN, RMSNorm)."""
    cfg = CONFIGS[name]
    params = M.init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    B, T = 2, 5
    toks = jax.random.randint(jax.random.PRNGKey(1), (B, T + 1), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T + 1), (B, T + 1))
    out = {}
    for backend in (None, "xla", "pallas"):
        ops = None if backend is None else get_ops(backend)
        cache = M.init_cache(cfg, B, 8, jnp.float32)
        pre, cache = M.forward(params, cfg, toks[:, :T], pos[:, :T], cache, ops=ops)
        step, _ = M.forward(params, cfg, toks[:, T:], pos[:, T:], cache, ops=ops)
        out[backend] = np.concatenate([np.asarray(pre), np.asarray(step)], axis=1)
    np.testing.assert_allclose(out["xla"], out[None], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["pallas"], out[None], atol=1e-5, rtol=1e-5)

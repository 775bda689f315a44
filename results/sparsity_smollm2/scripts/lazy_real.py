# SmolLM2: greedy decode with predictor-selected heads/neurons (gathered path), exact vs lazy KV cache.
import json, time, numpy as np, jax, jax.numpy as jnp
from dejavu_jax import model as M
from dejavu_jax.checkpoint import load_checkpoint, load_tokenizer
from dejavu_jax.default_model import default_checkpoint
from dejavu_jax.sparse import build_selector, init_sparse_cache
from pallas_kernels import get_ops
d = default_checkpoint(); cfg, params = load_checkpoint(d, jnp.float32); tok = load_tokenizer(d)
sel = build_selector(cfg, params, mode="predictor", mlp_density=0.75, head_density=0.5, predictors="/tmp/dv/predictors_la")
ops = get_ops("xla")
ids = jnp.asarray([tok("The capital of France is Paris. The capital of Germany is")["input_ids"]], jnp.int32)
T, N = ids.shape[1], 24
@jax.jit
def run(params, ids, cache):
    logits, cache = M.forward(params, cfg, ids, jnp.arange(T)[None], cache)
    def step(carry, i):
        tok_, cache = carry
        logits, cache = M.forward(params, cfg, tok_[:, None], jnp.full((1, 1), T + i), cache, selector=sel, ops=ops)
        nxt = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
        return (nxt, cache), (nxt, logits[0, 0])
    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    _, (toks, lg) = jax.lax.scan(step, (first, cache), jnp.arange(N))
    return jnp.concatenate([first, toks[:, 0]]), lg
res = {}
for name, cache in (("exact", init_sparse_cache(cfg, 1, T + N + 1, jnp.float32)),
                    ("lazy_w16", init_sparse_cache(cfg, 1, T + N + 1, jnp.float32, kv_mode="lazy", lazy_window=16)),
                    ):
    t = time.time(); toks, lg = run(params, ids, cache); toks = np.asarray(toks)
    res[name] = (toks, np.asarray(lg)); print(name, round(time.time() - t, 1), "s:", repr(tok.decode(toks)), flush=True)
for name in ("lazy_w16",):
    print(name, "same tokens:", bool((res[name][0] == res["exact"][0]).all()),
          "max |logit diff|:", float(np.abs(res[name][1] - res["exact"][1]).max()))
print("per-step max |diff| (w16):", np.round(np.abs(res["lazy_w16"][1] - res["exact"][1]).max(-1), 5).tolist())
sel_m = build_selector(cfg, params, mode="predictor", mlp_density=0.75, head_density=0.5, predictors="/tmp/dv/predictors_la", gather=False)

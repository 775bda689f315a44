# Realized kept fraction of the threshold baseline on WikiText-2 (calibrated on the C4 predictor docs).
import json
import jax, jax.numpy as jnp, numpy as np
from dejavu_jax import model as M
from dejavu_jax.checkpoint import load_checkpoint, load_tokenizer
from dejavu_jax.default_model import default_checkpoint
from dejavu_jax.sparse import build_selector
d = default_checkpoint(); cfg, params = load_checkpoint(d, jnp.float32); tok = load_tokenizer(d)
rows = [l for l in open("/work/shared/data/wikitext2/wiki.test.raw", encoding="utf-8").read().split("\n")]
text = "\n\n".join(r + "\n" if r.strip() else "" for r in rows)
ids = np.asarray(tok(text[:200000])["input_ids"][:2048], np.int32).reshape(2, 1024)
rec = []
jax.jit(lambda p, t: (lambda r: (M.forward(p, cfg, t, jnp.broadcast_to(jnp.arange(1024), t.shape), record=r), r)[1])([]))
@jax.jit
def run(p, t):
    r = []
    M.forward(p, cfg, t, jnp.broadcast_to(jnp.arange(1024), t.shape), record=r)
    return jnp.stack([x["neuron_importance"] for x in r]), jnp.stack([x["head_importance"] for x in r])
neu, head = run(params, jnp.asarray(ids))
out = {}
for dens in (0.75, 0.5, 0.35, 0.25):
    s = build_selector(cfg, params, mode="threshold", mlp_density=dens, head_density=dens, predictors="/tmp/dv/predictors_la")
    m = float(jnp.mean(neu >= s.mlp_threshold[:, None, None, None]))
    h = float(jnp.mean(head >= s.head_threshold[:, None, None, None]))
    per_tok = jnp.mean(neu >= s.mlp_threshold[:, None, None, None], axis=-1)
    out[dens] = {"mlp_kept": m, "heads_kept": h, "mlp_kept_per_token_p5_p95": [float(jnp.percentile(per_tok, 5)), float(jnp.percentile(per_tok, 95))]}
    print(dens, out[dens], flush=True)
json.dump(out, open("/tmp/dv/exp/thr_density.json", "w"), indent=1)

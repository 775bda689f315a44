# Upper-bound check for linear scores on SwiGLU labels: recall@50% of exact gate / up pre-activations.
import json, numpy as np, jax, jax.numpy as jnp
from dejavu_jax import model as M
from dejavu_jax.checkpoint import load_checkpoint
from dejavu_jax.default_model import default_checkpoint
from dejavu_jax.sparse import topk_mask
from train.collect import load_collection
from train import fit_predictors as FP
cfg, params = load_checkpoint(default_checkpoint(), jnp.float32)
_, shards = load_collection("/tmp/dv/c4_smollm2")
data = FP.LayerData(shards)
out = {}
for layer in (5, 15, 25):
    lp = params["layers"][layer]
    x = jnp.asarray(data.get("mlp", layer)[:8192], jnp.float32)
    y = jnp.asarray(FP.make_labels(data.get("neuron", layer)[:8192], 768, False))
    h = jnp.einsum("nd,fud->nfu", M.norm(lp["mlp_norm"], x, cfg), lp["up"])
    g, u = h[..., 0], h[..., 1]
    res = {name: FP.recall_precision(s, y, 768)[0] for name, s in
           (("gate", g), ("abs_up", jnp.abs(u)), ("silu_gate", jax.nn.silu(g)), ("abs_silu_gate_times_abs_up", jnp.abs(jax.nn.silu(g) * u)))}
    out[layer] = res
    print(layer, res, flush=True)
json.dump(out, open("/tmp/dv/exp/gate_recall.json", "w"), indent=1)

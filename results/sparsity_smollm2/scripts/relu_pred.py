# Does a nonlinearity in the predictor help for SwiGLU labels? Linear low-rank (Deja Vu) vs D->r->ReLU->N.
import json
import jax, jax.numpy as jnp
from dejavu_jax.sparse import normalize_input
from train.collect import load_collection
from train import fit_predictors as FP

def relu_logits(p, x):
    z = jax.nn.relu(jnp.einsum("...d,dr->...r", normalize_input(x), p["a"].astype(jnp.float32)))
    return jnp.einsum("...r,rn->...n", z, p["b"].astype(jnp.float32))

man, shards = load_collection("/tmp/dv/c4_smollm2")
data = FP.LayerData(shards)
fc = FP.FitConfig(rank=256, epochs=12, patience=3)
out = []
for layer in (15,):
    imp = data.get("neuron", layer)
    y = FP.make_labels(imp, 768, False)
    x = FP.predictor_input(data, "mlp", layer, True)
    for name, fn in (("relu_r256", relu_logits),):
        FP.predictor_logits = fn
        FP._scores = jax.jit(fn)
        _, m = FP.fit_one(x, y, 768, 1e-3, fc, seed=layer)
        out.append({"layer": layer, "predictor": name, "lookahead": True, "recall": m["recall"], "epochs": m["epochs_run"]})
        print(out[-1], flush=True)
json.dump(out, open("/tmp/dv/exp/relu_pred.json", "w"), indent=1)

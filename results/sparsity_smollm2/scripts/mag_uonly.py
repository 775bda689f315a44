# Where to spend the rank: reduced-rank least squares (lookahead input -> exact pre-activations) of (gate, up)
# jointly vs of up alone (score |u_hat|), at several ranks; SmolLM2 layer(s) given, fit_report's held-out split.
import json, sys
import numpy as np, jax, jax.numpy as jnp
from dejavu_jax import model as M
from dejavu_jax.checkpoint import load_checkpoint
from dejavu_jax.default_model import default_checkpoint
from dejavu_jax.sparse import normalize_input
from train.collect import load_collection
from train import fit_predictors as FP

cfg, params = load_checkpoint(default_checkpoint(), jnp.float32)
_, shards = load_collection("/tmp/dv/c4_smollm2")
data = FP.LayerData(shards)
F, D = cfg.ffn_size, cfg.hidden_size
out = {}
for layer in [int(a) for a in sys.argv[1].split(",")]:
    lp = params["layers"][layer]
    n = data.get("mlp", layer).shape[0]
    perm = np.random.default_rng(2 * layer).permutation(n)
    n_val = int(round(0.05 * n))
    val, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    ys = {k: jnp.asarray(FP.make_labels(data.get("neuron", layer)[val], k, False)) for k in (768, 384)}
    x = normalize_input(jnp.asarray(FP.predictor_input(data, "mlp", layer, True), jnp.float32))
    h = M.norm(lp["mlp_norm"], jnp.asarray(data.get("mlp", layer), jnp.float32), cfg)
    x1 = jnp.concatenate([x, jnp.ones((n, 1))], 1)
    xt, xv = x1[tr], x1[val]
    C = xt.T @ xt
    C = C + 1e-3 * jnp.mean(jnp.diag(C)) * jnp.eye(D + 1)
    L = jnp.linalg.cholesky(C)
    res = {}
    for name, w in (("gate_up", jnp.concatenate([lp["up"][:, 0], lp["up"][:, 1]], 0)), ("up_only", lp["up"][:, 1])):
        W = jnp.linalg.solve(C, (xt.T @ h[tr]) @ w.T)  # [D+1, n_out]
        _, _, Vt = jnp.linalg.svd(L.T @ W, full_matrices=False)
        for r in (64, 128, 192, 256):
            pred = xv @ W @ Vt[:r].T @ Vt[:r]
            s = jnp.abs(pred) if name == "up_only" else jnp.abs(jax.nn.silu(pred[:, :F]) * pred[:, F:])
            res[f"{name}/rrr{r}"] = {f"recall@{'50' if k == 768 else '25'}%": round(FP.recall_precision(s, y, k)[0], 4)
                                     for k, y in ys.items()}
        g = h[val] @ w.T
        res[f"{name}/median_abs_preact"] = float(jnp.median(jnp.abs(g)))
    out[layer] = res
    print(layer, json.dumps(res), flush=True)
json.dump(out, open("/tmp/dv/exp_mag/mag_uonly.json", "w"), indent=1)

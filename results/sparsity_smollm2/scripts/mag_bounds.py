# Upper bounds for magnitude-form MLP scores on SmolLM2 layers 5/15/25 (recall@50%/25% on fit_report's held-out split):
# the exact |silu(g) u| of layer l computed from (a) its own MLP input, (b) the lookahead input (residual entering
# layer l-1), each at full rank and through the rank-r truncated SVD of the stacked gate/up weights; and (c) a
# reduced-rank least-squares map from either input -> (g, u) (rank r), scored as |silu(g_hat) u_hat|.
import json, sys
import numpy as np, jax, jax.numpy as jnp
from dejavu_jax.checkpoint import load_checkpoint
from dejavu_jax.default_model import default_checkpoint
from dejavu_jax.sparse import normalize_input
from train.collect import load_collection
from train import fit_predictors as FP

cfg, params = load_checkpoint(default_checkpoint(), jnp.float32)
_, shards = load_collection("/tmp/dv/c4_smollm2")
data = FP.LayerData(shards)
F = cfg.ffn_size
LAYERS = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [5, 15, 25]
out = {}


def rec(s, ys):
    return {f"recall@{'50' if k == 768 else '25'}%": round(FP.recall_precision(s, y, k)[0], 4) for k, y in ys.items()}


def score(gu):
    return jnp.abs(jax.nn.silu(gu[:, :F]) * gu[:, F:])


for layer in LAYERS:
    lp = params["layers"][layer]
    n = data.get("mlp", layer).shape[0]
    perm = np.random.default_rng(2 * layer).permutation(n)
    n_val = int(round(0.05 * n))
    val, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    imp = data.get("neuron", layer)
    ys = {k: jnp.asarray(FP.make_labels(imp[val], k, False)) for k in (768, 384)}
    w = lp["up"] * lp["mlp_norm"]["scale"][None, None, :]
    wc = jnp.concatenate([w[:, 0], w[:, 1]], 0)  # [2F, D]
    U, S, Vt = jnp.linalg.svd(wc, full_matrices=False)
    res = {}
    xm = normalize_input(jnp.asarray(data.get("mlp", layer)[val], jnp.float32))
    xl = normalize_input(jnp.asarray(FP.predictor_input(data, "mlp", layer, True)[val], jnp.float32))
    for name, x in (("own_mlp_input", xm), ("lookahead_input", xl)):
        res[f"{name}/full"] = rec(score(x @ wc.T), ys)
        for r in (64, 128, 256):
            wr = (U[:, :r] * S[:r]) @ Vt[:r]
            res[f"{name}/svd{r}"] = rec(score(x @ wr.T), ys)
    # reduced-rank regression on training rows: predictor input -> exact (g, u), then rank-r projection
    sub = np.sort(np.random.default_rng(1).choice(tr, 16384, replace=False))
    gt = normalize_input(jnp.asarray(data.get("mlp", layer)[sub], jnp.float32)) @ wc.T  # [n, 2F]
    for name, la, xv in (("own_mlp_input", False, xm), ("lookahead_input", True, xl)):
        xt = normalize_input(jnp.asarray(FP.predictor_input(data, "mlp", layer, la)[sub], jnp.float32))
        xt1 = jnp.concatenate([xt, jnp.ones((xt.shape[0], 1))], 1)
        Wls = jnp.linalg.solve(xt1.T @ xt1 + 1e-2 * jnp.eye(xt1.shape[1]), xt1.T @ gt)  # [D+1, 2F]
        xv1 = jnp.concatenate([xv, jnp.ones((xv.shape[0], 1))], 1)
        res[f"{name}/lstsq_full"] = rec(score(xv1 @ Wls), ys)
        _, _, Vf = jnp.linalg.svd(xt1 @ Wls, full_matrices=False)
        for r in (64, 128, 256):
            P = Vf[:r].T @ Vf[:r]
            res[f"{name}/rrr{r}"] = rec(score(xv1 @ Wls @ P), ys)
    out[layer] = res
    print(layer, json.dumps(res, indent=0), flush=True)
json.dump(out, open("/tmp/dv/exp_mag/mag_bounds.json", "w"), indent=1)

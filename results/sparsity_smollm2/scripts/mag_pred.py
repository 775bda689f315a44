# Magnitude-form MLP predictors vs the linear one on layers 5/15/25 (SmolLM2, lookahead input, recall@50%/25%).
# Same held-out split as fit_report (fit_one's permutation with seed 2*layer); training subsampled to
# N_TRAIN rows and EPOCHS epochs so one variant takes a minute or two on the shared 2-core CPU.
import json, sys, time
import numpy as np, jax, jax.numpy as jnp, optax
from dejavu_jax import model as M
from dejavu_jax.checkpoint import load_checkpoint
from dejavu_jax.default_model import default_checkpoint
from dejavu_jax.sparse import normalize_input
from train.collect import load_collection
from train import fit_predictors as FP

LAYERS = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [5, 15, 25]
VARIANTS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["linear", "mag", "mag_svd", "svd_only"]
import os
N_TRAIN, EPOCHS, R, LR = int(sys.argv[3]) if len(sys.argv) > 3 else 16384, int(os.environ.get("EPOCHS", 8)), 128, float(os.environ.get("LR", 1e-3))
LOOKAHEAD = True
cfg, params = load_checkpoint(default_checkpoint(), jnp.float32)
_, shards = load_collection("/tmp/dv/c4_smollm2")
data = FP.LayerData(shards)
F, D = cfg.ffn_size, cfg.hidden_size
EPS = 1e-3


def lin(p, x):
    z = normalize_input(x) @ p["a"]
    return z @ p["b"]


def heads(p, x):
    z = normalize_input(x) @ p["a"]
    return z @ p["bg"] + p["cg"], z @ p["bu"] + p["cu"]


def mag(p, x):  # scale * (log |silu(g)| + log |u|) + per-neuron bias
    g, u = heads(p, x)
    s = p["scale"] if "scale" in p else 1.0
    return s * (jnp.log(jnp.abs(jax.nn.silu(g)) + EPS) + jnp.log(jnp.abs(u) + EPS)) + p["bias"]


def rrr_init(layer, x_tr_rows, r, k):
    """Reduced-rank least squares: predictor input -> the layer's exact (gate, up), rank r; unit-variance z."""
    lp = params["layers"][layer]
    wc = jnp.concatenate([lp["up"][:, 0], lp["up"][:, 1]], 0) * lp["mlp_norm"]["scale"][None, :]  # [2F, D]
    x = normalize_input(jnp.asarray(FP.predictor_input(data, "mlp", layer, LOOKAHEAD)[x_tr_rows], jnp.float32))
    t = normalize_input(jnp.asarray(data.get("mlp", layer)[x_tr_rows], jnp.float32)) @ wc.T  # [n, 2F]
    x1 = jnp.concatenate([x, jnp.ones((x.shape[0], 1))], 1)
    W = jnp.linalg.solve(x1.T @ x1 + 1e-2 * jnp.eye(D + 1), x1.T @ t)  # [D+1, 2F]
    _, _, Vt = jnp.linalg.svd(x1 @ W, full_matrices=False)
    V = Vt[:r]  # [r, 2F]
    a = W[:D] @ V.T  # [D, r]
    c = W[D] @ V.T @ V  # [2F] constant part
    sd = jnp.std(x @ a, axis=0) + 1e-6
    a, V = a / sd, V * sd[:, None]
    p = {"a": a, "bg": V[:, :F], "bu": V[:, F:], "cg": c[:F], "cu": c[F:], "scale": jnp.ones(()), "bias": jnp.zeros(F)}
    s0 = mag(p, x)  # offset so that about k of F logits are > 0 per token
    p["bias"] = p["bias"] - jnp.median(jnp.sort(s0, axis=1)[:, F - k])
    return p


def svd_init(layer, r):
    lp = params["layers"][layer]
    w = lp["up"] * lp["mlp_norm"]["scale"][None, None, :]  # [F, 2, D]: RMSNorm scale folded in
    wc = jnp.concatenate([w[:, 0], w[:, 1]], 0)  # [2F, D]
    U, S, Vt = jnp.linalg.svd(wc, full_matrices=False)
    a = Vt[:r].T  # [D, r]
    b = (U[:, :r] * S[:r]).T  # [r, 2F]
    return {"a": a, "bg": b[:, :F], "bu": b[:, F:], "cg": jnp.zeros(F), "cu": jnp.zeros(F), "bias": jnp.zeros(F)}


def rand_init(seed, n_heads):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    p = {"a": jax.random.normal(ks[0], (D, R)) / np.sqrt(D)}
    if n_heads == 1:
        p["b"] = jax.random.normal(ks[1], (R, F)) / np.sqrt(R)
    else:
        p.update(bg=jax.random.normal(ks[1], (R, F)) / np.sqrt(R), bu=jax.random.normal(ks[2], (R, F)) / np.sqrt(R),
                 cg=jnp.zeros(F), cu=jnp.zeros(F), bias=jnp.zeros(F))
    return p


def train(fn, p, x_tr, y_tr, x_val, ys_val, epochs, lr=LR, aux=None):
    w = jnp.mean(y_tr.astype(jnp.float32))
    bs = 1024
    steps = x_tr.shape[0] // bs
    opt = optax.adamw(lr, weight_decay=0.01)
    st = opt.init(p)

    @jax.jit
    def epoch(p, st, key):
        order = jax.random.permutation(key, x_tr.shape[0])[: steps * bs].reshape(steps, bs)

        def step(c, idx):
            p, st = c
            loss, g = jax.value_and_grad(lambda p: FP.balanced_bce(fn(p, x_tr[idx]), y_tr[idx], w))(p)
            up, st = opt.update(g, st, p)
            return (optax.apply_updates(p, up), st), loss

        (p, st), l = jax.lax.scan(step, (p, st), order)
        return p, st, l.mean()

    scoref = jax.jit(fn)
    key = jax.random.PRNGKey(0)
    best, hist = None, []
    for ep in range(epochs):
        key, sub = jax.random.split(key)
        p, st, loss = epoch(p, st, sub)
        s = scoref(p, x_val)
        rec = {k: FP.recall_precision(s, yv, k)[0] for k, yv in ys_val.items()}
        hist.append(round(rec[768], 4))
        if best is None or rec[768] > best[768]:
            best = rec
    return best, hist


out = json.load(open("/tmp/dv/exp_mag/mag_pred.json")) if len(sys.argv) > 4 else []
for layer in LAYERS:
    x = FP.predictor_input(data, "mlp", layer, LOOKAHEAD)
    imp = data.get("neuron", layer)
    n = x.shape[0]
    perm = np.random.default_rng(2 * layer).permutation(n)  # fit_one's split for the MLP predictor of `layer`
    n_val = int(round(0.05 * n))
    val, tr = np.sort(perm[:n_val]), perm[n_val:]
    tr = np.sort(np.random.default_rng(123).choice(tr, min(N_TRAIN, tr.size), replace=False))
    x_tr, x_val = jnp.asarray(x[tr], jnp.float32), jnp.asarray(x[val], jnp.float32)
    ys_val = {k: jnp.asarray(FP.make_labels(imp[val], k, False)) for k in (768, 384)}
    for var in VARIANTS:
        t0 = time.time()
        for k_train in (768, 384) if var in ("linear", "mag") else (768,):
            y_tr = jnp.asarray(FP.make_labels(imp[tr], k_train, False))
            if var == "linear":
                best, hist = train(lin, rand_init(layer, 1), x_tr, y_tr, x_val, ys_val, EPOCHS)
            elif var == "mag":
                best, hist = train(mag, rand_init(layer, 2), x_tr, y_tr, x_val, ys_val, EPOCHS)
            elif var == "mag_svd":
                best, hist = train(mag, svd_init(layer, R), x_tr, y_tr, x_val, ys_val, EPOCHS)
            elif var == "mag_rrr":
                best, hist = train(mag, rrr_init(layer, tr, R, k_train), x_tr, y_tr, x_val, ys_val, EPOCHS)
            elif var == "rrr_only":
                s = mag(rrr_init(layer, tr, R, k_train), x_val)
                best, hist = {k: FP.recall_precision(s, yv, k)[0] for k, yv in ys_val.items()}, []
            elif var == "svd_only":  # training-free: the truncated SVD's |silu(g) * u|, no lookahead fix-up
                s = mag(svd_init(layer, R), x_val)
                best, hist = {k: FP.recall_precision(s, yv, k)[0] for k, yv in ys_val.items()}, []
            row = {"layer": layer, "variant": var, "k_train": k_train, "rank": R, "train_rows": int(tr.size),
                   "epochs": EPOCHS, "lr": LR, "recall@50%": best[768], "recall@25%": best[384], "hist@50%": hist,
                   "seconds": round(time.time() - t0, 1)}
            out.append(row)
            print(row, flush=True)
            json.dump(out, open("/tmp/dv/exp_mag/mag_pred.json", "w"), indent=1)

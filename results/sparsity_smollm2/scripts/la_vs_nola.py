# Per-layer MLP/head predictor recall with vs without lookahead, on a few layers (same data, same recipe).
import json, sys
import numpy as np
from train.collect import load_collection
from train import fit_predictors as FP
man, shards = load_collection("/tmp/dv/c4_smollm2")
data = FP.LayerData(shards)
fc = FP.FitConfig(rank=128, epochs=12, patience=3)
out = []
for layer in (5, 15, 25):
    for kind in ("mlp", "heads"):
        imp = data.get("neuron" if kind == "mlp" else "head", layer)
        k = 768 if kind == "mlp" else 4
        y = FP.make_labels(imp, k, False)
        for la in (True, False):
            x = FP.predictor_input(data, kind, layer, la)
            _, m = FP.fit_one(x, y, k, 1e-3, fc, seed=layer)
            out.append({"layer": layer, "kind": kind, "lookahead": la, "recall": m["recall"], "epochs": m["epochs_run"]})
            print(out[-1], flush=True)
json.dump(out, open("/tmp/dv/exp/la_vs_nola.json", "w"), indent=1)

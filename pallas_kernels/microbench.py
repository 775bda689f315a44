"""Microbenchmark of the gathered kernels against XLA take+dot and the dense matvec.

Batch-1 decode is memory-bound, so every row reports the bytes the op must read (the selected
weight rows, plus activations) and the floor those bytes take at the measured copy bandwidth.

Timing: each measured function is one jit that applies the op to L distinct weight copies R times
(L * R applications, chained through `optimization_barrier` so XLA neither merges nor reorders them,
with no extra kernels). The L copies hold more selected bytes than the L2 cache, so every application
streams from HBM. The reported time is from GPU events of a profiler trace (jax.profiler, read back
with ProfileData): first kernel start to last kernel end of a call, median over 5 calls, divided by
L * R, so launch gaps inside the call count; the summed kernel durations and the host wall time
(median of many calls minus an empty call) are reported beside it. After warm-up only.

    python -m pallas_kernels.microbench --out DIR [--sweep] [--batch4] [--seconds N] [--quick]
        [--window-kv [--window-kv-heads KA ...] [--window-kv-seq S] [--window-kv-methods M ...]
                     [--window-kv-sweep-methods M ...]]
        [--up-norm] [--no-mlp] [--no-attention]
writes DIR/kernels.json (all rows), DIR/kernels.jsonl (rows as measured) and DIR/kernels.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import gather_attention as ga
from pallas_kernels._common import apply_norm, on_cpu
from pallas_kernels import gather_mlp as gm

OPT_6_7B_MLP = dict(D=4096, F=16384)
OPT_6_7B_ATTN = dict(D=4096, H=32, Dh=128)
DENSITIES = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _median_call_s(fn: Callable, args: Sequence, n_trials: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n_trials):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_OVERHEAD_S: float | None = None


def dispatch_overhead_s() -> float:
    """Median time of a jit call that does almost nothing: what a timed call costs besides work."""
    global _OVERHEAD_S
    if _OVERHEAD_S is None:
        tiny = jax.jit(lambda v: v + 1)
        _OVERHEAD_S = _median_call_s(tiny, (jnp.ones((8,), jnp.float32),), 200)
    return _OVERHEAD_S


def copy_bandwidth_gbs(n_bytes: int = 1 << 30) -> float:
    """Device copy bandwidth counting bytes read plus written (the floor's denominator)."""
    x = jax.random.normal(jax.random.key(0), (n_bytes // 2,), jnp.float16)
    add = jax.jit(lambda v: v + jnp.float16(1))  # one read, one write, no reuse
    t = _median_call_s(add, (x,), 20) - dispatch_overhead_s()
    try:  # prefer the kernel's own duration from the profiler
        calls = _device_events(add, (x,), 5)
    except Exception:
        calls = []
    if calls:
        t = statistics.median(sum(e[2] for e in c) for c in calls) / 1e9
    return 2 * n_bytes / t / 1e9


def flag_set_probe_main(script: str, doc: str, flag_sets: dict[str, str], run_one: Callable[[str], list[dict]],
                        stem: str, title: str, cols: Sequence[str], timeout_s: int = 500) -> None:
    """The command line of a probe that runs once per XLA flag set (scripts/*_probe.py): by default one
    subprocess of `script` per set (XLA_FLAGS must be set before JAX starts), each running
    `run_one(name)` with --one NAME; then out/stem.{json,md} over all rows, titled `title, <device>`.
    A set whose process fails leaves a row with its stderr's tail."""
    import argparse
    import subprocess
    from pathlib import Path

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--one", choices=sorted(flag_sets), help="run one flag set in this process")
    p.add_argument("--sets", nargs="+", default=list(flag_sets), choices=sorted(flag_sets))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        (args.out / f"rows-{args.one}.json").write_text(json.dumps(run_one(args.one)))
        return
    all_rows = []
    for name in args.sets:
        env = dict(os.environ, XLA_FLAGS=flag_sets[name])
        proc = subprocess.run([sys.executable, script, "--out", str(args.out), "--one", name], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        sys.stdout.write(proc.stdout[-4000:])
        sys.stderr.write(proc.stderr[-3000:])
        rows_path = args.out / f"rows-{name}.json"
        if rows_path.exists():
            all_rows += json.loads(rows_path.read_text())
            rows_path.unlink()
        else:
            all_rows.append(dict(flags=name, case="(process failed)", error=proc.stderr[-300:]))
    device = jax.devices()[0].device_kind
    write_rows(args.out, stem, f"{title}, {device}", cols, all_rows, device=device, jax=jax.__version__,
               flag_sets=flag_sets)


def write_rows(out_dir, stem: str, title: str, cols: Sequence[str], rows: list[dict], **meta) -> None:
    """A probe's results: out_dir/stem.json ({**meta, "rows": rows}) and out_dir/stem.md (the title,
    then a markdown table of the rows by cols; a row without a column leaves its cell empty)."""
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(dict(**meta, rows=rows), f, indent=1)
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def chain(apply: Callable, n_layers: int, reps: int) -> Callable:
    """jit of reps x n_layers applications of apply(x, layer_params) -> y (any shape).

    Each application's input is the next fresh x, routed through an optimization_barrier together
    with the previous output, so the applications run one after another and none can be merged.
    """

    def run(xs, layers):  # xs: reps x [B, D]; layers: n_layers x params pytree
        outs, prev = [], None
        for r in range(reps):
            for layer in layers:
                x = xs[r]
                if prev is not None:
                    x, prev = jax.lax.optimization_barrier((x, prev))
                prev = apply(x, layer)
                outs.append(prev)
        return outs

    return jax.jit(run)


def chain_update(update: Callable, n_layers: int, reps: int) -> Callable:
    """Like `chain`, for ops that update a per-layer state in place: update(x, state, layer) -> state.

    Returns run(xs, states, layers) -> states, jitted with `states` donated: each layer's state
    (a KV cache) is threaded through its reps applications, so an op that aliases its state to its
    output writes into one buffer all along (no copies), as the decode step does with its cache.
    The previous application's state goes through the optimization_barrier with the next x (and is
    replaced by the barrier's output, which aliases it), so the applications run in order.
    """

    def run(xs, states, layers):
        states, last = list(states), None
        for r in range(reps):
            for i, layer in enumerate(layers):
                x = xs[r]
                if last is not None:
                    x, states[last] = jax.lax.optimization_barrier((x, states[last]))
                states[i] = update(x, states[i], layer)
                last = i
        return states

    return jax.jit(run, donate_argnums=1)


class _Threaded:
    """fn(xs, states, layers) -> states as a call on (xs, layers) that keeps the states: for timing
    a donating jit by repeated calls on the same arguments."""

    def __init__(self, fn: Callable, states):
        self.fn, self.states = fn, states

    def __call__(self, xs, layers):
        self.states = self.fn(xs, self.states, layers)
        return self.states


def _device_events(fn, args, n_calls: int) -> list[list[tuple[str, float, float]]]:
    """GPU activity (name, start_ns, duration_ns) of each of n_calls calls, from a profiler trace.

    Returns [] where the profiler yields no device plane (CPU, or CUPTI unavailable).
    """
    from jax.profiler import ProfileData

    calls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            for _ in range(n_calls):
                jax.block_until_ready(fn(*args))
                calls.append(None)
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return []
        events = []
        for plane in ProfileData.from_file(paths[0]).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if not line.name.startswith("Stream"):
                    continue
                events += [(ev.name, ev.start_ns, ev.duration_ns) for ev in line.events]
    if not events:
        return []
    # Calls are separated by host syncs: split the sorted events at the n_calls - 1 largest gaps.
    events.sort(key=lambda e: e[1])
    gaps = sorted(range(1, len(events)), key=lambda i: events[i][1] - (events[i - 1][1] +
                                                                     events[i - 1][2]))
    cuts = sorted(gaps[-(n_calls - 1):]) if n_calls > 1 else []
    bounds = [0] + cuts + [len(events)]
    return [events[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def time_per_application(apply, xs, layers, n_trials) -> dict:
    """Times per application of `apply` in microseconds.

    time_us: GPU time per application from profiler events (first kernel start to last kernel end
    of a call, median over calls, divided by applications), gaps between kernels included;
    kernel_us: summed kernel durations only (what a CUDA-graph launch would approach);
    wall_us: host wall time minus the empty-call overhead. time_us falls back to wall_us where no
    device trace is available.
    """
    return _time_calls(chain(apply, len(layers), len(xs)), xs, layers, n_trials)


def time_per_update(update, xs, states, layers, n_trials) -> dict:
    """time_per_application's numbers for update(x, state, layer) -> state (`chain_update`): each
    layer's state (e.g. its K/V caches) is updated in place from one call to the next."""
    fn = _Threaded(chain_update(update, len(layers), len(xs)), states)
    return _time_calls(fn, xs, layers, n_trials)


def _time_calls(fn, xs, layers, n_trials) -> dict:
    """time_per_application's numbers for fn(xs, layers), which applies an op len(xs) * len(layers) times."""
    n_apps = len(xs) * len(layers)
    total = _median_call_s(fn, (xs, layers), n_trials)
    out = dict(wall_us=max(total - dispatch_overhead_s(), 0.0) / n_apps * 1e6)
    try:
        calls = _device_events(fn, (xs, layers), 5)
    except Exception as e:  # profiler unavailable: keep the wall-clock number
        print(f"profiler failed: {e!r}", file=sys.stderr)
        calls = []
    if calls:
        spans = [(c[-1][1] + c[-1][2] - c[0][1]) / 1e3 / n_apps for c in calls]
        busy = [sum(e[2] for e in c) / 1e3 / n_apps for c in calls]
        per_name: dict[str, float] = {}
        for name, _, dur in calls[len(calls) // 2]:
            key = name[:48]
            per_name[key] = per_name.get(key, 0.0) + dur / 1e3 / n_apps
        out.update(time_us=statistics.median(spans), kernel_us=statistics.median(busy),
                   kernels={k: round(v, 2) for k, v in per_name.items()})
    else:
        out["time_us"] = out["wall_us"]
    return out


# --------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MlpCase:
    D: int
    F: int
    density: float
    dtype: str = "float16"

    @property
    def K(self) -> int:
        return max(int(round(self.F * self.density)), 1)


def _mlp_layers(case: MlpCase, n_layers: int, key):
    """n_layers independent (w_up [F,1,D], b_up [F,1], w_down [F,D], idx [K]) with random values."""
    dt = jnp.dtype(case.dtype)
    layers = []
    for l in range(n_layers):
        k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, l), 4)
        w_up = (jax.random.normal(k1, (case.F, 1, case.D), jnp.float32) * case.D ** -0.5).astype(dt)
        b_up = (jax.random.normal(k2, (case.F, 1), jnp.float32) * 0.1).astype(dt)
        w_down = (jax.random.normal(k3, (case.F, case.D), jnp.float32) * case.F ** -0.5).astype(dt)
        idx = jax.random.permutation(k4, case.F)[: case.K].astype(jnp.int32)
        layers.append((w_up, b_up, w_down, idx))
    return layers


def mlp_appliers(up_blocks: dict | None = None, down_blocks: dict | None = None):
    # On CPU (smoke runs only) the kernels run in interpret mode.
    up_blocks = dict(up_blocks or {}, interpret=on_cpu())
    down_blocks = dict(down_blocks or {}, interpret=on_cpu())

    def pallas_mlp(x, layer):
        w_up, b_up, w_down, idx = layer
        a = gm.gathered_up(x, w_up, idx, b_up, **up_blocks)
        return gm.gathered_down(a, w_down, idx, **down_blocks)

    def pallas_atomic_last_mlp(x, layer):  # split sums by atomics, last split casts (no XLA op)
        w_up, b_up, w_down, idx = layer
        a = gm.gathered_up(x, w_up, idx, b_up, **up_blocks)
        return gm.gathered_down(a, w_down, idx, **dict(down_blocks, combine="atomic_last"))

    def xla_mlp(x, layer):
        w_up, b_up, w_down, idx = layer
        a = gm.gathered_up_reference(x, w_up, idx, b_up)
        return gm.gathered_down_reference(a, w_down, idx)

    def dense_mlp(x, layer):
        w_up, b_up, w_down, _ = layer
        h = jnp.einsum("BD,FD->BF", x, w_up[:, 0], preferred_element_type=jnp.float32)
        a = jax.nn.relu(h + b_up[:, 0]).astype(x.dtype)
        return jnp.einsum("BF,FD->BD", a, w_down, preferred_element_type=jnp.float32).astype(x.dtype)

    def pallas_up(x, layer):  # x [B, D] -> [B, K]
        w_up, b_up, _, idx = layer
        return gm.gathered_up(x, w_up, idx, b_up, **up_blocks)

    def pallas_down(a, layer):  # a [B, K] -> [B, D]
        _, _, w_down, idx = layer
        return gm.gathered_down(a, w_down, idx, **down_blocks)

    def layernorm(x):  # the MLP's norm: unit scale, zero shift (its cost does not depend on the values)
        ones, zeros = jnp.ones(x.shape[-1:], x.dtype), jnp.zeros(x.shape[-1:], x.dtype)
        return ("layernorm", NORM_EPS, ones, zeros)

    def pallas_up_norm(x, layer):  # x [B, D] the residual, normalised inside the kernel -> [B, K]
        w_up, b_up, _, idx = layer
        return gm.gathered_up(x, w_up, idx, b_up, norm=layernorm(x), **up_blocks)

    def pallas_up_xla_norm(x, layer):  # the same with XLA's norm launches before the kernel
        w_up, b_up, _, idx = layer
        kind, eps, scale, shift = layernorm(x)
        return gm.gathered_up(apply_norm(x, scale, shift, kind=kind, eps=eps), w_up, idx, b_up, **up_blocks)

    return dict(pallas=pallas_mlp, pallas_atomic_last=pallas_atomic_last_mlp, xla=xla_mlp, dense=dense_mlp, pallas_up=pallas_up,
                pallas_down=pallas_down, pallas_up_norm=pallas_up_norm, pallas_up_xla_norm=pallas_up_xla_norm)


UP_METHODS = ("pallas_up", "pallas_up_norm", "pallas_up_xla_norm")  # the up kernel alone (up_blocks)


def _mlp_bytes(case: MlpCase, method: str) -> int:
    item = jnp.dtype(case.dtype).itemsize
    rows = case.F if method == "dense" else case.K
    n_mats = 1 if method in UP_METHODS + ("pallas_down",) else 2
    return n_mats * rows * case.D * item  # weight rows read; activations are negligible


def kernel_microbench(shapes: Sequence[dict] = (OPT_6_7B_MLP,),
                      densities: Sequence[float] = DENSITIES, dtype: str = "float16", *,
                      methods: Sequence[str] = ("pallas", "pallas_atomic_last", "xla", "dense"),
                      batch: int = 1,
                      n_layers: int = 8, reps: int = 4, n_trials: int = 30,
                      up_blocks: dict | None = None, down_blocks: dict | None = None,
                      bandwidth_gbs: float | None = None, log: Callable = print,
                      deadline: float = float("inf")) -> list[dict]:
    """Time the gathered MLP (up + down) per method, shape and density; one dict per row.

    Stops early (returning the rows so far) once time.perf_counter() passes `deadline`.

    Rows carry: time_us per application, bytes read, floor_us = bytes / copy bandwidth,
    x_floor = time / floor and achieved GB/s.
    """
    bw = bandwidth_gbs or copy_bandwidth_gbs()
    appliers = mlp_appliers(up_blocks, down_blocks)
    rows = []
    for shape in shapes:
        for density in densities:
            case = MlpCase(D=shape["D"], F=shape["F"], density=density, dtype=dtype)
            key = jax.random.key(hash((case.D, case.F, case.K)) % (2 ** 31))
            layers = _mlp_layers(case, n_layers, key)
            xs = [jax.random.normal(jax.random.fold_in(key, 10_000 + r), (batch, case.D),
                                    jnp.float32).astype(dtype) for r in range(reps)]
            acts = [jax.random.normal(jax.random.fold_in(key, 20_000 + r), (batch, case.K),
                                      jnp.float32).astype(dtype) for r in range(reps)]
            for method in methods:
                if time.perf_counter() > deadline:
                    return rows
                if method == "dense" and any(r["method"] == "dense" and r["D"] == case.D
                                             and r["F"] == case.F for r in rows):
                    dense_row = next(r for r in rows if r["method"] == "dense"
                                     and r["D"] == case.D and r["F"] == case.F)
                    rows.append({**dense_row, "density": density, "K": case.K})
                    continue
                inputs = acts if method == "pallas_down" else xs
                timing = time_per_application(appliers[method], inputs, layers, n_trials)
                t_us = timing.pop("time_us")
                n_bytes = _mlp_bytes(case, method)
                floor_us = n_bytes / (bw * 1e3)
                row = dict(op="mlp", method=method, D=case.D, F=case.F, K=case.K, density=density,
                           batch=batch, dtype=dtype, time_us=round(t_us, 2), bytes=n_bytes,
                           floor_us=round(floor_us, 2), x_floor=round(t_us / floor_us, 3),
                           gbs=round(n_bytes / (t_us * 1e3), 1), bandwidth_gbs=round(bw, 1),
                           up_blocks=up_blocks or {}, down_blocks=down_blocks or {},
                           **{k: (round(v, 2) if isinstance(v, float) else v)
                              for k, v in timing.items()})
                log(json.dumps(row))
                rows.append(row)
            del layers
    return rows


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def attention_microbench(head_densities: Sequence[float] = (0.25, 0.5, 1.0), *,
                         D: int = 4096, H: int = 32, Dh: int = 128, seq_len: int = 2048,
                         dtype: str = "float16", n_layers: int = 8, reps: int = 4,
                         n_trials: int = 20, bandwidth_gbs: float | None = None,
                         log: Callable = print, deadline: float = float("inf")) -> list[dict]:
    """Q projection + decode attention + out projection of the selected heads (MHA, batch 1)."""
    bw = bandwidth_gbs or copy_bandwidth_gbs()
    dt = jnp.dtype(dtype)
    rows = []
    for density in head_densities:
        Kh = max(int(round(H * density)), 1)
        key = jax.random.key(Kh)
        layers = []
        for l in range(n_layers):
            k1, k2, k3, k4, k5 = jax.random.split(jax.random.fold_in(key, l), 5)
            w_q = (jax.random.normal(k1, (H, Dh, D), jnp.float32) * D ** -0.5).astype(dt)
            w_o = (jax.random.normal(k2, (H, Dh, D), jnp.float32) * (H * Dh) ** -0.5).astype(dt)
            kc = jax.random.normal(k3, (1, H, seq_len, Dh), jnp.float32).astype(dt)
            vc = jax.random.normal(k4, (1, H, seq_len, Dh), jnp.float32).astype(dt)
            idx = jax.random.permutation(k5, H)[:Kh].astype(jnp.int32)
            layers.append((w_q, w_o, kc, vc, idx))
        valid = jnp.ones((1, seq_len), bool)
        xs = [jax.random.normal(jax.random.fold_in(key, 99 + r), (1, D), jnp.float32).astype(dt)
              for r in range(reps)]
        scale = Dh ** -0.5

        def pallas_attn(x, layer):
            w_q, w_o, kc, vc, idx = layer
            q = ga.gathered_head_proj(x, w_q, idx, interpret=on_cpu())
            o = ga.sparse_decode_attention(q, kc, vc, valid, idx, scale=scale, interpret=on_cpu())
            return ga.gathered_out_proj(o, w_o, idx, interpret=on_cpu())

        def xla_attn(x, layer):
            w_q, w_o, kc, vc, idx = layer
            q = ga.gathered_head_proj_reference(x, w_q, idx)
            o = ga.sparse_decode_attention_reference(q, kc, vc, valid, idx, scale=scale)
            return ga.gathered_out_proj_reference(o, w_o, idx)

        def dense_attn(x, layer):
            w_q, w_o, kc, vc, _ = layer
            all_heads = jnp.arange(H, dtype=jnp.int32)
            q = ga.gathered_head_proj_reference(x, w_q, all_heads)
            o = ga.sparse_decode_attention_reference(q, kc, vc, valid, all_heads, scale=scale)
            return ga.gathered_out_proj_reference(o, w_o, all_heads)

        def pallas_attn_core(q, layer):  # attention alone: q [1, Kh, Dh]
            _, _, kc, vc, idx = layer
            return ga.sparse_decode_attention(q, kc, vc, valid, idx, scale=scale,
                                              interpret=on_cpu())

        qs = [jax.random.normal(jax.random.fold_in(key, 199 + r), (1, Kh, Dh),
                                jnp.float32).astype(dt) for r in range(reps)]
        item = dt.itemsize
        proj_bytes = 2 * Kh * Dh * D * item
        kv_bytes = 2 * Kh * seq_len * Dh * item
        for method, fn, inputs, n_bytes in (
                ("pallas", pallas_attn, xs, proj_bytes + kv_bytes),
                ("xla", xla_attn, xs, proj_bytes + kv_bytes),
                ("dense", dense_attn, xs, 2 * H * Dh * D * item + 2 * H * seq_len * Dh * item),
                ("pallas_attention_only", pallas_attn_core, qs, kv_bytes)):
            if time.perf_counter() > deadline:
                return rows
            timing = time_per_application(fn, inputs, layers, n_trials)
            t_us = timing.pop("time_us")
            floor_us = n_bytes / (bw * 1e3)
            row = dict(op="attention", method=method, D=D, H=H, Dh=Dh, Kh=Kh, seq_len=seq_len,
                       density=density, dtype=dtype, time_us=round(t_us, 2), bytes=n_bytes,
                       floor_us=round(floor_us, 2), x_floor=round(t_us / floor_us, 3),
                       gbs=round(n_bytes / (t_us * 1e3), 1), bandwidth_gbs=round(bw, 1),
                       **{k: (round(v, 2) if isinstance(v, float) else v)
                          for k, v in timing.items()})
            log(json.dumps(row))
            rows.append(row)
        del layers
    return rows


# --------------------------------------------------------------------------------------------------
# Window K/V (the lazy KV mode's per-step recompute)
# --------------------------------------------------------------------------------------------------

OPT_6_7B_WINDOW_KV = dict(KV=32, Dh=128, D=4096, W=16)
# KV heads a lazy decode step recomputes: 8 (head density 0.25), 18 (16 active at 0.5 plus the
# 2 = ceil(32 / 16) refreshed round-robin), 32 (all).
WINDOW_KV_HEADS = (8, 18, 32)
# Block arguments the sweep tries (block_m stays at its minimum: B * W = 16 window rows at batch 1).
# Every size is a power of two and >= ga.MIN_DOT, as the kernel requires.
WINDOW_KV_SWEEP = (
    dict(block_n=16, block_d=256, num_warps=4),
    dict(block_n=32, block_d=256, num_warps=4),
    dict(block_n=64, block_d=256, num_warps=4),
    dict(block_n=128, block_d=256, num_warps=8),
    dict(block_n=32, block_d=512, num_warps=4),
    dict(block_n=16, block_d=512, num_warps=4, num_stages=3),
    dict(block_n=32, block_d=128, num_warps=4, num_stages=4),
    dict(block_n=32, block_d=256, num_warps=4, num_stages=3),
    dict(block_n=64, block_d=128, num_warps=4, num_stages=4),
    dict(block_n=64, block_d=512, num_warps=8, num_stages=3),
    dict(block_n=16, block_d=256, num_warps=4, num_stages=4),
    dict(block_n=16, block_d=128, num_warps=4, num_stages=4),
    dict(block_n=32, block_d=128, num_warps=4, num_stages=6),
    # Occupancy, a guess to test (session 9): the fused kernel at OPT-13B runs 3 x 23 x 2 = 138
    # programs whose pipeline buffers (an estimated 150-200 KB from the sweep's shared-memory
    # errors) allow one per SM, i.e. two waves on 132 SMs. Fewer stages could fit two per SM;
    # whole heads per program make one wave of 69.
    dict(block_n=64, block_d=256, num_warps=4, num_stages=2),
    dict(block_n=64, block_d=128, num_warps=4, num_stages=2),
    dict(block_n=128, block_d=128, num_warps=8, num_stages=2),
)


def check_window_kv_blocks(blocks: dict) -> None:
    """ga.check_window_kv_blocks for a partial block dict (the keys not given at their minimum)."""
    minimal = ga.WindowKVBlocks(block_m=ga.MIN_DOT, block_n=ga.MIN_DOT, block_d=ga.MIN_DOT)
    ga.check_window_kv_blocks(dataclasses.replace(minimal, **blocks))


WINDOW_KV_METHODS = ("pallas", "xla", "dense", "pallas_update", "pallas_scatter", "xla_update", "qkv_unfused",
                     "qkv_normed", "qkv_fused")
# Methods whose kernels take the window K/V blocks (the sweep's candidates).
WINDOW_KV_BLOCK_METHODS = ("pallas", "pallas_update", "pallas_scatter", "qkv_unfused", "qkv_normed", "qkv_fused")
NORM_EPS = 1e-5


def window_kv_microbench(heads_counts: Sequence[int] = WINDOW_KV_HEADS, *,
                         KV: int = 32, Dh: int = 128, D: int = 4096, W: int = 16, S: int = 256,
                         batch: int = 1, bias: bool = True, dtype: str = "float16",
                         methods: Sequence[str] = WINDOW_KV_METHODS,
                         blocks: dict | None = None, n_layers: int = 8, reps: int = 4,
                         n_trials: int = 20, bandwidth_gbs: float | None = None,
                         log: Callable = print, deadline: float = float("inf")) -> list[dict]:
    """K and V of Ka selected KV heads over a W-token window (`ga.gathered_window_kv`).

    Methods: "pallas" (the kernel, with `blocks` or its defaults), "xla" (its reference: jnp.take of
    the heads + einsum) and "dense" (the einsum over all KV heads, what the exact mode's projection
    of W tokens would read). The lazy KV mode's whole cache update (K/V written at the window's
    slots of per-layer [B, KV, S, Dh] caches, updated in place from one application to the next,
    `time_per_update`): "pallas_update" (`ga.gathered_window_kv_update`, one kernel, `blocks` too),
    "pallas_scatter" (the kernel above, then XLA's two scatters: the path it replaces) and
    "xla_update" (its reference). The lazy step's whole attention input, from the residual (x's
    window row 0) with the Ka heads split into Ka - r query heads and the r = ceil(KV / W) groups
    refreshed round-robin (Ka > r), K/V heads = Q heads (MHA), LayerNorm: "qkv_unfused"
    as the unfused step runs it (XLA norm, ring write and dedupe, gathered_head_proj,
    gathered_window_kv_update), "qkv_normed" (XLA norm and ring write, then gathered_window_qkv_update
    reading the normed ring: two fusions and one kernel) and "qkv_fused" as the fused step does
    (gathered_window_qkv_update normalising inside);
    their bytes add the query heads' rows. bytes = the weight rows the method reads (activations and the
    2 * B * Ka * W * Dh cache entries written < 1%); floor_us is those bytes at the copy bandwidth,
    sel_floor_us the selected heads' 2 * Ka * Dh * D rows (the dense row's speed-of-light were it
    to read only those). One dict per (Ka, method).
    """
    bw = bandwidth_gbs or copy_bandwidth_gbs()
    dt = jnp.dtype(dtype)
    item = dt.itemsize
    kernel_blocks = dict(blocks or {}, interpret=on_cpu())
    check_window_kv_blocks(blocks or {})

    def pallas_window_kv(x_win, layer):  # x_win [B, W, D] -> [2, B, Ka, W, Dh]
        w_kv, b, heads = layer[:3]
        return ga.gathered_window_kv(x_win, w_kv, heads, b, **kernel_blocks)

    def xla_window_kv(x_win, layer):
        w_kv, b, heads = layer[:3]
        return ga.gathered_window_kv_reference(x_win, w_kv, heads, b)

    def dense_window_kv(x_win, layer):  # every KV head: [2, B, KV, W, Dh]
        w_kv, b, _ = layer[:3]
        out = jnp.einsum("BTD,CKHD->CBKTH", x_win, w_kv, preferred_element_type=jnp.float32)
        if b is not None:
            out = out + b.astype(jnp.float32)[:, None, :, None, :]
        return out.astype(x_win.dtype)

    # The window's slots when this token's slot is s = S / 2 (ring order, as sparse.lazy_kv_update).
    slots = jnp.asarray([S // 2 - (S // 2 - t) % W for t in range(W)], jnp.int32)

    def pallas_update(x_win, caches, layer):  # caches (k, v), each [B, KV, S, Dh] -> updated
        w_kv, b, heads = layer[:3]
        return ga.gathered_window_kv_update(x_win, w_kv, heads, slots, *caches, b, **kernel_blocks)

    def pallas_scatter(x_win, caches, layer):
        w_kv, b, heads = layer[:3]
        kv_w = ga.gathered_window_kv(x_win, w_kv, heads, b, **kernel_blocks)  # [2, B, Ka, W, Dh]
        at = (slice(None), heads[:, None], slots[None, :])
        return tuple(cache.at[at].set(new, mode="drop") for cache, new in zip(caches, kv_w))

    def xla_update(x_win, caches, layer):
        w_kv, b, heads = layer[:3]
        return ga.gathered_window_kv_update_reference(x_win, w_kv, heads, slots, *caches, b)

    cur = (S // 2) % W  # this token's ring row

    n_refresh = -(-KV // W)  # sparse.refresh_groups

    def split_heads(heads):  # (query heads, refreshed groups) of a qkv row's Ka heads
        return heads[:heads.shape[0] - n_refresh], heads[heads.shape[0] - n_refresh:]

    # Both add the previous application's queries to theirs: a state entry that nothing reads is
    # dead code to XLA, and in session 8 it dropped 3 of 4 unfused Q projections (1.7 us for 16.8 MB).
    def qkv_unfused(x_win, state, layer):  # state (ring, k, v, q) -> updated
        win, k, v, q_prev = state
        w_kv, b, heads, w_q, b_q, scale, shift = layer
        q_idx, refresh = split_heads(heads)
        x = apply_norm(x_win[:, 0], scale, shift, kind="layernorm", eps=NORM_EPS)  # [B, D]
        win = jax.lax.dynamic_update_slice(win, x[:, None], (0, cur, 0))
        q = ga.gathered_head_proj(x, w_q, q_idx, b_q, interpret=on_cpu())
        groups = ga.first_occurrences(jnp.concatenate([q_idx, refresh]), KV)
        k, v = ga.gathered_window_kv_update(win, w_kv, groups, slots, k, v, b, **kernel_blocks)
        return win, k, v, q + q_prev

    def qkv_normed(x_win, state, layer):
        win, k, v, q_prev = state
        w_kv, b, heads, w_q, b_q, scale, shift = layer
        q_idx, refresh = split_heads(heads)
        x = apply_norm(x_win[:, 0], scale, shift, kind="layernorm", eps=NORM_EPS)  # [B, D]
        win = jax.lax.dynamic_update_slice(win, x[:, None], (0, cur, 0))
        q, win, k, v = ga.gathered_window_qkv_update(
            None, None, None, win, w_q, w_kv, q_idx, refresh, jnp.int32(cur), slots, k, v, b_q, b,
            norm_kind="layernorm", norm_eps=NORM_EPS, **kernel_blocks)
        return win, k, v, q + q_prev

    def qkv_fused(x_win, state, layer):
        win, k, v, q_prev = state
        w_kv, b, heads, w_q, b_q, scale, shift = layer
        q_idx, refresh = split_heads(heads)
        q, win, k, v = ga.gathered_window_qkv_update(
            x_win[:, 0], scale, shift, win, w_q, w_kv, q_idx, refresh, jnp.int32(cur), slots, k, v, b_q, b,
            norm_kind="layernorm", norm_eps=NORM_EPS, **kernel_blocks)
        return win, k, v, q + q_prev

    appliers = dict(pallas=pallas_window_kv, xla=xla_window_kv, dense=dense_window_kv)
    updaters = dict(pallas_update=pallas_update, pallas_scatter=pallas_scatter, xla_update=xla_update)
    qkv_updaters = dict(qkv_unfused=qkv_unfused, qkv_normed=qkv_normed, qkv_fused=qkv_fused)
    with_q = any(m in qkv_updaters for m in methods)
    if with_q and min(heads_counts) <= n_refresh:
        raise ValueError(f"the qkv methods need Ka > {n_refresh} (the refreshed groups) at KV={KV}, W={W}; "
                         f"got Ka {min(heads_counts)}")
    rows = []
    for n_sel in heads_counts:
        key = jax.random.key(1000 + n_sel)
        layers = []
        for l in range(n_layers):
            k1, k2, k3 = jax.random.split(jax.random.fold_in(key, l), 3)
            w_kv = (jax.random.normal(k1, (2, KV, Dh, D), jnp.float32) * D ** -0.5).astype(dt)
            b = (jax.random.normal(k2, (2, KV, Dh), jnp.float32) * 0.1).astype(dt) if bias else None
            heads = jax.random.permutation(k3, KV)[:n_sel].astype(jnp.int32)  # distinct, unsorted
            if with_q:  # query weights and the attention norm of the qkv rows
                k4, k5, k6 = jax.random.split(jax.random.fold_in(key, 500 + l), 3)
                w_q = (jax.random.normal(k4, (KV, Dh, D), jnp.float32) * D ** -0.5).astype(dt)
                b_q = (jax.random.normal(k5, (KV, Dh), jnp.float32) * 0.1).astype(dt) if bias else None
                scale = (1.0 + 0.1 * jax.random.normal(k6, (D,), jnp.float32)).astype(dt)
                layers.append((w_kv, b, heads, w_q, b_q, scale, jnp.zeros((D,), dt)))
            else:
                layers.append((w_kv, b, heads))
        xs = [jax.random.normal(jax.random.fold_in(key, 99 + r), (batch, W, D),
                                jnp.float32).astype(dt) for r in range(reps)]
        sel_bytes = 2 * n_sel * Dh * D * item
        sel_floor_us = sel_bytes / (bw * 1e3)
        for method in methods:
            if time.perf_counter() > deadline:
                return rows
            if method in updaters:
                caches = [tuple(jnp.zeros((batch, KV, S, Dh), dt) for _ in range(2)) for _ in layers]
                timing = time_per_update(updaters[method], xs, caches, layers, n_trials)
            elif method in qkv_updaters:
                n_q = n_sel - n_refresh
                states = [(jnp.zeros((batch, W, D), dt), *(jnp.zeros((batch, KV, S, Dh), dt) for _ in range(2)),
                           jnp.zeros((batch, n_q, Dh), dt)) for _ in layers]
                timing = time_per_update(qkv_updaters[method], xs, states, layers, n_trials)
            else:
                timing = time_per_application(appliers[method], xs, layers, n_trials)
            t_us = timing.pop("time_us")
            n_bytes = 2 * KV * Dh * D * item if method == "dense" else sel_bytes
            if method in qkv_updaters:
                n_bytes += (n_sel - n_refresh) * Dh * D * item  # the query heads' rows
            floor_us = n_bytes / (bw * 1e3)
            row = dict(op="window_kv", method=method, KV=KV, Dh=Dh, D=D, W=W, batch=batch,
                       Ka=n_sel, dtype=dtype, time_us=round(t_us, 2), bytes=n_bytes,
                       floor_us=round(floor_us, 2), x_floor=round(t_us / floor_us, 3),
                       sel_floor_us=round(sel_floor_us, 2),
                       gbs=round(n_bytes / (t_us * 1e3), 1), bandwidth_gbs=round(bw, 1),
                       blocks=(blocks or {}) if method in WINDOW_KV_BLOCK_METHODS else {},
                       **(dict(S=S) if method in updaters or method in qkv_updaters else {}),
                       **{k: (round(v, 2) if isinstance(v, float) else v)
                          for k, v in timing.items()})
            log(json.dumps(row))
            rows.append(row)
        del layers
    return rows


def window_kv_sweep(heads_counts: Sequence[int] = WINDOW_KV_HEADS,
                    configs: Sequence[dict] = WINDOW_KV_SWEEP, methods: Sequence[str] = ("pallas",),
                    **kw) -> list[dict]:
    """Each method of `methods` (WINDOW_KV_BLOCK_METHODS: the window K/V kernel alone by default)
    with each block config of `configs`, at every Ka; rows get sweep=True. kw:
    window_kv_microbench's shape, timing and deadline arguments."""
    for blocks in configs:
        check_window_kv_blocks(blocks)
    unknown = set(methods) - set(WINDOW_KV_BLOCK_METHODS)
    if unknown:
        raise ValueError(f"no window K/V blocks to sweep in {sorted(unknown)}; choose from {WINDOW_KV_BLOCK_METHODS}")
    rows = []
    for method in methods:
        for blocks in configs:
            try:
                new = window_kv_microbench(heads_counts, methods=(method,), blocks=blocks, **kw)
            except Exception as e:  # a tile the GPU compiler refuses (shared memory, registers)
                failed = dict(op="window_kv_failed", method=method, blocks=blocks,
                              error=f"{type(e).__name__}: {str(e)[:300]}")
                kw.get("log", print)(json.dumps(failed))
                rows.append(failed)
                continue
            rows += [dict(r, sweep=True) for r in new]
    return rows


def best_window_kv_blocks(rows: list[dict], method: str = "pallas") -> dict | None:
    """The window K/V sweep config of `method` with the least summed time over the Ka values at
    which every config was measured (None without a complete config)."""
    return _least_total_config([r for r in rows if r["op"] == "window_kv" and r.get("sweep")
                                and r["method"] == method], "blocks", "Ka")


# --------------------------------------------------------------------------------------------------
# Block-size sweep (tuning) and report
# --------------------------------------------------------------------------------------------------

UP_SWEEP = (
    dict(block_e=1, block_d=4096, num_warps=4), dict(block_e=2, block_d=2048, num_warps=4),
    dict(block_e=8, block_d=2048, num_warps=8), dict(block_e=8, block_d=1024, num_warps=4),
    dict(block_e=16, block_d=512, num_warps=4),
)
DOWN_SWEEP = (
    dict(block_e=32, block_d=512, num_warps=4),
    dict(block_e=32, block_d=512, num_warps=4, combine="partials"),
    dict(block_e=16, block_d=1024, num_warps=4, combine="partials"),
    dict(block_e=64, block_d=256, num_warps=4, combine="partials"),
    dict(block_e=128, block_d=32, k_splits=1, num_warps=4),
    dict(block_e=128, block_d=32, k_splits=1, num_warps=4, num_stages=4),
)


def sweep(shapes: Sequence[dict] = (OPT_6_7B_MLP,), densities=(0.1, 0.5),
          deadline: float = float("inf"), log: Callable = print,
          bandwidth_gbs: float | None = None, up_methods: Sequence[str] = ("pallas_up",),
          down: bool = True) -> list[dict]:
    """Up kernels (each of up_methods) and the down kernel (unless not down) alone over UP_SWEEP /
    DOWN_SWEEP configs, until the deadline."""
    rows = []
    for density in densities:
        for method, configs in (*((m, UP_SWEEP) for m in up_methods), *((("pallas_down", DOWN_SWEEP),) if down else ())):
            for blocks in configs:
                kw = dict(up_blocks=blocks) if method in UP_METHODS else dict(down_blocks=blocks)
                new = kernel_microbench(shapes, densities=(density,), methods=(method,), reps=2,
                                        n_trials=10, bandwidth_gbs=bandwidth_gbs, log=log,
                                        deadline=deadline, **kw)
                rows += [dict(r, sweep=True) for r in new]
    return rows


PALLAS_MLP = ("pallas", "pallas_atomic_last", "pallas_tuned")


def _least_total_config(sweep_rows: list[dict], blocks_key: str, point_key: str) -> dict | None:
    """The block config (row[blocks_key]) with the least summed time_us over the points
    (row[point_key] values) at which every config was measured; None without a complete config."""
    points = {r[point_key] for r in sweep_rows}
    totals: dict[str, list] = {}
    for r in sweep_rows:
        totals.setdefault(json.dumps(r[blocks_key], sort_keys=True), []).append(r["time_us"])
    complete = {k: sum(v) for k, v in totals.items() if len(v) == len(points)}
    return json.loads(min(complete, key=complete.get)) if complete else None


def best_blocks(rows: list[dict], method: str) -> dict | None:
    """The sweep config of `method` ("pallas_up" / "pallas_down") with the least summed time over
    the densities at which every config was measured."""
    key = "up_blocks" if method in UP_METHODS else "down_blocks"
    return _least_total_config([r for r in rows if r["method"] == method and r.get("sweep")],
                               key, "density")


def to_markdown(rows: list[dict], device: str) -> str:
    lines = [f"# Kernel microbenchmark\n\ndevice: {device}\n",
             "time = GPU span per layer from profiler events (first kernel start to last kernel end"
             " of a call / layers, gaps included); kernel = summed kernel durations per layer;"
             " wall = host wall time per layer minus an empty call. floor = bytes read / measured"
             " copy bandwidth.\n"]
    mlp = [r for r in rows if r["op"] == "mlp" and r["method"] in PALLAS_MLP + ("xla", "dense")]
    if mlp:
        lines += ["## MLP up+down (batch 1): summary per density\n",
                  "| D | F | density | K | best pallas | us | x floor | xla us | dense us |"
                  " floor us | faster than xla and dense |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for D, F, d in sorted({(r["D"], r["F"], r["density"]) for r in mlp}):
            by = {r["method"]: r for r in mlp if (r["D"], r["F"], r["density"]) == (D, F, d)}
            pallas = [by[m] for m in PALLAS_MLP if m in by]
            if not pallas:
                continue
            best = min(pallas, key=lambda r: r["time_us"])
            xla, dense = by.get("xla", {}).get("time_us"), by.get("dense", {}).get("time_us")
            wins = (xla is not None and dense is not None and best["time_us"] < min(xla, dense))
            lines.append(f"| {D} | {F} | {d} | {best['K']} | {best['method']} | {best['time_us']} |"
                         f" {best['x_floor']} | {xla} | {dense} | {best['floor_us']} | {wins} |")
        lines += ["\n## MLP up+down (batch 1): every method\n",
                  "| density | K | method | us | kernel us | wall us | x floor | GB/s | blocks |"
                  " kernels (us per layer) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(mlp, key=lambda r: (r["D"], r["F"], r["density"], r["method"])):
            blocks = {k: v for k, v in (("up", r["up_blocks"]), ("down", r["down_blocks"])) if v}
            lines.append(f"| {r['density']} | {r['K']} | {r['method']} | {r['time_us']} |"
                         f" {r.get('kernel_us', '')} | {r.get('wall_us', '')} | {r['x_floor']} |"
                         f" {r['gbs']} | {blocks or ''} | {r.get('kernels', '')} |")
    single = [r for r in rows if r["op"] == "mlp" and r["method"] in UP_METHODS + ("pallas_down",)]
    if single:
        lines += ["\n## Single kernels and block sizes\n",
                  "| kernel | density | blocks | us | kernel us | x floor | GB/s | kernels (us) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in single:
            blocks = r["up_blocks"] if r["method"] in UP_METHODS else r["down_blocks"]
            lines.append(f"| {r['method']} | {r['density']} | {blocks or 'default'} | "
                         f"{r['time_us']} | {r.get('kernel_us', '')} | {r['x_floor']} | "
                         f"{r['gbs']} | {r.get('kernels', '')} |")
    batch4 = [r for r in rows if r["op"] == "mlp_batch4"]
    if batch4:
        lines += ["\n## MLP up+down at batch 4 (same selected rows for the 4 rows)\n",
                  "| density | K | method | us | kernel us | x floor | GB/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in batch4:
            lines.append(f"| {r['density']} | {r['K']} | {r['method']} | {r['time_us']} |"
                         f" {r.get('kernel_us', '')} | {r['x_floor']} | {r['gbs']} |")
    attn = [r for r in rows if r["op"] == "attention"]
    if attn:
        lines += ["\n## Attention: Q proj + decode attention + out proj (batch 1, MHA)\n",
                  "| heads kept | seq | method | us | kernel us | floor us | x floor | GB/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in attn:
            lines.append(f"| {r['Kh']}/{r['H']} | {r['seq_len']} | {r['method']} | {r['time_us']} |"
                         f" {r.get('kernel_us', '')} | {r['floor_us']} | {r['x_floor']} |"
                         f" {r['gbs']} |")
    window = [r for r in rows if r["op"] == "window_kv" and not r.get("sweep")]
    if window:
        lines += ["\n## Window K/V of the selected KV heads (lazy KV mode's recompute)\n",
                  "sel floor = the selected heads' K and V rows (2 * Ka * Dh * D) / copy bandwidth;"
                  " floor = the method's own bytes (dense: all KV heads). *_update / pallas_scatter:"
                  " the whole lazy-KV cache update (K/V written into [B, KV, S, Dh] caches in place).\n",
                  "| Ka/KV | W | method | blocks | us | kernel us | wall us | floor us | x floor |"
                  " sel floor us | x sel floor | GB/s | kernels (us) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in window:
            lines.append(f"| {r['Ka']}/{r['KV']} | {r['W']} | {r['method']} |"
                         f" {r['blocks'] or ('default' if r['method'] in WINDOW_KV_BLOCK_METHODS else '')} | {r['time_us']} | {r.get('kernel_us', '')} |"
                         f" {r.get('wall_us', '')} | {r['floor_us']} | {r['x_floor']} |"
                         f" {r['sel_floor_us']} | {round(r['time_us'] / r['sel_floor_us'], 3)} |"
                         f" {r['gbs']} | {r.get('kernels', '')} |")
    failed = [r for r in rows if r["op"] == "window_kv_failed"]
    if failed:
        lines += ["\n## Window K/V sweep configs that did not build\n", "| method | blocks | error |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['blocks']} | {r['error'][:120]} |" for r in failed]
    swept = [r for r in rows if r["op"] == "window_kv" and r.get("sweep")]
    for method in dict.fromkeys(r["method"] for r in swept):
        window_sweep = [r for r in swept if r["method"] == method]
        lines += [f"\n## Window K/V block sweep: {method}\n",
                  f"best summed over Ka: {best_window_kv_blocks(rows, method)}\n",
                  "| Ka | blocks | us | kernel us | x floor | GB/s | best at this Ka |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(window_sweep, key=lambda r: (r["Ka"], r["time_us"])):
            fastest = min(x["time_us"] for x in window_sweep if x["Ka"] == r["Ka"])
            lines.append(f"| {r['Ka']} | {r['blocks']} | {r['time_us']} | {r.get('kernel_us', '')} |"
                         f" {r['x_floor']} | {r['gbs']} | {r['time_us'] == fastest} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pallas_kernels.microbench", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for kernels.json and kernels.md")
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES), help="MLP densities and head fractions")
    p.add_argument("--sweep", action="store_true", help="also sweep block sizes of each kernel")
    p.add_argument("--seconds", type=float, default=float("inf"),
                   help="stop starting new measurements after this many seconds")
    p.add_argument("--no-attention", action="store_true", help="skip the attention rows")
    p.add_argument("--no-mlp", action="store_true", help="skip the MLP rows (and the MLP sweep)")
    p.add_argument("--window-kv", action="store_true",
                   help="also time the lazy KV mode's window K/V kernel (with --sweep: its blocks)")
    p.add_argument("--window-kv-shape", type=int, nargs=4, metavar=("KV", "DH", "D", "W"),
                   default=[OPT_6_7B_WINDOW_KV[k] for k in ("KV", "Dh", "D", "W")])
    p.add_argument("--window-kv-heads", type=int, nargs="+", default=list(WINDOW_KV_HEADS),
                   metavar="KA", help="selected KV heads per window K/V row")
    p.add_argument("--window-kv-seq", type=int, default=256, metavar="S",
                   help="cache slots of the window K/V update rows (*_update, pallas_scatter)")
    p.add_argument("--window-kv-methods", nargs="+", default=list(WINDOW_KV_METHODS),
                   choices=WINDOW_KV_METHODS, help="window K/V methods to time (default: all)")
    p.add_argument("--window-kv-sweep-methods", nargs="+", default=["pallas"], choices=WINDOW_KV_BLOCK_METHODS,
                   help="methods the --sweep runs over WINDOW_KV_SWEEP (default: the window K/V kernel alone)")
    p.add_argument("--up-norm", action="store_true",
                   help="also time the up projection with the MLP's LayerNorm inside the kernel (gathered_up's "
                        "norm) against the XLA norm before it (with --sweep: both over UP_SWEEP)")
    p.add_argument("--batch4", action="store_true", help="also time the MLP at batch 4")
    p.add_argument("--quick", action="store_true", help="fewer trials (smoke run)")
    p.add_argument("--mlp-shape", type=int, nargs=2, metavar=("D", "F"),
                   default=[OPT_6_7B_MLP["D"], OPT_6_7B_MLP["F"]])
    p.add_argument("--attn-shape", type=int, nargs=4, metavar=("D", "H", "Dh", "SEQ"),
                   default=[OPT_6_7B_ATTN["D"], OPT_6_7B_ATTN["H"], OPT_6_7B_ATTN["Dh"], 2048])
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "kernels.jsonl")
    log_file = open(log_path, "w")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    deadline = time.perf_counter() + args.seconds
    device = str(jax.devices()[0].device_kind)
    bw = copy_bandwidth_gbs()
    log(json.dumps(dict(device=device, jax=jax.__version__, copy_bandwidth_gbs=round(bw, 1),
                        dispatch_overhead_us=round(dispatch_overhead_s() * 1e6, 1))))
    trials = 5 if args.quick else 15
    shapes = [dict(D=args.mlp_shape[0], F=args.mlp_shape[1])]
    attn_D, attn_H, attn_Dh, attn_seq = args.attn_shape
    common = dict(bandwidth_gbs=bw, log=log, deadline=deadline)
    # 1. defaults against XLA and dense, 2. attention, 3. batch 4, 4. block sweep of each kernel
    # alone, 5. the MLP again with the sweep's best blocks. Later stages drop at the deadline.
    rows = [] if args.no_mlp else kernel_microbench(shapes, densities=args.densities,
                                                     n_trials=trials, **common)
    if not args.no_attention:
        rows += attention_microbench(D=attn_D, H=attn_H, Dh=attn_Dh, seq_len=attn_seq,
                                     n_trials=trials, **common)
    win_KV, win_Dh, win_D, win_W = args.window_kv_shape
    window_kw = dict(KV=win_KV, Dh=win_Dh, D=win_D, W=win_W, n_trials=trials, **common)
    if args.window_kv:
        rows += window_kv_microbench(args.window_kv_heads, S=args.window_kv_seq,
                                     methods=args.window_kv_methods, **window_kw)
    if args.batch4:
        batch_rows = kernel_microbench(shapes, densities=(0.1, 0.5), batch=4,
                                       methods=("pallas", "xla", "dense"), n_trials=trials, **common)
        rows += [dict(r, op="mlp_batch4") for r in batch_rows]
    if args.sweep and args.window_kv:
        rows += window_kv_sweep(args.window_kv_heads, methods=args.window_kv_sweep_methods, **window_kw)
        log(json.dumps(dict(best_window_kv_blocks={m: best_window_kv_blocks(rows, m)
                                                   for m in args.window_kv_sweep_methods})))
    if args.up_norm:
        rows += kernel_microbench(shapes, densities=args.densities, methods=UP_METHODS, n_trials=trials, **common)
    if args.sweep and args.no_mlp and args.up_norm:  # the norm's two up variants only
        rows += sweep(shapes, densities=args.densities, up_methods=UP_METHODS[1:], down=False, **common)
        log(json.dumps({f"best_{m}_blocks": best_blocks(rows, m) for m in UP_METHODS[1:]}))
    elif args.sweep and not args.no_mlp:
        rows += sweep(shapes, up_methods=UP_METHODS if args.up_norm else ("pallas_up",), **common)
        up, down = best_blocks(rows, "pallas_up"), best_blocks(rows, "pallas_down")
        log(json.dumps(dict(best_up_blocks=up, best_down_blocks=down)))
        if up is not None and down is not None:
            tuned = kernel_microbench(shapes, densities=args.densities, methods=("pallas",),
                                      n_trials=trials, up_blocks=up, down_blocks=down, **common)
            for r in tuned:
                r["method"] = "pallas_tuned"
            rows += tuned
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(device=device, jax=jax.__version__, copy_bandwidth_gbs=bw,
                       argv=sys.argv, rows=rows), f, indent=1)
    md = to_markdown(rows, device)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()

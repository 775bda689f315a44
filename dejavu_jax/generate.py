"""Text generation: dense prefill, then a decode loop that runs entirely inside `jax.jit`.

    python -m dejavu_jax.generate --prompt "What is the capital of France?"
    python -m dejavu_jax.generate --model checkpoints/opt-125m --prompt-file prompts.txt --max-new-tokens 64

The decode loop is a `lax.while_loop` over a donated KV cache: the host launches it once and waits
once, so there is no host round trip per token (on a GPU the whole loop is one CUDA graph, see
DECODE_COMPILER_OPTIONS). Sampling: greedy (temperature 0), temperature,
top-k, top-p, a seed; rows stop at EOS or after max-new-tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from dejavu_jax import model as M
from dejavu_jax.cli import HelpFormatter
from dejavu_jax.config import ModelConfig


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    seed: int = 0

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_logits(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, M.NEG_INF, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, M.NEG_INF, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Prefill and the decode loop
# --------------------------------------------------------------------------------------------
def _partition(tree):
    """Split a selector into array leaves (traced) and everything else (static, closed over)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]
    dynamic = [x for x, a in zip(leaves, is_array) if a]
    static = [None if a else x for x, a in zip(leaves, is_array)]
    return dynamic, (treedef, static, is_array)


def _combine(dynamic, meta):
    treedef, static, is_array = meta
    it = iter(dynamic)
    return jax.tree_util.tree_unflatten(treedef, [next(it) if a else s for s, a in zip(static, is_array)])


# XLA:GPU runs a jitted program's kernels as CUDA graphs ("command buffers"). Two of its defaults
# cost the decode loop time, and the loop's jit overrides both (other backends ignore the options):
# * Scheduling. The default mode (LHS) chains every kernel after the one before it; CONCURRENT gives
#   the graph only the edges that buffer reads and writes need, so independent kernels overlap. In a
#   decode step that is what lookahead is for: layer l+1's predictor and top-K depend only on layer
#   l's input, not on its attention or MLP. Measured on an H200 (OPT-6.7B shapes, fp16, MLP 0.25 /
#   heads 0.5, results/xla-flags-h200-scheduling/): sparse 2.534 -> 2.333 ms/token, dense 4.019 -> 3.944.
# * The loop itself. By default a while loop is not captured: the host launches each iteration's
#   graph after copying the loop predicate back from the device, so every token pays a device-to-host
#   copy and a host wake-up while the GPU idles. With WHILE and CONDITIONAL among the captured
#   commands the whole decode loop is one graph whose conditional node tests the predicate on the
#   device. Measured on an H200 (same shapes, one process per setting, results/while-graph-h200/):
#   sparse 2.169-2.184 -> 2.100 ms/token, dense 3.957-4.011 -> 3.892. The list is XLA's default
#   command types plus those two.
DECODE_COMPILER_OPTIONS = {
    "xla_gpu_command_buffer_scheduling_mode": "CONCURRENT",
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL",
}
# DECODE_COMPILER_OPTIONS with XLA's default command types: the loop runs on the host (bench extras).
HOST_LOOP_OPTIONS = {k: v for k, v in DECODE_COMPILER_OPTIONS.items() if k != "xla_gpu_enable_command_buffer"}


def decode_compiler_options(options: dict | None = None) -> dict:
    """The XLA compiler options of the decode loop's jit: `options` (None: DECODE_COMPILER_OPTIONS,
    {}: XLA's defaults), dropped where the default backend is not a GPU."""
    options = DECODE_COMPILER_OPTIONS if options is None else options
    return dict(options) if jax.default_backend() == "gpu" else {}


@dataclasses.dataclass
class Generator:
    """Jitted prefill and decode loop for one model config, selector and sampling setup.

    decode_options: XLA compiler options of the decode loop (None: DECODE_COMPILER_OPTIONS on a GPU,
    HOST_LOOP_OPTIONS when streaming; {}: XLA's defaults, e.g. to time what the scheduling mode is worth).
    on_token: a host function called once per decode step, in order, with that step's tokens
    (np.ndarray [B] int32, -1 for rows that had already stopped): streaming. It costs a device-to-host
    copy and a host call per token, so the fast path leaves it None.
    """

    cfg: ModelConfig
    sampling: SamplingConfig = SamplingConfig()
    selector: Any = None  # a model.Selector; sparsity applies to decode only (prefill is dense)
    ops: Any = None  # pallas_kernels ops for gathered decode
    decode_options: dict | None = None
    on_token: Callable[[np.ndarray], None] | None = None

    def __post_init__(self):
        self._sel_dynamic, self._sel_meta = _partition(self.selector)
        options = self.decode_options
        if options is None and self.on_token is not None:
            # A host callback cannot run inside a CUDA graph's device-side loop.
            options = HOST_LOOP_OPTIONS
        self.prefill = jax.jit(self._prefill, donate_argnames=("cache",))
        self.decode = jax.jit(self._decode, static_argnames=("max_new_tokens",), donate_argnames=("cache",),
                              compiler_options=decode_compiler_options(options) or None)

    def _prefill(self, params, tokens, valid, cache):
        """tokens/valid [B, T] (left padded) -> (last logits [B, V], cache, next positions [B])."""
        positions = M.positions_from_valid(valid)
        logits, cache = M.forward(params, self.cfg, tokens, positions, cache, valid)
        return logits[:, -1], cache, positions[:, -1] + 1

    def _decode(self, params, sel_dynamic, cache, first_logits, positions, key, *, max_new_tokens: int):
        """Sample max_new_tokens tokens per row. Returns (tokens [B, N] int32, lengths [B], cache)."""
        selector = _combine(sel_dynamic, self._sel_meta)
        B = first_logits.shape[0]
        eos = -1 if self.cfg.eos_token_id is None else self.cfg.eos_token_id
        pad = 0 if self.cfg.pad_token_id is None else self.cfg.pad_token_id
        out = jnp.full((B, max_new_tokens), pad, jnp.int32)

        def cond(state):
            step, _, _, _, done, _, _ = state
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(state):
            step, logits, cache, pos, done, out, key = state
            key, sub = jax.random.split(key)
            tok = sample_logits(logits, sub, self.sampling)
            if self.on_token is not None:
                io_callback(self.on_token, None, jnp.where(done, -1, tok), ordered=True)
            tok = jnp.where(done, pad, tok)
            out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
            done = done | (tok == eos)
            logits, cache = M.forward(params, self.cfg, tok[:, None], pos[:, None], cache,
                                      selector=selector, ops=self.ops)
            return step + 1, logits[:, 0], cache, pos + 1, done, out, key

        state = (jnp.zeros((), jnp.int32), first_logits, cache, positions, jnp.zeros((B,), bool), out, key)
        step, _, cache, _, done, out, _ = jax.lax.while_loop(cond, body, state)
        is_eos = out == eos
        first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, step)
        return out, jnp.minimum(first_eos, step), cache


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per row (EOS included when hit)
    prompt_lengths: list[int]
    compile_s: float
    prefill_s: float  # time to first token, compile excluded
    decode_s: float
    new_tokens: int  # total over rows
    kv_mode: str = "exact"  # the decode cache's KV mode (`dejavu_jax.sparse`)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(t) for t in self.tokens) if self.tokens else 0
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def validate_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not (0 <= int(t) < cfg.vocab_size)]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
        if len(p) + max_new_tokens > cfg.max_positions:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new tokens that exceeds the "
                             f"model's {cfg.max_positions} positions (shorten the prompt or --max-new-tokens)")


def _bucket(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             sampling: SamplingConfig = SamplingConfig(), selector=None, ops=None, cache_dtype=None,
             generator: Generator | None = None, kv_mode: str = "exact",
             on_token: Callable[[np.ndarray], None] | None = None) -> GenerationResult:
    """Generate from token-id prompts (batched, left padded). Times compile, prefill and decode.

    kv_mode: "exact" (every head's K/V written at each token) or "lazy" (`dejavu_jax.sparse`: a
    gathered decode step computes K/V only for its heads' KV groups, over a window of stored inputs;
    same tokens, fewer weight bytes read). on_token: see `Generator` (ignored when `generator` is given:
    it has its own)."""
    from dejavu_jax.sparse import init_sparse_cache

    validate_prompts(cfg, prompts, max_new_tokens)
    gen = generator or Generator(cfg, sampling, selector, ops, on_token=on_token)
    B = len(prompts)
    T = _bucket(max(len(p) for p in prompts))  # bucketed so nearby prompt lengths share a compile
    tokens = np.full((B, T), cfg.pad_token_id or 0, np.int32)
    valid = np.zeros((B, T), bool)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = p
        valid[i, T - len(p):] = True
    cache_dtype = cache_dtype or params["layers"][0]["up"].dtype
    max_len = _bucket(T + max_new_tokens)
    key = jax.random.PRNGKey(sampling.seed)
    tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)

    t0 = time.perf_counter()
    new_cache = lambda: init_sparse_cache(cfg, B, max_len, cache_dtype, kv_mode=kv_mode)  # noqa: E731
    cache_shape = jax.eval_shape(new_cache)
    prefill_c = gen.prefill.lower(params, tokens, valid, cache_shape).compile()
    logits_shape, cache_shape2, pos_shape = jax.eval_shape(gen._prefill, params, tokens, valid, cache_shape)
    decode_c = gen.decode.lower(params, gen._sel_dynamic, cache_shape2, logits_shape, pos_shape, key,
                                max_new_tokens=max_new_tokens).compile()
    compile_s = time.perf_counter() - t0

    cache = new_cache()
    t0 = time.perf_counter()
    logits, cache, pos = prefill_c(params, tokens, valid, cache)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out, lengths, cache = decode_c(params, gen._sel_dynamic, cache, logits, pos, key)
    out = np.asarray(out)
    decode_s = time.perf_counter() - t0
    lengths = np.asarray(lengths)
    rows = [out[i, : lengths[i]].tolist() for i in range(B)]
    return GenerationResult(rows, [len(p) for p in prompts], compile_s, prefill_s, decode_s, int(lengths.sum()),
                            kv_mode)


# --------------------------------------------------------------------------------------------
# Text front end
# --------------------------------------------------------------------------------------------
def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text)["input_ids"]


class TextStream:
    """Writes one row's text to `out` as its tokens arrive (a `Generator.on_token`).

    The ids of the current line are decoded together each time, since a token can be a piece of a
    character (byte-level BPE) or lose its leading space when decoded alone; new text is written once
    the decoded string no longer ends in a partial character. A finished line starts a new group, so
    a long answer is not decoded again from its start at every token."""

    def __init__(self, tokenizer, out=None, row: int = 0):
        self.tokenizer, self.out, self.row = tokenizer, out or sys.stdout, row
        self.ids: list[int] = []
        self.written = 0  # characters of the decoded text already written

    def __call__(self, tokens: np.ndarray) -> None:
        tok = int(tokens[self.row])
        if tok < 0:  # the row stopped at an earlier step
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._write(text)
            if text.endswith("\n"):
                self.ids, self.written = [], 0

    def close(self) -> None:
        self._write(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = max(self.written, len(text))


def resolve_kernels(kernels: str) -> str:
    """--kernels auto -> "pallas" on a GPU, "xla" elsewhere; "xla" and "pallas" as given."""
    if kernels == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return kernels


def generate_text(model_dir: str | Path | None, prompts: Sequence[str], *, max_new_tokens: int = 32,
                  sampling: SamplingConfig = SamplingConfig(), dtype=None, chat: bool | None = None,
                  selector_args: dict | None = None, kernels: str = "auto", batch_select: str = "per-row",
                  kv_mode: str = "auto", stream=None) -> tuple[list[str], GenerationResult]:
    """Load a checkpoint (default: the embedded SmolLM2-135M-Instruct), tokenize, generate, decode.

    kv_mode: "exact", "lazy" or "auto" (`sparse.choose_kv_mode`: lazy where the gathered Pallas step of a
    multi-head model reads fewer weights with it, exact otherwise; the tokens are the same either way).
    stream: a text file (e.g. sys.stdout) to write the text to as it is generated; one prompt only."""
    from dejavu_jax.checkpoint import load_checkpoint, load_tokenizer

    from dejavu_jax.default_model import model_dir_or_default
    from dejavu_jax.sparse import choose_kv_mode

    if stream is not None and len(prompts) != 1:
        raise ValueError(f"streaming writes one prompt's text as it is generated; got {len(prompts)} prompts")
    model_dir = model_dir_or_default(model_dir)
    if dtype is None:
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    cfg, params = load_checkpoint(model_dir, dtype)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files; pass token ids to generate() instead")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
    selector, ops = None, None
    mode = (selector_args or {}).get("mode", "dense")
    backend = resolve_kernels(kernels)
    # Index sets (the gathered step) come from predictors, one per step: a single prompt, or the union.
    gathered = mode == "predictor" and (len(ids) == 1 or batch_select == "union")
    kv_mode = choose_kv_mode(kv_mode, cfg, gathered=gathered, kernels=backend)
    if mode != "dense":
        from dejavu_jax.sparse import build_selector, default_predictors
        from pallas_kernels import get_ops

        selector_args = dict(selector_args, predictors=default_predictors(model_dir, selector_args.get("predictors")))
        selector = build_selector(cfg, params, **selector_args)
        if batch_select == "union":  # one index set for the batch (dejavu_jax.batching); per-row is the default
            from dejavu_jax.batching import wrap_selector

            selector = wrap_selector(selector, batch_select="union")
        ops = get_ops(backend)
    streamer = TextStream(tokenizer, stream) if stream is not None else None
    result = generate(params, cfg, ids, max_new_tokens=max_new_tokens, sampling=sampling, selector=selector, ops=ops,
                      kv_mode=kv_mode, on_token=streamer)
    if streamer is not None:
        streamer.close()
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    return texts, result


def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ValueError(f"prompt file {path} does not exist")
        text = path.read_text()
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {args.prompt_file} (one prompt per non-empty line)")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    from dejavu_jax.sparse import KV_MODES, LAZY_WINDOW

    p = argparse.ArgumentParser(
        prog="python -m dejavu_jax.generate",
        description="Generate text with a dejavu_jax checkpoint, dense or contextually sparse. Without --model "
                    "it uses the embedded SmolLM2-135M-Instruct (converted once and cached).",
        formatter_class=HelpFormatter)
    src = p.add_argument_group("input")
    src.add_argument("--model", help="checkpoint directory made by `python -m convert` (default: embedded SmolLM2)")
    which = src.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the prompt text")
    which.add_argument("--prompt-file", help="file with one prompt per line ('-' reads stdin); prompts run as a batch")
    src.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap prompts in the tokenizer's chat template (default: when the model has one)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=64, help="stop each prompt after this many new tokens "
                   "(or at its end-of-sequence token)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the sampling (the same seed, the same text)")
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16 on GPU")
    out_mode = r.add_mutually_exclusive_group()
    out_mode.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    out_mode.add_argument("--stream", action="store_true",
                          help="print the text as it is generated (one prompt; a host call per token, so decode "
                               "is slower than without)")
    sp = p.add_argument_group("contextual sparsity (decode only; prefill is dense)")
    sp.add_argument("--mode", choices=["dense", "oracle", "predictor", "threshold"], default="dense")
    sp.add_argument("--mlp-density", type=float, default=1.0, help="fraction of MLP neurons kept per layer")
    sp.add_argument("--head-density", type=float, default=1.0, help="fraction of attention heads kept per layer")
    sp.add_argument("--predictors", help="predictor directory (default: MODEL/predictors)")
    sp.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=True,
                    help="predict layer l+1's neurons/heads from layer l's input")
    sp.add_argument("--mlp-topk-block", type=int, default=0, metavar="B",
                    help="predictor and oracle modes: rank the MLP neurons per block of B consecutive ones, "
                         "each block keeping its share of K (0 = one top-K over the layer; 128 is the fast "
                         "decode setting)")
    sp.add_argument("--kernels", choices=["auto", "xla", "pallas"], default="auto",
                    help="gathered-matmul backend of sparse decode: the Pallas kernels or XLA's take + dot; auto: "
                         "Pallas on a GPU, XLA elsewhere (on a CPU the kernels run in Pallas' slow interpreter)")
    sp.add_argument("--batch-select", choices=["per-row", "union"], default="per-row",
                    help="several prompts: per-row keep-masks (exact per row, dense compute) or one union index "
                         "set per step (top-K of the rows' summed predictor probabilities; gathered kernels)")
    sp.add_argument("--kv-mode", choices=("auto",) + KV_MODES, default="auto",
                    help="exact: every head's K/V written at each token; lazy (Deja Vu's scheme): a sparse step "
                         "computes K/V only for its selected heads' KV groups, over a window of the last "
                         f"{LAZY_WINDOW} inputs, and so reads fewer weights. The tokens are the same. auto: lazy "
                         "for predictor decoding of a multi-head model with the Pallas kernels (Llama-2-7B's shape "
                         "on an H100: 2.50 against 2.74 ms/token), exact otherwise (grouped-query models read "
                         "nearly every K/V group either way: Llama-3-8B ties, 2.80 against 2.79, and Qwen3-8B's "
                         "key norm makes lazy slower, 3.61 against 3.07)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dejavu_jax.checkpoint import CheckpointError, parse_dtype

    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
        prompts = _read_prompts(args)
        selector_args = None
        if args.mode != "dense":
            selector_args = dict(mode=args.mode, mlp_density=args.mlp_density, head_density=args.head_density,
                                 predictors=args.predictors, lookahead=args.lookahead,
                                 mlp_topk_block=args.mlp_topk_block)
        texts, result = generate_text(args.model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                      dtype=parse_dtype(args.dtype) if args.dtype else None, chat=args.chat,
                                      selector_args=selector_args, kernels=args.kernels,
                                      batch_select=args.batch_select, kv_mode=args.kv_mode,
                                      stream=sys.stdout if args.stream else None)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    stats = {"prompt_tokens": result.prompt_lengths, "new_tokens": result.new_tokens,
             "compile_s": round(result.compile_s, 3), "time_to_first_token_s": round(result.prefill_s, 4),
             "decode_s": round(result.decode_s, 4), "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
             "backend": jax.default_backend(), "kv_mode": result.kv_mode}
    if args.json:
        print(json.dumps({"texts": texts, **stats}))
    else:
        if not args.stream:  # streamed text is already out
            for prompt, text in zip(prompts, texts):
                if len(prompts) > 1:
                    print(f"### {prompt}")
                print(text)
        print(f"\n[{result.new_tokens} new tokens | time to first token {result.prefill_s * 1e3:.1f} ms | "
              f"decode {result.decode_tokens_per_s:.1f} tokens/s | compile {result.compile_s:.1f} s | "
              f"{jax.default_backend()}{' | kv ' + result.kv_mode if args.mode != 'dense' else ''}]",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

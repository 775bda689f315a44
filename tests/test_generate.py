"""Sampling, the jitted decode loop and the generate CLI."""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_to_jax, make_hf_model
from dejavu_jax.generate import (
    DECODE_COMPILER_OPTIONS,
    Generator,
    SamplingConfig,
    decode_compiler_options,
    generate,
    main as generate_main,
    resolve_kernels,
    sample_logits,
)


@pytest.fixture(scope="module")
def opt():
    return hf_to_jax(make_hf_model("opt-pre"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be a non-negative integer"),
])
def test_invalid_sampling_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draw = lambda s: np.array([int(sample_logits(logits, k, s)[0]) for k in keys[:200]])  # noqa: E731
    assert set(draw(SamplingConfig(temperature=1.0, top_k=2))) <= {0, 1}
    assert set(draw(SamplingConfig(temperature=1.0, top_p=0.75))) <= {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert set(draw(SamplingConfig(temperature=1.0, top_p=0.4))) == {0}
    full = draw(SamplingConfig(temperature=1.0))
    assert set(full) == {0, 1, 2, 3} and 0.35 < (full == 0).mean() < 0.65
    assert int(sample_logits(logits, keys[0], SamplingConfig())[0]) == 0


def test_prompt_validation(opt):
    cfg, params = opt
    with pytest.raises(ValueError, match="exceeds the model's 96 positions"):
        generate(params, cfg, [[5] * 90], max_new_tokens=10)
    with pytest.raises(ValueError, match=r"token ids outside \[0, 97\): \[97, -1\]"):
        generate(params, cfg, [[5, 97, -1]], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(params, cfg, [[5], []], max_new_tokens=4)


def test_batch_with_left_padding_equals_single_rows(opt):
    cfg, params = opt
    cfg = cfg.replace(eos_token_id=None)
    prompts = [[5, 17, 33, 8, 60, 12, 9], [44, 3], [70, 71, 72, 73]]
    batch = generate(params, cfg, prompts, max_new_tokens=12)
    for prompt, row in zip(prompts, batch.tokens):
        assert generate(params, cfg, [prompt], max_new_tokens=12).tokens[0] == row


def test_sampling_is_seeded_and_stops_at_eos(opt):
    cfg, params = opt
    s = SamplingConfig(temperature=1.0, top_k=20, seed=7)
    a = generate(params, cfg.replace(eos_token_id=None), [[5, 6, 7]], max_new_tokens=16, sampling=s).tokens
    b = generate(params, cfg.replace(eos_token_id=None), [[5, 6, 7]], max_new_tokens=16, sampling=s).tokens
    c = generate(params, cfg.replace(eos_token_id=None), [[5, 6, 7]], max_new_tokens=16,
                 sampling=SamplingConfig(temperature=1.0, top_k=20, seed=8)).tokens
    assert a == b and a != c
    # Make the first sampled token the EOS id: generation must stop right after it.
    eos = a[0][3]
    stopped = generate(params, cfg.replace(eos_token_id=eos), [[5, 6, 7]], max_new_tokens=16, sampling=s)
    assert stopped.tokens[0] == a[0][: a[0].index(eos) + 1]


def test_streaming_reports_every_step_in_order(opt):
    """on_token sees each decode step's tokens as they are sampled: a batch whose rows stop at
    different steps gets -1 for a row once it has stopped, and the streamed tokens are the result's."""
    cfg, params = opt
    prompts = [[5, 17, 33, 8], [44, 3], [70, 71, 72]]
    free = generate(params, cfg.replace(eos_token_id=None), prompts, max_new_tokens=12).tokens
    eos = free[1][4]  # row 1 stops at its 5th token; the others at their own first eos, if any
    plain = generate(params, cfg.replace(eos_token_id=eos), prompts, max_new_tokens=12)
    steps = []
    streamed = generate(params, cfg.replace(eos_token_id=eos), prompts, max_new_tokens=12,
                        on_token=lambda t: steps.append(np.asarray(t).copy()))
    assert streamed.tokens == plain.tokens and len(plain.tokens[1]) <= 5
    steps = np.stack(steps)  # [steps, B]
    assert len(steps) == max(len(t) for t in plain.tokens)
    for row, tokens in enumerate(plain.tokens):
        assert steps[: len(tokens), row].tolist() == tokens
        assert (steps[len(tokens):, row] == -1).all()


def test_decode_loop_scheduling_option(opt, monkeypatch):
    """On a GPU the decode loop compiles with DECODE_COMPILER_OPTIONS (concurrent CUDA-graph
    scheduling, the while loop captured in the graph); {} gives XLA's defaults; other backends get
    none. XLA validates the options' names and values on any backend, so compiling with them here
    catches a misspelt option or command type; they must not change a token."""
    cfg, params = opt
    cfg = cfg.replace(eos_token_id=None)
    assert decode_compiler_options() == (DECODE_COMPILER_OPTIONS if jax.default_backend() == "gpu" else {})
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")
        assert decode_compiler_options() == DECODE_COMPILER_OPTIONS and decode_compiler_options({}) == {}
        concurrent = Generator(cfg)  # the options are fixed when the jit is built
    serial = Generator(cfg, decode_options={})
    prompts = [[5, 17, 33, 8], [44, 3]]
    a = generate(params, cfg, prompts, max_new_tokens=10, generator=concurrent).tokens
    b = generate(params, cfg, prompts, max_new_tokens=10, generator=serial).tokens
    assert a == b and all(len(t) == 10 for t in a)


def test_kernels_auto_picks_pallas_on_a_gpu_only(monkeypatch):
    """--kernels auto (the default): the compiled Pallas kernels on a GPU, XLA's take + dot elsewhere
    (on a CPU the kernels would run in the interpreter); explicit choices pass through."""
    assert resolve_kernels("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_kernels("auto") == "pallas"
    assert resolve_kernels("xla") == "xla" and resolve_kernels("pallas") == "pallas"


def test_cli_generates_text_from_a_checkpoint(tiny_opt_ckpt, tmp_path, capsys, monkeypatch):
    assert generate_main(["--model", str(tiny_opt_ckpt), "--prompt", "the capital of", "--max-new-tokens", "8",
                          "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["texts"]) == 1 and out["new_tokens"] >= 1 and out["decode_tokens_per_s"] > 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nthe capital of france\n")
    assert generate_main(["--model", str(tiny_opt_ckpt), "--prompt-file", str(prompts), "--max-new-tokens", "4",
                          "--temperature", "0.7", "--top-p", "0.9", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["texts"]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("deja vu\n"))
    assert generate_main(["--model", str(tiny_opt_ckpt), "--prompt-file", "-", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and captured.out.strip()


def test_cli_stream_prints_the_same_text(tiny_opt_ckpt, tmp_path, capsys):
    argv = ["--model", str(tiny_opt_ckpt), "--prompt", "the capital of", "--max-new-tokens", "12"]
    assert generate_main(argv + ["--json"]) == 0
    text = json.loads(capsys.readouterr().out)["texts"][0]
    assert generate_main(argv + ["--stream"]) == 0
    captured = capsys.readouterr()
    assert captured.out == text + "\n" and "tokens/s" in captured.err
    prompts = tmp_path / "two.txt"
    prompts.write_text("hello world\nthe capital of\n")
    with pytest.raises(SystemExit) as e:
        generate_main(["--model", str(tiny_opt_ckpt), "--prompt-file", str(prompts), "--stream"])
    assert e.value.code == 2 and "got 2 prompts" in capsys.readouterr().err


def test_cli_help_states_defaults_once():
    """--help shows each option's default once, and no '(default: None)' where there is nothing to say."""
    from dejavu_jax.generate import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 64)" in text and "(default: 0.0)" in text
    assert text.count("(default: embedded SmolLM2)") == 1 and "SmolLM2) (default" not in text


@pytest.mark.parametrize("argv,match", [
    (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "x", "--top-p", "0"], "top_p must be in"),
    (["--prompt", "x", "--top-k", "-3"], "top_k must be"),
    (["--prompt", "x " * 200], "exceeds the model's 96 positions"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "does not exist"),
])
def test_cli_bad_input(tiny_opt_ckpt, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        generate_main(["--model", str(tiny_opt_ckpt), "--max-new-tokens", "4", *argv])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate_main(["--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert "does not exist" in capsys.readouterr().err


def test_cli_predictor_mode_reads_the_models_predictors(tiny_opt_ckpt, tmp_path, capsys):
    """--mode predictor without --predictors uses MODEL/predictors (as --help says); the per-block
    MLP top-K runs, and a block that does not divide the MLP width is refused by name."""
    import shutil

    from dejavu_jax.checkpoint import load_config
    from dejavu_jax.sparse import model_fingerprint, predictor_shapes, save_predictors

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_opt_ckpt, ckpt)
    cfg = load_config(ckpt)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32),
                                    predictor_shapes(cfg, 4), is_leaf=lambda x: isinstance(x, tuple))
    save_predictors(ckpt / "predictors", params,
                    {"rank": 4, "lookahead": True, "model_fingerprint": model_fingerprint(cfg)})
    argv = ["--model", str(ckpt), "--prompt", "the capital of", "--max-new-tokens", "4", "--mode", "predictor",
            "--mlp-density", "0.5", "--head-density", "0.5"]
    assert generate_main(argv + ["--mlp-topk-block", "16"]) == 0
    with pytest.raises(SystemExit):
        generate_main(argv + ["--mlp-topk-block", "24"])
    assert "does not divide the 64 MLP neurons" in capsys.readouterr().err
    # --kv-mode lazy (K/V of the selected heads' groups only, over the window): the same text as exact.
    # auto (the default, `sparse.choose_kv_mode`): this tiny OPT is multi-head, so lazy where --kernels auto
    # picks the Pallas kernels (a GPU), exact with XLA's take + dot (a CPU).
    auto = "lazy" if jax.default_backend() == "gpu" else "exact"
    texts = {}
    for kv_mode in ("exact", "lazy", "auto"):
        assert generate_main(argv + ["--max-new-tokens", "8", "--kv-mode", kv_mode, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["kv_mode"] == (kv_mode if kv_mode != "auto" else auto)
        texts[kv_mode] = out["texts"]
    assert texts["lazy"] == texts["exact"] == texts["auto"]

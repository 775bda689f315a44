"""The embedded SmolLM2-135M-Instruct end to end: GGUF -> cached checkpoint -> generate / perplexity.

These run the real model (slow): the default checkpoint is converted once per session into a
temporary cache, then used for a greedy chat answer and for WikiText-2 perplexity compared with
transformers torch (its own GGUF loader) on the same windows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dejavu_jax.default_model import DefaultModelError, default_checkpoint, default_gguf_path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "../shared/data"


def _parity_module():
    spec = importlib.util.spec_from_file_location("wikitext_parity", REPO_ROOT / "scripts" / "wikitext_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return default_gguf_path()
    except DefaultModelError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def checkpoint(gguf_path, tmp_path_factory) -> Path:
    return default_checkpoint(False, cache_dir=tmp_path_factory.mktemp("dejavu_cache"))


@pytest.mark.slow
def test_greedy_chat_answer_is_sensible(checkpoint):
    from dejavu_jax.generate import generate_text

    texts, result = generate_text(checkpoint, ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in texts[0], texts[0]
    assert result.new_tokens >= 2 and result.prefill_s > 0 and result.decode_s > 0


@pytest.mark.slow
def test_wikitext2_perplexity_matches_transformers(checkpoint, gguf_path):
    if not (DATA_DIR / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip(f"no WikiText-2 at {DATA_DIR}")
    res = _parity_module().parity(2, data_dir=DATA_DIR, checkpoint=checkpoint, gguf_path=gguf_path,
                                  progress=False)
    assert res["windows"] == 2 and res["tokens_scored"] == 2048
    # A sane language-model perplexity (SmolLM2-135M Q4_1 on WikiText-2 is ~20 on these windows) ...
    assert 5 < res["ppl_jax"] < 60, res
    # ... and the same number as transformers torch on the same windows (issue: within 0.5%).
    assert res["rel_diff"] < 0.005, res
    for w in res["per_window"]:
        assert abs(w["ppl_jax"] - w["ppl_torch"]) / w["ppl_torch"] < 0.005, w


@pytest.mark.slow
def test_tokenizer_from_gguf_in_checkpoint(checkpoint):
    from dejavu_jax.checkpoint import load_tokenizer

    tok = load_tokenizer(checkpoint)
    assert tok("What is the capital of France?")["input_ids"] == [1780, 314, 260, 3575, 282, 4649, 47]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                          "<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2


@pytest.mark.slow
def test_streamed_text_never_shows_a_partial_character(checkpoint):
    """Byte-level BPE splits a multi-byte character over several tokens: the stream holds text back
    until the character is whole, and what it writes in total is the decoded text."""
    import io

    import numpy as np

    from dejavu_jax.checkpoint import load_tokenizer
    from dejavu_jax.generate import TextStream

    tok = load_tokenizer(checkpoint)
    ids = tok("Coffee ☕ in a café,\nnaïve 日本\n\nend")["input_ids"]
    prefixes = [tok.decode(ids[:n]) for n in range(1, len(ids) + 1)]
    assert any(p.endswith("\ufffd") for p in prefixes)  # the case the stream has to handle is really there
    out = io.StringIO()
    stream = TextStream(tok, out, row=1)
    writes = []
    for t in ids:
        before = out.getvalue()
        stream(np.array([-1, t], np.int32))  # row 0 stopped; row 1 is streamed
        writes.append(out.getvalue()[len(before):])
    stream(np.array([-1, -1], np.int32))  # a step after the row stopped writes nothing
    stream.close()
    assert "\ufffd" not in out.getvalue()
    assert out.getvalue() == tok.decode(ids) + "\n"
    assert sum(1 for w in writes if w) > 1  # written piece by piece, not all at the end

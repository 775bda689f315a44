"""Tests for dejavu_jax.eval / dejavu_jax.tasks: prompt formats, metrics, batched scoring vs torch,
perplexity windowing, the CLI and its error messages. Tiny random models only (fast on 2 cores)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dejavu_jax import eval as ev
from dejavu_jax import tasks as tk
from dejavu_jax.tasks import TaskError

# --------------------------------------------------------------------------------------------
# Fixtures: a byte-level tokenizer with a few merges, a tiny Llama (transformers -> convert.hf)
# --------------------------------------------------------------------------------------------
MERGES = [("Ġ", "T"), ("ĠT", "r"), ("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("e", "r")]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cfg, params, torch model, tokenizer, hf dir) of a 2-layer GQA Llama with random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert.hf import load_hf

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 default so predictions are far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    cfg, params, _ = load_hf(str(d), progress=False)
    return cfg, params, model, tokenizer, d


def torch_loglikelihood(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    targets = torch.tensor(ids[1:])
    sel = slice(len(ids) - 1 - n_cont, len(ids) - 1)
    ll = logp[sel].gather(-1, targets[sel, None]).sum().item()
    greedy = bool((logits[sel].argmax(-1) == targets[sel]).all())
    return ll, greedy


# --------------------------------------------------------------------------------------------
# Task names, files and rows: errors name the problem
# --------------------------------------------------------------------------------------------
def test_unknown_task_lists_valid_names():
    with pytest.raises(TaskError) as e:
        tk.get_tasks("piqa,hellaswag")
    msg = str(e.value)
    assert "'hellaswag'" in msg and all(name in msg for name in tk.TASKS)
    assert [t.name for t in tk.get_tasks("all")] == list(tk.TASKS)
    assert [t.name for t in tk.get_tasks("rte, cb,rte")] == ["rte", "cb"]


def test_missing_data_file_names_path(tmp_path):
    with pytest.raises(TaskError, match=str(tmp_path / "tasks" / "copa.jsonl")):
        tk.load_examples(tk.TASKS["copa"], tmp_path)


def test_malformed_rows_name_file_and_line(tmp_path):
    (tmp_path / "tasks").mkdir()
    path = tmp_path / "tasks" / "cb.jsonl"
    good = {"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0}
    path.write_text(json.dumps(good) + "\n" + '{"premise": "p", "hypo\n')
    with pytest.raises(TaskError, match=r"cb\.jsonl:2: malformed row: not valid JSON"):
        tk.load_examples(tk.TASKS["cb"], tmp_path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": "maybe"}) + "\n")
    with pytest.raises(TaskError, match=r"cb\.jsonl:2: malformed cb row: field 'label' is 'maybe'"):
        tk.load_examples(tk.TASKS["cb"], tmp_path)
    path.write_text(json.dumps({"hypothesis": "h", "label": "neutral"}) + "\n")
    with pytest.raises(TaskError, match=r"cb\.jsonl:1: .*missing field 'premise'"):
        tk.load_examples(tk.TASKS["cb"], tmp_path)
    # --limit stops reading before a bad row further down
    path.write_text(json.dumps(good) + "\nnot json\n")
    assert len(tk.load_examples(tk.TASKS["cb"], tmp_path, limit=1)) == 1


# --------------------------------------------------------------------------------------------
# Prompt formats (lm-eval-harness)
# --------------------------------------------------------------------------------------------
def test_cb_and_rte_formats():
    ex = tk.parse_cb({"premise": "It rained.", "hypothesis": "the ground is wet", "label": "neutral"})
    ctx = "It rained.\nQuestion: the ground is wet. True, False, or Neither?\nAnswer:"
    assert ex.requests == ((ctx, " True"), (ctx, " False"), (ctx, " Neither")) and ex.gold == 2
    ex = tk.parse_rte({"premise": "A dog barks.", "hypothesis": "An animal makes noise.", "label": "not_entailment"})
    ctx = "A dog barks.\nQuestion: An animal makes noise. True or False?\nAnswer:"
    assert ex.requests == ((ctx, " True"), (ctx, " False")) and ex.gold == 1
    assert tk.parse_rte({"premise": "a", "hypothesis": "b", "label": "entailment"}).gold == 0


def test_copa_format():
    ex = tk.parse_copa({"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
                        "choice2": "Water flowed from the spout.", "question": "effect", "label": 1})
    ctx = "The man turned on the faucet therefore"
    # lm-eval: choices carry a leading space and the target delimiter adds another
    assert ex.requests == ((ctx, "  the toilet filled with water."), (ctx, "  water flowed from the spout."))
    assert ex.gold == 1
    ex = tk.parse_copa({"premise": "I slipped.", "choice1": "A", "choice2": "B", "question": "cause", "label": 0})
    assert ex.requests[0] == ("I slipped because", "  a") and ex.gold == 0


def test_lambada_openbookqa_piqa_winogrande_formats():
    ex = tk.parse_lambada({"text": "He said hello to\nher friend Anna"})
    assert ex.requests == (("He said hello to\nher friend", " Anna"),)
    ex = tk.parse_openbookqa({"id": "1", "question": {"stem": "Fog is likely around:", "choices": [
        {"text": "a marsh", "label": "A"}, {"text": "a desert", "label": "B"}]}, "answerKey": "A"})
    assert ex.requests == (("Fog is likely around:", " a marsh"), ("Fog is likely around:", " a desert"))
    assert ex.gold == 0 and ex.choices == ("a marsh", "a desert")
    ex = tk.parse_piqa({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0})
    assert ex.requests == (("Question: Open a jar\nAnswer:", " twist the lid"),
                           ("Question: Open a jar\nAnswer:", " eat the lid"))
    ex = tk.parse_winogrande({"context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"],
                              "continuation": "was sad.", "gold": 1, "answer": "2"})
    assert ex.requests == (("Sarah beat Maria so Sarah", " was sad."), ("Sarah beat Maria so Maria", " was sad."))
    assert ex.gold == 1
    with pytest.raises(ValueError, match="disagrees"):
        tk.parse_winogrande({"context_options": ["a", "b"], "continuation": "c", "gold": 1, "answer": "1"})


# --------------------------------------------------------------------------------------------
# Metrics from known loglikelihoods
# --------------------------------------------------------------------------------------------
def test_acc_and_acc_norm_with_known_loglikelihoods():
    task = tk.TASKS["piqa"]
    ex1 = tk.parse_piqa({"goal": "g", "sol1": "short", "sol2": "a much longer answer", "label": 1})
    ex2 = tk.parse_piqa({"goal": "g", "sol1": "aa", "sol2": "bb", "label": 0})
    # ex1: raw ll prefers the short choice (-6 > -10) but per character the long one wins
    # (-10/20 > -6/5): acc wrong, acc_norm right. ex2: both pick choice 0, which is gold.
    lls = {("Question: g\nAnswer:", " short"): -6.0, ("Question: g\nAnswer:", " a much longer answer"): -10.0,
           ("Question: g\nAnswer:", " aa"): -1.0, ("Question: g\nAnswer:", " bb"): -2.0}
    res = ev.evaluate_examples(task, [ex1, ex2], lambda reqs: [(lls[r], False) for r in reqs])
    assert res["acc"] == 0.5 and res["acc_norm"] == 1.0 and res["pred"] == [0, 0]


def test_cb_macro_f1_and_lambada_metrics():
    task = tk.TASKS["cb"]
    rows = [("entailment", " True"), ("contradiction", " True"), ("neutral", " Neither"), ("entailment", " True")]
    examples = [tk.parse_cb({"premise": f"p{i}", "hypothesis": "h", "label": lab}) for i, (lab, _) in enumerate(rows)]
    picks = {f"p{i}": pick for i, (_, pick) in enumerate(rows)}

    def ll_fn(reqs):
        return [(0.0 if cont == picks[ctx.split("\n")[0]] else -5.0, False) for ctx, cont in reqs]

    res = ev.evaluate_examples(task, examples, ll_fn)
    # preds [0, 0, 2, 0], golds [0, 1, 2, 0]: F1 class0 = 2*2/(4+1) = 0.8, class1 = 0, class2 = 1
    assert res["acc"] == 0.75 and res["f1"] == pytest.approx((0.8 + 0.0 + 1.0) / 3)

    lam = [tk.parse_lambada({"text": "a b c"}), tk.parse_lambada({"text": "d e f"})]
    res = ev.evaluate_examples(tk.TASKS["lambada_openai"], lam, lambda reqs: [(-1.0, True), (-3.0, False)])
    assert res["acc"] == 0.5 and res["perplexity"] == pytest.approx(math.exp(2.0))


# --------------------------------------------------------------------------------------------
# Tokenization and batched loglikelihoods vs transformers torch
# --------------------------------------------------------------------------------------------
def test_request_rows_follow_lm_eval_tokenization(tiny):
    *_, tokenizer, _ = tiny
    encode = ev.make_encoder(tokenizer)
    ctx, cont = "Answer: the ", "other"
    (row,) = ev.request_rows([(ctx, cont)], encode, prefix_id=tokenizer.bos_token_id, max_length=512)
    whole = tokenizer("Answer: the other", add_special_tokens=False)["input_ids"]
    ctx_ids = tokenizer("Answer: the", add_special_tokens=False)["input_ids"]  # trailing space moved
    assert list(row.inputs) == whole[:-1] and list(row.targets) == whole[1:]
    assert len(row.inputs) - row.score_from == len(whole) - len(ctx_ids)
    # empty context: conditioned on the prefix token
    (row,) = ev.request_rows([("", " the")], encode, prefix_id=7, max_length=512)
    assert row.inputs[0] == 7 and row.score_from == 0
    # left truncation to max_length + 1 tokens keeps the continuation scored
    (row,) = ev.request_rows([("x" * 50, " yz")], encode, prefix_id=7, max_length=16)
    assert len(row.inputs) == 16 and len(row) - row.score_from == 3


def test_loglikelihoods_match_torch(tiny):
    cfg, params, model, tokenizer, _ = tiny
    requests = [("The cat sat on the", " mat"), ("Question: Is water wet?\nAnswer:", " True"),
                ("Question: Is water wet?\nAnswer:", " False"), ("", " the start"), ("Hello ", "there friend"),
                ("A much longer context " * 6, " ends here."), ("x", "y")]
    encode = ev.make_encoder(tokenizer)
    # batch of 3 rows -> several batches, with padding rows in the last one
    scorer = ev.Scorer(params, cfg, batch_size=3)
    answers = ev.loglikelihoods(scorer, encode, requests, prefix_id=tokenizer.bos_token_id, max_length=512,
                                progress=False)
    rows = ev.request_rows(requests, encode, tokenizer.bos_token_id, 512)
    n_greedy = 0
    for (ll, greedy), row in zip(answers, rows):
        ids = [int(row.inputs[0])] + [int(t) for t in row.targets]
        ref_ll, ref_greedy = torch_loglikelihood(model, ids, len(row) - row.score_from)
        assert ll == pytest.approx(ref_ll, rel=1e-4, abs=1e-3)
        assert greedy == ref_greedy
        n_greedy += greedy
    assert all(a[0] < 0 for a in answers)
    # rows of lengths 4..~140 compile at most one shape per length bucket
    assert len(scorer.stats.shapes) <= 3


def test_greedy_flag_when_the_answer_is_forced(tiny):
    """A continuation made of the model's own greedy tokens is greedy; changing one token is not."""
    import torch

    cfg, params, model, tokenizer, _ = tiny
    ids = tokenizer("The cat", add_special_tokens=False)["input_ids"]
    for _ in range(4):  # greedy continuation of 4 tokens (by the torch twin of the model)
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    n_ctx = len(ids) - 4
    good = ev.Row(np.array(ids[:-1], np.int32), np.array(ids[1:], np.int32), n_ctx - 1)
    bad_ids = ids[:-1] + [(ids[-1] + 1) % cfg.vocab_size]
    bad = ev.Row(np.array(bad_ids[:-1], np.int32), np.array(bad_ids[1:], np.int32), n_ctx - 1)
    lp, greedy = ev.Scorer(params, cfg).score([good, bad], progress=False)
    assert greedy.tolist() == [True, False] and lp[0] > lp[1]


# --------------------------------------------------------------------------------------------
# Perplexity windowing
# --------------------------------------------------------------------------------------------
def _direct_logprobs(model, inputs: list[int], targets: list[int]) -> np.ndarray:
    """log p(targets[i] | inputs[: i + 1]) from one unpadded torch forward."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([inputs])).logits[0].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[:, None])[:, 0].numpy()


def test_perplexity_rows_cover_every_token_once():
    for n, L, S in [(10, 4, 4), (10, 4, 1), (11, 5, 3), (3, 8, 8)]:
        rows = ev.perplexity_rows(list(range(100, 100 + n)), 0, L, S)
        scored = [int(t) for r in rows for t in r.targets[r.score_from:]]
        assert scored == list(range(100, 100 + n))
        assert all(len(r) <= L for r in rows)
    with pytest.raises(ValueError, match="stride"):
        ev.perplexity_rows([1, 2, 3], 0, 4, 5)


def test_perplexity_windows_match_direct_computation(tiny):
    cfg, params, model, tokenizer, _ = tiny
    text = "The quick brown fox jumps over the lazy dog. " * 2
    encode = ev.make_encoder(tokenizer)
    ids = encode([text])[0]
    prefix = tokenizer.bos_token_id
    s = [prefix] + ids
    scorer = ev.Scorer(params, cfg, batch_size=4)
    for L, S in [(16, 16), (16, 5), (len(ids) + 1, len(ids) + 1)]:
        res = ev.perplexity(scorer, encode, text, prefix_id=prefix, context_length=L, stride=S, progress=False)
        # direct: token j is predicted from s[begin: j + 1], begin = the start of the window scoring it
        nll = 0.0
        for first in range(0, len(ids), S):
            end = min(first + S, len(ids))
            begin = max(0, end - L)
            nll -= _direct_logprobs(model, s[begin:end], ids[begin:end])[first - begin:].sum()
        assert res["nll"] == pytest.approx(nll, rel=1e-4)
        assert res["tokens_scored"] == len(ids)
        assert res["token_perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-4)
        assert res["words"] == len(text.split()) and res["bytes"] == len(text.encode())
        assert res["word_perplexity"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-4)
        assert res["bits_per_byte"] == pytest.approx(nll / len(text.encode()) / math.log(2), rel=1e-4)
    # --limit: only the first windows, words counted on the decoded scored tokens
    res = ev.perplexity(scorer, encode, text, prefix_id=prefix, context_length=16, limit=2, progress=False,
                        decode=tokenizer.decode)
    assert res["windows"] == 2 and res["tokens_scored"] == 32
    assert res["words"] == len(tokenizer.decode(ids[:32]).split())


def test_wikitext_join_and_c4_docs(tmp_path):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(" \n = Title = \n \n Some text . \n")
    text = tk.load_text(tk.TASKS["wikitext2"], tmp_path)
    assert text == "\n\n".join(["", " = Title = \n", "", " Some text . \n"])
    (tmp_path / "c4").mkdir()
    with gzip.open(tmp_path / "c4" / "c4_eval350.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "doc one", "url": "u"}) + "\n" + json.dumps({"text": "doc two"}) + "\n")
    assert tk.load_text(tk.TASKS["c4"], tmp_path) == "doc one\n\ndoc two"
    with gzip.open(tmp_path / "c4" / "c4_eval350.jsonl.gz", "wt") as f:
        f.write(json.dumps({"txt": "doc"}) + "\n")
    with pytest.raises(TaskError, match=r"c4_eval350\.jsonl\.gz:1: malformed row: missing string field 'text'"):
        tk.load_text(tk.TASKS["c4"], tmp_path)


# --------------------------------------------------------------------------------------------
# CLI end to end on a tiny checkpoint
# --------------------------------------------------------------------------------------------
def _write_tiny_data(root: Path) -> None:
    (root / "tasks").mkdir(parents=True)
    (root / "wikitext2").mkdir()
    (root / "c4").mkdir()
    (root / "wikitext2" / "wiki.test.raw").write_text(" \n = Title = \n \n The cat sat on the mat . \n" * 5)
    with gzip.open(root / "c4" / "c4_eval350.jsonl.gz", "wt") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"Document {i} is about the weather."}) + "\n")
    rows = {
        "cb": [{"premise": "It rained.", "hypothesis": "it is wet", "label": "entailment", "idx": 0}],
        "rte": [{"premise": "A dog.", "hypothesis": "An animal.", "label": "entailment", "idx": 0}],
        "copa": [{"premise": "It rained.", "choice1": "The grass was wet.", "choice2": "The sun shone.",
                  "question": "effect", "label": 0, "idx": 0}],
        "lambada_openai": [{"text": "the cat sat on the mat"}, {"text": "he went to the store"}],
        "openbookqa": [{"id": "1", "question": {"stem": "Water is", "choices": [
            {"text": "wet", "label": "A"}, {"text": "dry", "label": "B"}]}, "answerKey": "A"}],
        "piqa": [{"goal": "Open a jar", "sol1": "twist", "sol2": "eat", "label": 0}],
        "winogrande": [{"context_options": ["A beat B so A", "A beat B so B"], "continuation": "was sad.",
                        "gold": 1, "answer": "2"}],
    }
    for name, items in rows.items():
        (root / "tasks" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


def test_cli_end_to_end_and_errors(tiny, tmp_path, capsys):
    from dejavu_jax.checkpoint import save_checkpoint

    cfg, params, _, tokenizer, _ = tiny
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, params, tokenizer=tokenizer)
    data = tmp_path / "data"
    _write_tiny_data(data)
    out = tmp_path / "res" / "eval.json"
    rc = ev.main(["--model", str(ckpt), "--tasks", "all", "--data-dir", str(data), "--out", str(out),
                  "--context-length", "32", "--batch-size", "4", "--no-progress",
                  "--compile-cache", ""])
    assert rc == 0
    report = json.loads(out.read_text())
    assert list(report["tasks"]) == list(tk.TASKS)
    assert report["tasks"]["lambada_openai"]["n"] == 2 and 0 <= report["tasks"]["piqa"]["acc_norm"] <= 1
    assert report["tasks"]["wikitext2"]["tokens_scored"] == report["tasks"]["wikitext2"]["tokens_total"]
    assert report["tasks"]["c4"]["note"].startswith("c4_eval350")
    md = out.with_suffix(".md").read_text()
    assert "| winogrande | 1 |" in md and "held-out" in md
    assert report["meta"]["context_length"] == 32 and all(r["seconds"] > 0 for r in report["tasks"].values())

    capsys.readouterr()
    assert ev.main(["--model", str(ckpt), "--tasks", "piqa,boolq", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) 'boolq'" in err and "winogrande" in err
    assert ev.main(["--model", str(ckpt), "--tasks", "piqa", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere" / "tasks" / "piqa.jsonl") in capsys.readouterr().err
    (data / "tasks" / "piqa.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 3}\n')
    assert ev.main(["--model", str(ckpt), "--tasks", "piqa", "--data-dir", str(data), "--out", str(out),
                    "--no-progress"]) == 2
    assert "piqa.jsonl:1: malformed piqa row: field 'label' is 3" in capsys.readouterr().err


def test_sparse_selector_flows_through_scoring(tiny):
    """Oracle sparsity at density 1 scores exactly like dense; at low density the scores change."""
    sparse = pytest.importorskip("dejavu_jax.sparse")
    cfg, params, _, tokenizer, _ = tiny
    encode = ev.make_encoder(tokenizer)
    requests = [("The cat sat on the", " mat"), ("Question: Is water wet?\nAnswer:", " True")]

    def lls(selector):
        scorer = ev.Scorer(params, cfg, selector=selector)
        return np.array([a[0] for a in ev.loglikelihoods(scorer, encode, requests, prefix_id=tokenizer.bos_token_id,
                                                          max_length=64, progress=False)])

    dense = lls(None)
    full = sparse.build_selector(cfg, params, mode="oracle", mlp_density=1.0, head_density=1.0)
    if full is not None:
        np.testing.assert_allclose(lls(full), dense, rtol=1e-5, atol=1e-4)
    low = sparse.build_selector(cfg, params, mode="oracle", mlp_density=0.25, head_density=0.5)
    assert np.abs(lls(low) - dense).max() > 1e-2


def test_encode_cache_and_fewer_shapes_score_the_same(tiny):
    """A shared encode cache tokenizes each text once; larger shape buckets change no score."""
    cfg, params, _, tokenizer, _ = tiny
    calls = []

    def counting(texts, **kw):
        calls.append(len(texts))
        return tokenizer(texts, **kw)

    cache: dict = {}
    encode = ev.make_encoder(counting, cache)
    texts = ["The cat sat", "on the mat", "The cat sat"]
    assert encode(texts) == ev.make_encoder(tokenizer)(texts) and calls == [2]
    assert ev.make_encoder(counting, cache)(["on the mat"]) == encode(["on the mat"]) and calls == [2]

    requests = [("The cat sat on the", " mat"), ("Question: Is water wet?\nAnswer:", " True"), ("", "The end")]
    default = ev.Scorer(params, cfg)
    wide = ev.Scorer(params, cfg, min_bucket=128, min_scored=4096)
    lls = [ev.loglikelihoods(s, encode, requests, prefix_id=tokenizer.bos_token_id, max_length=64, progress=False)
           for s in (default, wide)]
    np.testing.assert_allclose([a for a, _ in lls[1]], [a for a, _ in lls[0]], rtol=1e-5, atol=1e-4)
    assert [g for _, g in lls[1]] == [g for _, g in lls[0]]
    assert {(T, K) for _, T, K in wide.stats.shapes} == {(128, 128)}


def test_shape_and_limit_arguments_are_checked(capsys):
    from dejavu_jax import report as R

    assert ev.main(["--tasks", "copa", "--min-bucket", "48"]) == 2
    assert "--min-bucket must be a positive power of two" in capsys.readouterr().err
    assert R.parse_limit("all") is None and R.parse_limit("3") == 3
    with pytest.raises(SystemExit):
        R.main(["sweep", "--limit", "0"])
    assert "expected a positive integer or 'all'" in capsys.readouterr().err

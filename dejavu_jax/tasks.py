"""Evaluation tasks: data loading, lm-eval-harness prompt formats, and per-task metrics.

Nothing here touches a model. A zero-shot task turns each document into loglikelihood requests
`(context, continuation)` and turns the answers `(loglikelihood, is_greedy)` back into metrics; a
perplexity task turns its file into one long text. `dejavu_jax.eval` does the model side.

Formats follow lm-eval-harness (v0.4 task YAMLs); facts, not code, were carried over:
- cb:  "{premise}\\nQuestion: {hypothesis}. True, False, or Neither?\\nAnswer:" + " True|False|Neither";
       label entailment/contradiction/neutral = 0/1/2; metrics acc and macro F1 over the 3 classes.
- rte: "{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:" + " True|False"; GLUE labels
       (entailment = 0 -> True). Our file is the SuperGLUE copy (premise/hypothesis), mapped as
       data/MANIFEST.md says.
- copa: premise without its final period + " because" / " therefore"; choices are " " + the choice
       with a lowercased first letter, and lm-eval's target delimiter " " is prepended on top, so the
       continuation starts with two spaces (lm-eval's actual behaviour, kept for comparability).
- lambada_openai: context = all but the last space-separated word; continuation = " " + last word;
       acc = every target token is the greedy argmax; perplexity = exp(-mean loglikelihood).
- openbookqa: question stem + " " + choice text; acc and acc_norm.
- piqa: "Question: {goal}\\nAnswer:" + " " + sol; acc and acc_norm.
- winogrande: partial scoring: each filled-in prefix is a context, the shared continuation is
       " " + the text after the blank; acc.
acc_norm divides each choice's loglikelihood by the character length of the choice text (without
the delimiter), as lm-eval does (`len(choice)`; equal to the byte length for ASCII text).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

# One loglikelihood request: the model scores `continuation` given `context`.
Request = tuple[str, str]
# What the model answers per request: (sum of log-probabilities of the continuation, is_greedy).
Answer = tuple[float, bool]


class TaskError(ValueError):
    """A task name, data file or data row that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One document of a zero-shot task, ready to score."""

    requests: tuple[Request, ...]
    gold: int  # index of the correct request (multiple choice); unused for lambada
    choices: tuple[str, ...] = ()  # choice texts for acc_norm lengths


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "perplexity" | "loglikelihood" | "multiple_choice"
    path: str  # relative to the data directory
    metrics: tuple[str, ...]
    parse: Callable[[dict], Example] | None = None  # zero-shot: one JSON row -> Example
    note: str = ""


# --------------------------------------------------------------------------------------------
# Row parsing (each raises KeyError/TypeError/ValueError with a short reason; the loader adds file:line)
# --------------------------------------------------------------------------------------------
def _field(row: dict, name: str, kind: type | tuple[type, ...] = str):
    if name not in row:
        raise ValueError(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"field {name!r} should be {want}, got {type(value).__name__} {value!r:.60}")
    return value


def _label(row: dict, name: str, mapping: dict) -> int:
    value = row.get(name)
    if value not in mapping:
        raise ValueError(f"field {name!r} is {value!r}, expected one of {sorted(mapping, key=str)}")
    return mapping[value]


def _nonempty(value: str, name: str) -> str:
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return value


CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}
CB_CHOICES = ("True", "False", "Neither")
RTE_LABELS = {"entailment": 0, "not_entailment": 1}  # GLUE convention: 0 = entailment
RTE_CHOICES = ("True", "False")


def _mc(context: str, choices: Sequence[str], gold: int, delimiter: str = " ") -> Example:
    """A multiple-choice example: one request per choice, the choice after lm-eval's target delimiter."""
    return Example(requests=tuple((context, delimiter + c) for c in choices), gold=gold, choices=tuple(choices))


def parse_cb(row: dict) -> Example:
    premise, hypothesis = _field(row, "premise"), _field(row, "hypothesis")
    context = f"{premise}\nQuestion: {hypothesis}. True, False, or Neither?\nAnswer:"
    return _mc(context, CB_CHOICES, _label(row, "label", CB_LABELS))


def parse_rte(row: dict) -> Example:
    # SuperGLUE fields mapped to lm-eval's GLUE rte: premise -> sentence1, hypothesis -> sentence2.
    sentence1, sentence2 = _field(row, "premise"), _field(row, "hypothesis")
    context = f"{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:"
    return _mc(context, RTE_CHOICES, _label(row, "label", RTE_LABELS))


def _copa_choice(text: str) -> str:
    return text[0].lower() + text[1:]


def parse_copa(row: dict) -> Example:
    premise = _nonempty(_field(row, "premise"), "premise")
    connector = {"cause": "because", "effect": "therefore"}.get(_field(row, "question"))
    if connector is None:
        raise ValueError(f"field 'question' is {row['question']!r}, expected 'cause' or 'effect'")
    context = premise.strip()[:-1] + f" {connector}"  # drop the final period
    choices = [" " + _copa_choice(_nonempty(_field(row, k), k)) for k in ("choice1", "choice2")]
    return _mc(context, choices, _label(row, "label", {0: 0, 1: 1}))


def parse_lambada(row: dict) -> Example:
    text = _field(row, "text")
    words = text.split(" ")
    if len(words) < 2 or not words[-1]:
        raise ValueError("field 'text' needs at least two space-separated words and no trailing space")
    return Example(requests=((" ".join(words[:-1]), " " + words[-1]),), gold=0)


def parse_openbookqa(row: dict) -> Example:
    question = _field(row, "question", dict)
    stem = _field(question, "stem")
    choices = _field(question, "choices", list)
    if not choices or not all(isinstance(c, dict) and isinstance(c.get("text"), str) and "label" in c
                              for c in choices):
        raise ValueError("question.choices should be a non-empty list of {text, label} objects")
    labels = [c["label"] for c in choices]
    answer = _field(row, "answerKey").lstrip()
    if answer not in labels:
        raise ValueError(f"answerKey {answer!r} is not one of the choice labels {labels}")
    return _mc(stem, [c["text"] for c in choices], labels.index(answer))


def parse_piqa(row: dict) -> Example:
    goal = _field(row, "goal")
    choices = [_field(row, "sol1"), _field(row, "sol2")]
    return _mc(f"Question: {goal}\nAnswer:", choices, _label(row, "label", {0: 0, 1: 1}))


def parse_winogrande(row: dict) -> Example:
    # lm-eval partial scoring: contexts differ (the blank filled with each option), the scored
    # continuation is shared: " " + the sentence after the blank.
    options = _field(row, "context_options", list)
    if len(options) != 2 or not all(isinstance(o, str) and o for o in options):
        raise ValueError("field 'context_options' should be a list of two non-empty strings")
    continuation = _nonempty(_field(row, "continuation"), "continuation")
    gold = _label(row, "gold", {0: 0, 1: 1})
    if "answer" in row and str(row["answer"]) != str(gold + 1):
        raise ValueError(f"field 'answer' {row['answer']!r} disagrees with 'gold' {gold}")
    return Example(requests=tuple((o, " " + continuation) for o in options), gold=gold)


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("wikitext2", "perplexity", "wikitext2/wiki.test.raw", ("token_perplexity", "word_perplexity", "bits_per_byte"),
         note="WikiText-2 raw test, rows joined with '\\n\\n'"),
    Task("c4", "perplexity", "c4/c4_eval350.jsonl.gz", ("token_perplexity", "word_perplexity", "bits_per_byte"),
         note="c4_eval350: 350 held-out documents of the C4 en train shard 0, a stand-in for C4 validation"),
    Task("cb", "multiple_choice", "tasks/cb.jsonl", ("acc", "f1"), parse_cb),
    Task("copa", "multiple_choice", "tasks/copa.jsonl", ("acc",), parse_copa),
    Task("lambada_openai", "loglikelihood", "tasks/lambada_openai.jsonl", ("acc", "perplexity"), parse_lambada),
    Task("openbookqa", "multiple_choice", "tasks/openbookqa.jsonl", ("acc", "acc_norm"), parse_openbookqa),
    Task("piqa", "multiple_choice", "tasks/piqa.jsonl", ("acc", "acc_norm"), parse_piqa),
    Task("rte", "multiple_choice", "tasks/rte.jsonl", ("acc",), parse_rte),
    Task("winogrande", "multiple_choice", "tasks/winogrande.jsonl", ("acc",), parse_winogrande),
]}


def get_tasks(names: str | Sequence[str]) -> list[Task]:
    """Comma-separated names (or a list; "all" = every task) -> tasks, or a TaskError listing valid names."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise TaskError(f"unknown task(s) {', '.join(map(repr, unknown))}; valid tasks: {', '.join(TASKS)} (or 'all')")
    if not names:
        raise TaskError(f"no tasks given; valid tasks: {', '.join(TASKS)} (or 'all')")
    return [TASKS[n] for n in dict.fromkeys(names)]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def task_path(task: Task, data_dir: str | Path) -> Path:
    path = Path(data_dir) / task.path
    if not path.is_file():
        raise TaskError(f"task {task.name}: data file {path} not found (see data/MANIFEST.md; "
                        f"--data-dir sets the data directory)")
    return path


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a TaskError names file:line for bad JSON."""
    rows = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: malformed row: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{path}:{lineno}: malformed row: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


def load_examples(task: Task, data_dir: str | Path, limit: int | None = None) -> list[Example]:
    """The first `limit` documents of a zero-shot task, formatted."""
    assert task.parse is not None, f"{task.name} is a perplexity task"
    path = task_path(task, data_dir)
    examples = []
    for lineno, row in read_jsonl(path, limit):
        try:
            examples.append(task.parse(row))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise TaskError(f"{path}:{lineno}: malformed {task.name} row: {e}") from None
    if not examples:
        raise TaskError(f"{path}: no rows")
    return examples


def load_text(task: Task, data_dir: str | Path) -> str:
    """The whole text a perplexity task scores (documents joined with a blank line)."""
    path = task_path(task, data_dir)
    if task.name == "wikitext2":
        # Rebuild the HF rows (MANIFEST.md): a blank line (" ") is an empty row, others get their "\n"
        # back; GPTQ / Deja Vu style perplexity joins the rows with "\n\n".
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines = lines[:-1]
        rows = [line + "\n" if line.strip() else "" for line in lines]
        return "\n\n".join(rows)
    docs = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row.get("text"), str):
            raise TaskError(f"{path}:{lineno}: malformed row: missing string field 'text'")
        docs.append(row["text"])
    if not docs:
        raise TaskError(f"{path}: no documents")
    return "\n\n".join(docs)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def macro_f1(preds: Sequence[int], golds: Sequence[int], num_classes: int) -> float:
    """Mean over classes of the one-vs-rest F1 (a class with no true or predicted members scores 0)."""
    preds, golds = np.asarray(preds), np.asarray(golds)
    scores = []
    for c in range(num_classes):
        tp = float(np.sum((preds == c) & (golds == c)))
        fp = float(np.sum((preds == c) & (golds != c)))
        fn = float(np.sum((preds != c) & (golds == c)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0)
    return float(np.mean(scores))


def score_examples(task: Task, examples: Sequence[Example], answers: Sequence[Sequence[Answer]]) -> dict[str, Any]:
    """Per-task metrics from the model's answers (answers[i][j] answers examples[i].requests[j]).

    Also returns per-example predictions ("pred") so runs can be compared example by example.
    """
    if len(examples) != len(answers):
        raise ValueError(f"{len(examples)} examples but {len(answers)} answer lists")
    if task.kind == "loglikelihood":
        lls = np.array([a[0][0] for a in answers], np.float64)
        greedy = np.array([a[0][1] for a in answers], bool)
        return {"acc": float(greedy.mean()), "perplexity": float(math.exp(-lls.mean())),
                "pred": greedy.astype(int).tolist()}
    preds, preds_norm, golds = [], [], []
    for ex, ans in zip(examples, answers):
        lls = np.array([a[0] for a in ans], np.float64)
        preds.append(int(np.argmax(lls)))
        if ex.choices:
            lengths = np.array([float(len(c)) for c in ex.choices])
            preds_norm.append(int(np.argmax(lls / lengths)))
        golds.append(ex.gold)
    preds_a, golds_a = np.array(preds), np.array(golds)
    out: dict[str, Any] = {"acc": float(np.mean(preds_a == golds_a))}
    if "acc_norm" in task.metrics:
        out["acc_norm"] = float(np.mean(np.array(preds_norm) == golds_a))
    if "f1" in task.metrics:
        out["f1"] = macro_f1(preds, golds, len(examples[0].requests))
    out["pred"] = preds
    return out

"""Continuous metrics that move at small scale: the gold answer's bits per byte (BPB) and, for
multiple choice, the probability of the correct option, as lm-eval tasks beside the accuracy ones.

Why: at the demo's scale (and at the paper's 1B-proxy scale for GSM8K and HumanEval) every arm
scores chance on MMLU and 0 on GSM8K / HumanEval, so accuracy cannot rank data recipes;
DataDecide and OLMES found that the likelihood of the gold answer does, long before accuracy
moves. One request per item scores the gold answer under the model:

- `gsm8k_bpb`: "Question: ...\\nAnswer:" -> " <reference solution>" (the whole worked solution,
  "#### N" line included), few-shot from GSM8K's train split (the offline pool), like `gsm8k`;
- `humaneval_bpb`: the problem prompt -> its canonical solution, 0-shot;
- `mmlu_bpb` (a group over the 57 subjects, size-weighted like `mmlu`): cloze form, "Question:
  ...\\nAnswer:" -> " <text of the correct option>", few-shot from each subject's dev split.
  Besides `bpb` it reports `p_correct`, the probability of the correct option among the four
  (softmax of the options' summed log-likelihoods, OLMES' and DataDecide's "correct prob"): that
  needs the other options' likelihoods too, so MMLU costs one request per option (4 per item,
  as `mmlu` itself); GSM8K and HumanEval cost one request per item.

BPB of an item = -(sum of the scored tokens' log-likelihoods) / ln 2 / (UTF-8 bytes of the
scored text); a task's value is the mean over items (so the paired statistics see one number
per item, as for accuracy). Lower is better.

Whitespace, which decides what is scored: lm-eval (0.4.x) scores a `loglikelihood` request's
target exactly as `doc_to_target` returns it, with no `target_delimiter` in between (the
delimiter only joins few-shot examples), and its tokeniser step moves the context's trailing
whitespace onto the target. So the space between "Answer:" and the answer lives in the target
here (`target_delimiter: ""`, target " <answer>"), and the bytes counted are those of the text
whose tokens are scored: the context's trailing whitespace + delimiter + target
(`scored_text`), e.g. HumanEval's "\\n" that ends the prompt plus the solution.
"""

from __future__ import annotations

import math
from typing import Any

LN2 = math.log(2.0)

# task name -> the accuracy task whose data (and, for MMLU, whose subjects) it reuses
SOURCES = {"mmlu_bpb": "mmlu", "gsm8k_bpb": "gsm8k", "humaneval_bpb": "humaneval"}
# task name -> metrics it reports ("bpb": lower is better; "p_correct": higher is better)
METRICS = {"mmlu_bpb": ("bpb", "p_correct"), "gsm8k_bpb": ("bpb",), "humaneval_bpb": ("bpb",)}
HIGHER_IS_BETTER = {"bpb": False, "p_correct": True}


def scored_text(context: str, target: str, delimiter: str = "") -> str:
    """The text whose tokens lm-eval scores: trailing whitespace of the context moves onto it."""
    ws = context[len(context.rstrip()):]
    return ws + delimiter + target


def bits_per_byte(loglikelihood: float, text: str) -> float:
    """-loglikelihood (nats) / ln 2 / UTF-8 bytes of `text`."""
    n = len(text.encode("utf-8"))
    if n == 0:
        raise ValueError("bits per byte of an empty target")
    return -float(loglikelihood) / LN2 / n


def softmax_at(lls: list[float], i: int) -> float:
    m = max(lls)
    z = sum(math.exp(x - m) for x in lls)
    return math.exp(lls[i] - m) / z


# ------------------------------------------------------------- prompts (shared by task and metric)

def qa_text(doc: dict) -> str:
    return f"Question: {doc['question'].strip()}\nAnswer:"


def gsm8k_target(doc: dict) -> str:
    return " " + doc["answer"]


def humaneval_text(doc: dict) -> str:
    return doc["prompt"]


def humaneval_target(doc: dict) -> str:
    return doc["canonical_solution"]


# ------------------------------------------------------------- per-item metrics (process_results)

def process_gsm8k(doc: dict, results: list) -> dict[str, float]:
    (ll, _greedy), = results
    return {"bpb": bits_per_byte(ll, scored_text(qa_text(doc), gsm8k_target(doc)))}


def process_humaneval(doc: dict, results: list) -> dict[str, float]:
    (ll, _greedy), = results
    return {"bpb": bits_per_byte(ll, scored_text(humaneval_text(doc), humaneval_target(doc)))}


def process_mmlu(doc: dict, results: list) -> dict[str, float]:
    lls = [float(r[0]) for r in results]
    gold = int(doc["answer"])
    text = scored_text(qa_text(doc), str(doc["choices"][gold]), " ")
    return {"bpb": bits_per_byte(lls[gold], text), "p_correct": softmax_at(lls, gold)}


# ------------------------------------------------------------- task configs

def _metric_list(task: str) -> list[dict]:
    return [{"metric": m, "aggregation": "mean", "higher_is_better": HIGHER_IS_BETTER[m]} for m in METRICS[task]]


def leaf_config(task: str, leaf: str, source: dict[str, Any], shots: int | None, fn, subject: str | None = None,
                dataset_name: str | None = None) -> dict[str, Any]:
    """The YAML of one leaf of a BPB task. `fn(name)` marks a `!function eval.tasks.bpb.<name>`."""
    base = {"task": leaf, **source, "metadata": {"version": 1.0, "attninf": "eval/tasks/bpb.py"}}
    if task == "gsm8k_bpb":
        return {**base, "output_type": "loglikelihood", "test_split": "test", "fewshot_split": "train",
                "doc_to_text": fn("qa_text"), "doc_to_target": fn("gsm8k_target"), "target_delimiter": "",
                "fewshot_delimiter": "\n\n", "num_fewshot": 5 if shots is None else int(shots),
                "process_results": fn("process_gsm8k"), "metric_list": _metric_list(task)}
    if task == "humaneval_bpb":
        return {**base, "output_type": "loglikelihood", "test_split": "test",
                "doc_to_text": fn("humaneval_text"), "doc_to_target": fn("humaneval_target"),
                "target_delimiter": "", "num_fewshot": 0,
                "process_results": fn("process_humaneval"), "metric_list": _metric_list(task)}
    if task == "mmlu_bpb":
        if source.get("dataset_path") != "parquet":  # the Hub copy names the subject as its config
            base["dataset_name"] = dataset_name
        return {**base, "output_type": "multiple_choice", "test_split": "test", "fewshot_split": "dev",
                "fewshot_config": {"sampler": "first_n"},
                "description": f"The following are questions (with answers) about {subject.replace('_', ' ')}.\n\n",
                "doc_to_text": fn("qa_text"), "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
                "target_delimiter": " ", "num_fewshot": 5 if shots is None else int(shots),
                "process_results": fn("process_mmlu"), "metric_list": _metric_list(task)}
    raise KeyError(task)


def group_config(task: str, leaves: list[str]) -> dict[str, Any]:
    """The group over a BPB task's leaves, aggregated like its accuracy twin (size-weighted)."""
    return {"group": task, "task": list(leaves),
            "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                      for m in METRICS[task]],
            "metadata": {"version": 1.0}}


def leaf_name(task: str, source_leaf: str) -> tuple[str, str | None]:
    """(our leaf name, subject) for one leaf of the source task (mmlu_anatomy -> mmlu_bpb_anatomy)."""
    if task == "mmlu_bpb":
        subject = source_leaf.removeprefix("mmlu_")
        return f"mmlu_bpb_{subject}", subject
    return task, None

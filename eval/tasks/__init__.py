"""lm-eval task overrides: the paper's shots and HumanEval settings, the offline benchmark data, our sandbox.

Why overrides and not new tasks: result keys must stay `mmlu`, `gsm8k`, `humaneval` (as on a
cluster), and the prompts, filters and metrics must stay lm-eval's own. So for every leaf task
of a requested task/group we write a small YAML into the stage folder that `include`s the
built-in YAML and changes only what the paper or the offline setting needs:

- `num_fewshot` (lm-eval's `num_fewshot` argument is global; the paper mixes 5, 4, 3 and 0 shots);
- the data source, when the offline benchmark data replaces a hub dataset (eval/benchmarks.py);
- HumanEval: the paper's sampling (n=20, temperature 0.2, top-p 0.95, 1,024 tokens) and our
  sandboxed `code_eval` (eval/code_exec.py). Its YAML is written in full rather than included,
  because loading the built-in one imports a module that fetches `code_eval` from the Hub.

Our own tasks `mmlu_bpb`, `gsm8k_bpb`, `humaneval_bpb` (eval/tasks/bpb.py: the gold answer's bits
per byte) are written in full the same way, on the data (offline or Hub) and subjects of the
accuracy task they mirror.

The generated files sit next to the results, so what ran is inspectable. They are registered on
top of the built-in task index (same names), so groups (`mmlu` -> 57 subjects) and their
aggregation work unchanged.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from eval.tasks import bpb

log = logging.getLogger(__name__)

# Built-in HumanEval stop sequences (lm-eval humaneval.yaml, BigCode harness).
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
# generation kwarg carrying a prompt + completion cap (BigCode's max_length_generation)
MAX_TOTAL_KEY = "attninf_max_total_tokens"


@dataclass
class HumanEvalSettings:
    """HumanEval decoding and execution. Defaults are the paper's (BigCode harness) settings."""

    n: int = 20                 # samples per problem (pass@1 estimated from n samples)
    temperature: float = 0.2
    top_p: float = 0.95
    max_gen_toks: int = 1024    # new tokens at most
    # BigCode harness `max_length_generation`: prompt + completion tokens (its 1,024 is what the
    # paper reports). Each request's new tokens are capped at max_length - prompt tokens (and at
    # max_gen_toks); null = only max_gen_toks (new tokens, lm-eval's meaning).
    max_length: int | None = 1024
    k: list[int] = field(default_factory=lambda: [1])
    timeout_s: float = 3.0      # per program, wall clock (HF code_eval default)
    memory_mb: int = 1024       # per program address space
    num_workers: int = 2        # programs executed in parallel
    isolate_network: bool = True  # sandbox=process only: `unshare -rn` when available
    # bwrap = bubblewrap namespaces (a boundary; refuses where unavailable); process = the
    # explicitly weaker separate-process mode (recorded in results.json).
    sandbox: str = "bwrap"

    def validate(self) -> None:
        from attninf.config import check

        check(self.n >= 1, "n", "must be >= 1")
        check(self.temperature >= 0, "temperature", "must be >= 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(self.max_gen_toks >= 1, "max_gen_toks", "must be >= 1")
        check(self.max_length is None or self.max_length >= 2, "max_length", "must be >= 2 (or null)")
        check(bool(self.k) and all(1 <= k <= self.n for k in self.k), "k",
              f"each k must be in [1, n={self.n}]")
        check(self.timeout_s > 0, "timeout_s", "must be > 0")
        check(self.memory_mb >= 64, "memory_mb", "must be >= 64")
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.sandbox in ("bwrap", "process"), "sandbox",
              f"must be bwrap or process, got {self.sandbox!r}")


class TaskPlanError(ValueError):
    """A requested task is unknown, or has no offline data under strict_offline."""


@dataclass
class TaskPlan:
    """What will run: top-level task names, the leaves overridden, and what was skipped (why)."""

    tasks: list[str]
    skipped: dict[str, str]
    leaves: dict[str, dict]  # leaf -> {"num_fewshot", "source"}
    tasks_dir: Path
    task_manager: Any  # lm-eval TaskManager seeing the overrides


class _Fn(str):
    """A `!function module.attr` reference when dumped to YAML."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Fn, lambda d, v: d.represent_scalar("!function", str(v)))


def _yaml_source(local: dict[str, Any]) -> dict[str, Any]:
    """Task keys from eval.benchmarks.dataset_source, its loader marked as a `!function`."""
    if "custom_dataset" in local:
        return {**local, "custom_dataset": _Fn(local["custom_dataset"])}
    return local


def builtin_task_manager():
    """lm-eval's TaskManager over the built-in tasks (indexing ~7 s; built once per process)."""
    global _TM
    if _TM is None:
        from lm_eval.tasks import TaskManager

        _TM = TaskManager()
    return _TM


_TM = None


def leaf_tasks(index: dict, name: str, _seen: set | None = None) -> list[str]:
    """All leaf task names under a task, group or tag, in index order."""
    from lm_eval.tasks._index import Kind

    _seen = set() if _seen is None else _seen
    if name in _seen:
        return []
    _seen.add(name)
    entry = index.get(name)
    if entry is None:
        raise KeyError(name)
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        return [name]
    if entry.kind == Kind.TAG:
        subs = sorted(entry.tags)
    else:
        subs = (entry.cfg or {}).get("task") or []
        subs = subs if isinstance(subs, list) else [subs]
    out: list[str] = []
    for s in subs:
        if isinstance(s, dict):  # inline subtask config: cannot be overridden by name
            log.warning("group %s has an inline subtask %s; left unchanged", name, s.get("task"))
            continue
        out += [t for t in leaf_tasks(index, s, _seen) if t not in out]
    return out


def humaneval_config(settings: HumanEvalSettings, source: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's HumanEval task with the paper's sampling and the sandboxed metric."""
    sample = settings.temperature > 0
    gen: dict[str, Any] = {"until": list(HUMANEVAL_STOP), "max_gen_toks": settings.max_gen_toks,
                           "do_sample": sample}
    if settings.max_length is not None:  # read (and removed) by eval.harness's HFLM
        gen[MAX_TOTAL_KEY] = settings.max_length
    if sample:
        gen |= {"temperature": settings.temperature, "top_p": settings.top_p}
    else:
        gen |= {"temperature": 0.0}
    return {
        "task": "humaneval",
        **source,
        "unsafe_code": True,
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{test}}\ncheck({{entry_point}})",
        "metric_list": [{
            "metric": _Fn("eval.code_exec.pass_at_k"), "aggregation": "mean",
            "higher_is_better": True, "k": list(settings.k), "timeout": settings.timeout_s,
            "memory_mb": settings.memory_mb, "num_workers": settings.num_workers,
            "isolate_network": settings.isolate_network, "sandbox": settings.sandbox}],
        "generation_kwargs": gen,
        "repeats": settings.n,
        "num_fewshot": 0,
        "filter_list": [{"name": "create_test", "filter": [
            {"function": "custom", "filter_fn": _Fn("eval.code_exec.build_predictions")}]}],
        "metadata": {"version": 1.0, "attninf": "sandboxed code_eval (eval/code_exec.py)"},
    }


def _prepare_bpb(index, name: str, out_dir: Path, shots: int | None,
                 offline_data: Callable[[str, str | None], dict | None] | None) -> dict[str, dict] | str:
    """Write a BPB task's leaf (and group) YAMLs; its leaves' plan, or why it has no data."""
    src = bpb.SOURCES[name]
    if src not in index:
        return f"lm-eval has no task '{src}' to take its data from"
    plan: dict[str, dict] = {}
    docs: dict[str, dict] = {}
    for leaf in leaf_tasks(index, src):
        cfg = index[leaf].cfg or {}
        source: dict[str, Any] = {"dataset_path": cfg.get("dataset_path")}
        if offline_data is not None:
            local = offline_data(cfg.get("dataset_path"), cfg.get("dataset_name"))
            if local is None:
                return f"no offline data for {leaf} ({cfg.get('dataset_path')})"
            source = _yaml_source(local)
        ours, subject = bpb.leaf_name(name, leaf)
        docs[ours] = bpb.leaf_config(name, ours, source, shots, lambda f: _Fn(f"eval.tasks.bpb.{f}"),
                                     subject=subject, dataset_name=cfg.get("dataset_name"))
        plan[ours] = {"num_fewshot": docs[ours]["num_fewshot"], "source": source}
    if list(docs) != [name]:
        docs[f"_{name}"] = bpb.group_config(name, list(docs))
    for fname, doc in docs.items():
        (out_dir / f"{fname}.yaml").write_text(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
    return plan


def prepare_tasks(tm, names: list[str], out_dir: Path, *, num_fewshot: dict[str, int],
                  default_fewshot: int | None, offline_data: Callable[[str, str | None], dict | None] | None,
                  humaneval: HumanEvalSettings, strict: bool = False) -> TaskPlan:
    """Write override YAMLs for `names` into out_dir and register them on `tm`.

    num_fewshot: shots by task/group name (applies to all its leaves); default_fewshot for the
    rest (None = the task's own default). offline_data: (hub id, config) -> task keys reading the
    offline copy, or None when it has no copy; when given, a task whose data the offline copy lacks
    is skipped (or an error when strict).
    """
    from lm_eval.tasks._index import Kind, TaskIndex

    index = tm.task_index
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks, skipped, leaves = [], {}, {}
    for name in names:
        if name in bpb.SOURCES:  # ours (eval/tasks/bpb.py): built from the accuracy task's data
            got = _prepare_bpb(index, name, out_dir, num_fewshot.get(name, default_fewshot), offline_data)
            if isinstance(got, str):
                if strict:
                    raise TaskPlanError(f"eval.tasks: '{name}': {got}; run with Hub access or drop it")
                log.warning("skipping task %s offline: %s", name, got)
                skipped[name] = got
                continue
            tasks.append(name)
            leaves.update(got)
            continue
        if name not in index:
            raise TaskPlanError(f"eval.tasks: lm-eval has no task or group named '{name}'")
        subs = leaf_tasks(index, name)
        plan: dict[str, dict] = {}
        missing = []
        for leaf in subs:
            entry = index[leaf]
            cfg = entry.cfg or {}
            shots = num_fewshot.get(leaf, num_fewshot.get(name, default_fewshot))
            source: dict[str, Any] = {"dataset_path": cfg.get("dataset_path")}
            if offline_data is not None:
                local = offline_data(cfg.get("dataset_path"), cfg.get("dataset_name"))
                if local is None:
                    missing.append(f"{leaf} ({cfg.get('dataset_path')})")
                    continue
                source = _yaml_source(local)
            if leaf == "humaneval":
                doc = humaneval_config(humaneval, source)
            elif entry.kind == Kind.TASK and entry.yaml_path is not None:
                doc = {"include": str(Path(entry.yaml_path).resolve()), "task": leaf}
                if offline_data is not None:
                    doc.update(source)
                if shots is not None:
                    doc["num_fewshot"] = int(shots)
            else:
                if offline_data is not None or shots is not None:
                    log.warning("task %s (%s) cannot be overridden; runs with lm-eval defaults",
                                leaf, entry.kind.name)
                continue
            plan[leaf] = {"num_fewshot": doc.get("num_fewshot"), "source": source}
            (out_dir / f"{leaf}.yaml").write_text(
                yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
        if missing:
            why = f"no offline data for {len(missing)} subtask(s), e.g. {missing[0]}"
            if strict:
                raise TaskPlanError(f"eval.tasks: '{name}': {why}; run with Hub access or drop it")
            log.warning("skipping task %s offline: %s", name, why)
            skipped[name] = why
            for leaf in plan:
                (out_dir / f"{leaf}.yaml").unlink(missing_ok=True)
            continue
        tasks.append(name)
        leaves.update(plan)
    # Register the overrides on top of a copy of the built-in index (same names, so groups and
    # tags resolve to them). TaskManager(include_path=...) would re-index everything (~7 s per
    # evaluation); the copy keeps the cached built-in manager untouched.
    tm2 = copy.copy(tm)
    tm2._index = {**tm._index, **TaskIndex.build([out_dir])}
    return TaskPlan(tasks=tasks, skipped=skipped, leaves=leaves, tasks_dir=out_dir, task_manager=tm2)

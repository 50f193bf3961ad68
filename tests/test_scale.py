"""The data path at paper shape on this machine (`make test-scale`, marker `scale`; minutes).

A SmolLM-Corpus-shaped corpus (tools.synth_corpus: 4 domains, 400 parquet files with several
row groups, 1,000,000 short documents) in hub layout is ingested as 8 array tasks
(`python -m tools.ingest` with ATTNINF_RANK / ATTNINF_WORLD_SIZE), a synthetic selection (20%
per method, made here with pyarrow) is mixed with tokenisation as 8 array tasks (each its own
process, two at a time on two cores) and one finishing task, and the run is resumed with another
task count. Asserted and printed: files and bytes each task opened (<= 1/N of the corpus plus one
file), blend entries per arm, peak RSS of the tasks and of the finish (merge + subset join),
tokens/s per process, wall times, identical artifacts after the resume.

Not here yet (they need the run lifecycle's array executor): scoring with the tiny random
selector as 8 array tasks and a few pretraining steps on the blend. The fixtures `ingested` and
`mixed` hold the corpus, its config and the finished mix for those steps to build on.
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
import pyarrow as pa
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


def _selection(ingest: Path, path: Path) -> int:
    """20% of each domain as `attention_influence` (a hash of the id) and another 20% as `random`."""
    t = pa.concat_tables(pq.read_table(f, columns=["id", "domain"]) for f in sorted(ingest.glob("*/*.parquet")))
    h = np.array([int(hashlib.md5(i.encode()).hexdigest()[:8], 16) % 100 for i in t.column("id").to_pylist()])
    ai, rnd = t.filter(pa.array(h < 20)), t.filter(pa.array((h >= 50) & (h < 70)))
    sel = pa.concat_tables([
        pa.table({"doc_id": ai.column("id"), "domain": ai.column("domain"), "score": pa.array(h[h < 20] / 100.0),
                  "method": pa.array(["attention_influence"] * ai.num_rows)}),
        pa.table({"doc_id": rnd.column("id"), "domain": rnd.column("domain"),
                  "score": pa.array(h[(h >= 50) & (h < 70)] / 100.0), "method": pa.array(["random"] * rnd.num_rows)})])
    pq.write_table(sel.sort_by([("method", "ascending"), ("score", "descending")]), path)
    return sel.num_rows


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
def mixed(ingested):
    root, ingest, tok = ingested
    corpus, sel, mix = ingest / "corpus.yaml", root / "selected.parquet", root / "mix"
    FIGURES["selected_rows"] = _selection(ingest, sel)
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
    with capsys.disabled():
        print(json.dumps(FIGURES, indent=1))


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

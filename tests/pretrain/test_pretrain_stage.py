"""`attninf stages=[mix,pretrain]` through the real CLI, Hydra and runner: two arms, tiny model.

Slow (two trainings + tokenisation in fresh processes, ~2-3 min on 2 cores): `pytest -m slow`.
The select stage is stood in by a selected.parquet with a finished manifest (scoring is tested
elsewhere); everything downstream of it is the real pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import make_docs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cli_mix_and_pretrain_two_arms(tmp_path, tiny_tokenizer):
    from attninf import manifest

    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    docs = [d for d in make_docs(60) if d.text]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for dom in ("web", "code", "math"):
        with open(corpus / f"{dom}.jsonl", "w") as fh:
            for d in docs:
                if d.domain == dom:
                    fh.write(json.dumps({"id": d.doc_id, "domain": d.domain, "text": d.text}) + "\n")
    run = tmp_path / "run"
    sel = [d for d in docs if int(d.doc_id.split(":")[1]) % 5 == 0]
    (run / "select").mkdir(parents=True)
    pq.write_table(pa.table({"doc_id": [d.doc_id for d in sel], "domain": [d.domain for d in sel],
                             "score": [1.0] * len(sel), "method": ["attention_influence"] * len(sel),
                             "n_tokens": [0] * len(sel)}), run / "select" / "selected.parquet")
    manifest.write(run / "select", stage="select", arm=None, key="standin", status="done", config={}, inputs={})
    args = [f"run_dir={run}", "stages=[mix,pretrain]", "wandb.mode=disabled", "corpus=jsonl",
            f"corpus.paths=[{corpus}/*.jsonl]", "corpus.domains=null", f"tokenizer.path={tok}",
            "+arms.baseline.selection=null", "+arms.attention_influence.selection=attention_influence",
            "mix.shard_docs=50", "mix.workers=1", "mix.valid_fraction=0.1",
            "pretrain.model.num_layers=2", "pretrain.model.hidden_size=64", "pretrain.model.ffn_hidden_size=128",
            "pretrain.model.seq_length=64", "pretrain.train_iters=12", "pretrain.global_batch_size=4",
            "pretrain.micro_batch_size=2", "pretrain.optim.lr=3e-3", "pretrain.eval_interval=6",
            "pretrain.eval_samples=4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    r = subprocess.run([sys.executable, "-m", "attninf.cli", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    blend = json.loads((run / "mix" / "blend.json").read_text())
    assert set(blend["arms"]) == {"baseline", "attention_influence"}
    for arm in ("baseline", "attention_influence"):
        out = run / "pretrain" / arm
        m = manifest.read(out)
        assert m["status"] == "done", m
        s = m["outputs"]
        assert s["steps"] == 12 and s["loss_last"] < s["loss_first"]
        assert (out / "hf" / "model.safetensors").exists() and (out / "pretrain.png").exists()
        assert s["pre_decay_step"] == 9  # stable until 75% of 12 steps
    # the treated arm trained on the corpus plus the subset, the baseline on the corpus alone
    ep = manifest.read(run / "pretrain" / "attention_influence")["outputs"]["epochs_per_dataset"]
    assert "subsets/attention_influence" in ep
    assert "subsets/attention_influence" not in manifest.read(run / "pretrain" / "baseline")["outputs"]["epochs_per_dataset"]
    from pretrain.figures import plot_loss_curves

    png = plot_loss_curves({a: run / "pretrain" / a / "metrics.jsonl" for a in ("baseline", "attention_influence")},
                           tmp_path / "loss.png")
    assert png.stat().st_size > 5000

"""W&B in offline mode records runs locally; tracking failures never raise into a stage."""

from __future__ import annotations

from attninf.progress import Progress
from attninf.tracking import Tracker


def test_offline_run_is_written_and_artifacts_are_references(tmp_path):
    t = Tracker(mode="offline", project="attninf-test", group="g", name="score", dir=tmp_path,
                config={"stage": "score"})
    data = tmp_path / "shard.parquet"
    data.write_bytes(b"x" * 10)
    with Progress(total=3, desc="docs", tracker=t, log_every_s=0.0, disable=True) as p:
        for _ in range(3):
            p.update(1, tokens=100)
    t.summary({"docs": 3})
    t.artifact(data, type="scores", name="score/shards")
    t.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert p.rates()["progress/tokens"] == 300


def test_tracking_failure_is_swallowed(tmp_path):
    t = Tracker(mode="not-a-mode", dir=tmp_path)
    t.log({"x": 1})  # must not raise
    t.summary({"y": 2})
    t.finish()
    assert t.run is None

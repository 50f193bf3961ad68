"""Fixtures of the eval tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def offline_dir(tmp_path_factory) -> Path:
    """The offline MMLU / GSM8K / HumanEval data, built once per session."""
    from eval.benchmarks import build_offline_data

    d = tmp_path_factory.mktemp("benchmarks")
    build_offline_data(d)
    return d

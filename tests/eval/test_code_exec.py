"""The HumanEval sandbox: limits, permission gate, pass@k; hostile programs in test_sandbox.py."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

from eval import code_exec
from eval.code_exec import SandboxLimits, compute, estimate_pass_at_k, run_program

FAST = SandboxLimits(timeout_s=1.5, memory_mb=512)


@pytest.fixture(autouse=True)
def allow(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


def test_correct_program_passes():
    r = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5", FAST)
    assert r.passed and r.result == "passed"


@pytest.mark.parametrize("program, expect", [
    ("def add(a, b):\n    return a * b\nassert add(2, 3) == 5", "AssertionError"),
    ("raise RuntimeError('boom')", "RuntimeError: boom"),
    ("import sys\nsys.exit(3)", "exit status 3"),
    ("def f(:\n  pass", "SyntaxError"),
])
def test_wrong_and_crashing_programs_fail_with_reason(program, expect):
    r = run_program(program, FAST)
    assert not r.passed and expect in r.result


def test_infinite_loop_is_killed_at_the_timeout():
    t0 = time.perf_counter()
    r = run_program("while True:\n    pass", FAST)
    dt = time.perf_counter() - t0
    assert not r.passed and r.result == "timed out"
    assert dt < FAST.timeout_s + 2.0


@pytest.mark.parametrize("program", [
    "x = bytearray(8 * 2**30)",                                   # one huge allocation
    "chunks = []\nwhile True:\n    chunks.append(b'x' * 2**24)",  # gradual growth
])
def test_memory_hog_fails_without_hurting_the_host(program):
    r = run_program(program, FAST)
    assert not r.passed
    assert "MemoryError" in r.result or r.result == "timed out" or "signal" in r.result


def test_runs_in_a_fresh_temporary_directory():
    prog = ("import os\nopen('scratch.txt', 'w').write('x')\n"
            "assert os.listdir('.') == ['program.py', 'scratch.txt'] or sorted(os.listdir('.')) == "
            "['program.py', 'scratch.txt']\nprint(os.getcwd())")
    before = set(os.listdir("."))
    assert run_program(prog, FAST).passed
    assert set(os.listdir(".")) == before  # nothing written where the evaluator runs


def test_socket_is_disabled():
    r = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))", FAST)
    assert not r.passed and "network access is disabled" in r.result


def test_nothing_runs_without_permission(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(ValueError, match="HF_ALLOW_CODE_EVAL=1"):
        run_program("print(1)", FAST)
    with pytest.raises(ValueError, match="HF_ALLOW_CODE_EVAL=1"):
        compute([["x = 1"]], ["assert x == 1"], k=[1])


def _comb_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 1.0


@pytest.mark.parametrize("n, c, k", [(20, 0, 1), (20, 3, 1), (20, 3, 5), (20, 19, 10), (5, 5, 1), (64, 7, 32)])
def test_pass_at_k_estimator_matches_combinatorics(n, c, k):
    assert estimate_pass_at_k(np.array([n]), np.array([c]), k)[0] == pytest.approx(_comb_pass_at_k(n, c, k))


def test_compute_has_the_hf_code_eval_contract():
    test = "assert add(2, 3) == 5"
    preds = [["def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b",
              "def add(a, b):\n    raise ValueError"],
             ["def add(a, b):\n    return 5", "def add(a, b):\n    return a + b", "def add(a, b):\n    return b + a"]]
    pass_at_k, results = compute(preds, [test, test], k=[1, 2, 5], num_workers=2, timeout=2.0)
    # per problem: 1 of 3 and 3 of 3 correct
    assert pass_at_k["pass@1"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert pass_at_k["pass@2"] == pytest.approx((_comb_pass_at_k(3, 1, 2) + 1.0) / 2)
    assert "pass@5" not in pass_at_k  # more than the 3 candidates: not reported (as HF)
    assert [r[1]["passed"] for r in results[0]] == [True, False, False]
    assert results[0][2][1]["result"].startswith("failed: ValueError")
    assert [r[0] for r in results[1]] == [0, 1, 2]

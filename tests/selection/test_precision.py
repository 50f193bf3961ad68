"""`dtype: auto`: explicit dtypes win, the CPU choice follows the measured rates, the cache keys
on what makes a measurement reusable, and loaded models carry the choice they ran in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from selection import precision
from selection.precision import BF16_MIN_SPEEDUP, ONEDNN_MIN_SPEEDUP, Precision, choose, resolve

SHAPE = precision.MIN_SHAPE


def test_explicit_dtype_wins_without_measuring(tmp_path):
    cache = tmp_path / "p.json"
    for name in ("float32", "bfloat16", "float16"):
        got = resolve(name, torch.device("cpu"), SHAPE, cache)
        assert (got.dtype, got.source, got.torch_dtype) == (name, "explicit", getattr(torch, name))
    assert not cache.exists()
    with pytest.raises(ValueError, match="bf16"):
        resolve("bf16", torch.device("cpu"), SHAPE, cache)


def test_non_cpu_devices_do_not_measure(tmp_path):
    got = resolve("auto", torch.device("meta"), SHAPE, tmp_path / "p.json")
    assert (got.dtype, got.source) == ("float32", "accelerator")
    assert not (tmp_path / "p.json").exists()


def test_choice_rule_prefers_fp32_unless_bf16_clearly_wins():
    assert choose(100.0, 100.0) == "float32"                       # a tie keeps fp32's precision
    assert choose(100.0, 100.0 * BF16_MIN_SPEEDUP * 0.99) == "float32"
    assert choose(100.0, 100.0 * BF16_MIN_SPEEDUP) == "bfloat16"
    assert choose(19.4, 1.0) == "float32"                           # AVX2-only: bf16 emulated
    assert choose(195.0, 810.0) == "bfloat16"                       # native bf16


def test_onednn_replaces_atens_fp32_only_when_clearly_faster():
    assert precision.choose_linear(100.0, None) == "aten"            # no oneDNN in this build
    assert precision.choose_linear(100.0, 100.0 * ONEDNN_MIN_SPEEDUP * 0.99) == "aten"
    assert precision.choose_linear(42.0, 104.0) == "onednn"          # MKL on its SSE path


def test_measurement_is_real_cached_and_consistent(tmp_path):
    cache = tmp_path / "precision.json"
    first = resolve("auto", torch.device("cpu"), SHAPE, cache)
    assert first.source == "measured" and not first.cached
    assert first.fp32_gflops > 0 and first.bf16_gflops > 0
    assert first.linear == precision.choose_linear(first.fp32_gflops, first.onednn_gflops)
    best32 = first.onednn_gflops if first.linear == "onednn" else first.fp32_gflops
    assert first.dtype == choose(best32, first.bf16_gflops)
    assert first.shape == SHAPE and first.threads == torch.get_num_threads()
    again = resolve("auto", torch.device("cpu"), SHAPE, cache)
    assert again.cached and (again.dtype, again.fp32_gflops, again.bf16_gflops, again.linear) == (
        first.dtype, first.fp32_gflops, first.bf16_gflops, first.linear)
    # another shape is another entry; a torn cache is re-measured, not an error
    other = resolve("auto", torch.device("cpu"), (precision.ROWS, 576, 1536), cache)
    assert not other.cached and len(json.loads(cache.read_text())) == 2
    cache.write_text("{not json")
    assert not resolve("auto", torch.device("cpu"), SHAPE, cache).cached


def test_one_choice_whatever_the_thread_count(tmp_path):
    """A one-CPU Slurm task and a two-thread local run of one run must pick alike (cached)."""
    cache = tmp_path / "p.json"
    threads = torch.get_num_threads()
    first = resolve("auto", torch.device("cpu"), SHAPE, cache)
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other = resolve("auto", torch.device("cpu"), SHAPE, cache)
    finally:
        torch.set_num_threads(threads)
    assert other.cached and other.dtype == first.dtype


def test_tiny_layers_are_timed_at_the_floor():
    from types import SimpleNamespace

    assert precision.linear_shape(SimpleNamespace(hidden_size=64, intermediate_size=128)) == precision.MIN_SHAPE
    assert precision.linear_shape(SimpleNamespace(hidden_size=2048, intermediate_size=8192)) == (precision.ROWS, 2048, 8192)


def test_record_and_describe():
    p = Precision("float32", "measured", 80.0, 1.6, (256, 576, 1536), 2)
    assert p.record() == {"dtype": "float32", "source": "measured", "fp32_gflops": 80.0,
                          "bf16_gflops": 1.6, "shape": (256, 576, 1536), "threads": 2, "cached": False}
    assert "bf16 1.6 vs fp32 80.0 GFLOP/s" in p.describe()
    q = Precision("float32", "measured", 40.0, 1.6, (256, 576, 1536), 2, onednn_gflops=100.0, linear="onednn")
    assert q.onednn and q.describe().startswith("float32 via oneDNN (auto: bf16 1.6 vs fp32 40.0, oneDNN fp32 100.0 GFLOP/s")
    assert not Precision("bfloat16", "measured", 40.0, 90.0, (256, 576, 1536), 2, 100.0, "onednn").onednn
    assert Precision("bfloat16", "explicit").record() == {"dtype": "bfloat16", "source": "explicit",
                                                          "cached": False}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="MKL: x86 wheels only")
def test_auto_routes_fp32_through_onednn_where_mkl_takes_its_sse_path(tmp_path):
    """MKL runs sgemm on its SSE path on some AMD processors (the slowest machines of this kind);
    MKL_ENABLE_INSTRUCTIONS=SSE4_2 puts any x86 machine's MKL there, oneDNN capped at AVX2."""
    code = ("import torch; from selection import precision as p; "
            "c = p.resolve('auto', torch.device('cpu'), (256, 576, 1536), None); "
            "print(c.dtype, c.linear, c.fp32_gflops, c.onednn_gflops)")
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == ["float32", "onednn"], out
    assert float(out[3]) > float(out[2])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's x86 ISA cap")
def test_auto_picks_fp32_where_bf16_is_emulated(tmp_path):
    """The slowest machines of this kind have no bf16 instructions; capping oneDNN at AVX2 (and
    ATen's kernels with it) makes any x86 machine run bf16 the way they do: emulated."""
    code = ("import torch; from selection import precision as p; "
            "c = p.resolve('auto', torch.device('cpu'), (256, 576, 1536), None); "
            "print(c.dtype, c.fp32_gflops, c.bf16_gflops)")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    dtype, fp32, bf16 = out[0], float(out[1]), float(out[2])
    assert dtype == "float32", (fp32, bf16)
    assert bf16 < fp32


def test_loaded_selector_runs_in_and_records_the_resolved_dtype(tiny_model_dir, tmp_path, monkeypatch):
    from selection.models import ModelConfig, load_selector, precision_of

    monkeypatch.setenv("ATTNINF_CACHE", str(tmp_path))
    model, _ = load_selector(ModelConfig(path=str(tiny_model_dir), dtype="auto", device="cpu"))
    rec = precision_of(model)
    assert rec["source"] == "measured"
    assert next(model.parameters()).dtype == getattr(torch, rec["dtype"])
    assert (tmp_path / "precision.json").exists()
    model32, _ = load_selector(ModelConfig(path=str(tiny_model_dir), dtype="float32", device="cpu"))
    assert precision_of(model32) == {"dtype": "float32", "source": "explicit", "cached": False}

"""bench.score end to end on a tiny random model: ratio, agreement and fraction of peak in one run."""

from __future__ import annotations

import json

from bench import score as bench_score


def test_bench_reports_speedup_agreement_and_fraction_of_the_measured_peak(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATTNINF_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "web.jsonl"
    words = "the quick brown fox jumps over the lazy dog and then some more words follow".split()
    with corpus.open("w") as fh:
        for i in range(6):
            fh.write(json.dumps({"id": f"d{i}", "text": " ".join(words[: 4 + 2 * i] * (1 + i)),
                                 "domain": "web"}) + "\n")
    res = bench_score.main(["--model", "random:tiny", "--corpus", str(corpus), "--docs", "6",
                            "--dtype", "float32", "--max-tokens", "64", "--threads", "1",
                            "--peak-size", "256", "--heads-fraction", "0.125"])
    assert res["docs"] == 6 and res["within_tolerance"] and res["max_score_diff"] <= 1e-5
    assert res["speedup"] > 0 and res["fast_gflops"] > 0 and res["peak_gemm_gflops"] > 0
    assert res["fraction_of_peak"] == res["fast_gflops"] / res["peak_gemm_gflops"]
    split = res["fast_gflop_split"]
    assert abs(sum(split.values()) - res["fast_gflop"]) < 1e-9 * res["fast_gflop"]
    assert res["dtype"] == "float32" and res["precision"]["source"] == "explicit"
    assert res["peak_gemm_gflops_other"]["bfloat16"] > 0   # both peaks in one run
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "x naive" in last and "GEMM peak" in last and "bfloat16 peak" in last


def test_bench_auto_reports_what_auto_chose_and_the_chosen_dtypes_peak(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATTNINF_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "web.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": "a b c d e f g " * (i + 2), "domain": "web"})
                              + "\n" for i in range(4)))
    res = bench_score.main(["--model", "random:tiny", "--corpus", str(corpus), "--docs", "4",
                            "--max-tokens", "32", "--threads", "1", "--peak-size", "256", "--skip-naive"])
    prec = res["precision"]
    assert res["dtype_requested"] == "auto" and prec["source"] == "measured"
    assert res["dtype"] == prec["dtype"] in ("float32", "bfloat16")
    other = "bfloat16" if res["dtype"] == "float32" else "float32"
    assert res["peak_gemm_gflops_other"][other] > 0 and res["peak_gemm"].startswith(res["dtype"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    via = " via oneDNN" if prec["linear"] == "onednn" and res["dtype"] == "float32" else ""
    assert last.startswith(f"dtype {res['dtype']}{via} (auto: bf16 ") and f"{res['dtype']} GEMM peak" in last

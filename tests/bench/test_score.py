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
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "x naive" in last and "GEMM peak" in last

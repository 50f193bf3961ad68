"""An lm-eval `LM` that answers from a table: checks the scoring path without a model.

HumanEval's score depends on prompt construction, lm-eval's filter, our sandbox and pass@k.
Replaying the canonical solutions through the real task must give pass@1 = 1.0, and replaying
broken ones 0.0; anything else means the path (not the model) is wrong.

  HF_ALLOW_CODE_EVAL=1 python -m tools.replay_humaneval            # all 164 problems, canonical + broken
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable

from lm_eval.api.model import LM

# Ways to break a canonical solution that must each fail its tests.
BROKEN = {
    "wrong": lambda sol: "    return None\n",
    "crash": lambda sol: "    raise RuntimeError('broken on purpose')\n",
    "loop": lambda sol: "    while True:\n        pass\n",
    "memory": lambda sol: "    x = bytearray(64 * 2**30)\n" + sol,
}


class ReplayLM(LM):
    """generate_until returns answer(prompt); scoring requests are refused."""

    def __init__(self, answer: Callable[[str], str]):
        super().__init__()
        self.answer = answer

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [self.answer(req.args[0]) for req in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("ReplayLM only answers generation requests")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("ReplayLM only answers generation requests")


def humaneval_table(offline_dir: Path, transform: Callable[[str], str] = lambda s: s) -> dict[str, str]:
    """prompt -> transform(canonical_solution) from the offline data's HumanEval split."""
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(offline_dir) / "humaneval" / "openai_humaneval" / "test.parquet").to_pylist()
    return {r["prompt"]: transform(r["canonical_solution"]) for r in rows}


def main(argv: list[str] | None = None) -> int:
    from attninf.config import build
    from eval import harness
    from eval.config import EvalConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=None, help="problems (default: all 164)")
    p.add_argument("--broken-limit", type=int, default=10,
                   help="problems per broken variant (an infinite loop costs the full timeout)")
    p.add_argument("--out", type=Path, default=Path("runs/replay-humaneval"))
    p.add_argument("--offline-dir", default=None)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = p.parse_args(argv)
    ecfg = build(EvalConfig, {"tasks": ["humaneval"], "limit": args.limit, "allow_code_eval": True,
                              "offline_data": "always", "offline_data_dir": args.offline_dir,
                              "use_cache": False, "log_samples": False,
                              "humaneval": {"n": 1, "temperature": 0.0,
                                            "num_workers": args.workers}}, "eval")
    tp, data = harness.plan(ecfg, args.out)
    summary = {}
    for name, fn in {"canonical": lambda s: s, **BROKEN}.items():
        table = humaneval_table(Path(data.path), fn)
        ecfg.limit = args.limit if name == "canonical" else args.broken_limit
        t0 = time.perf_counter()
        res = harness.run_suite(ReplayLM(table.__getitem__), ecfg, tp, args.out / name)
        h = harness.headline(res)["humaneval"]
        summary[name] = {"pass@1": h["value"], "problems": res["n-samples"]["humaneval"]["effective"],
                         "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{name:10s} pass@1={h['value']:.3f}  ({summary[name]['problems']} problems, "
              f"{summary[name]['wall_s']}s)")
    print(json.dumps(summary))
    return 0 if summary["canonical"]["pass@1"] == 1.0 and all(
        summary[b]["pass@1"] == 0.0 for b in BROKEN) else 1


if __name__ == "__main__":
    raise SystemExit(main())

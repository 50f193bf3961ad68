"""`python -m tools.compare_mix A/mix B/mix [--samples N --seq-length L]`: do two mixes train alike?

Builds, for every arm of both blend.json files, the blended GPT datasets exactly as the pretrain
stage does (pretrain.train._datasets: megatron-core's BlendedMegatronDatasetBuilder, the same
seed, sequence length and sample count) and compares the token ids of every training sample
and of every validation sample per domain. Prints one JSON line per arm and exits 1 on any
difference. Used to show that a change of the mix's layout (per-shard -> per-domain datasets)
left the training data of the same inputs unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _streams(mix: Path, arm: str, samples: int, seq: int, cache: Path):
    from pretrain.train import _datasets, load_config

    blend = json.loads((mix / "blend.json").read_text())
    cfg = load_config({"global_batch_size": 1, "micro_batch_size": 1, "eval_interval": 1,
                       "eval_samples": 8, "model": {"seq_length": seq}})
    train, valid = _datasets(cfg, blend, mix, arm, samples, cache)
    tr = [train[i]["tokens"].tolist() for i in range(len(train))]
    va = {d: [ds[i]["tokens"].tolist() for i in range(len(ds))] for d, ds in valid.items()}
    return blend["arms"][arm], tr, va


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-length", type=int, default=128)
    a = p.parse_args(argv)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from attninf.dist import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    arms_a = json.loads((a.a / "blend.json").read_text())["arms"]
    arms_b = json.loads((a.b / "blend.json").read_text())["arms"]
    ok = sorted(arms_a) == sorted(arms_b)
    for arm in sorted(arms_a):
        with tempfile.TemporaryDirectory() as ca, tempfile.TemporaryDirectory() as cb:
            ea, ta, va = _streams(a.a, arm, a.samples, a.seq_length, Path(ca))
            eb, tb, vb = _streams(a.b, arm, a.samples, a.seq_length, Path(cb))
        same = {"weights": ea["weights"] == eb["weights"], "tokens": ea["tokens"] == eb["tokens"],
                "train_samples": ta == tb, "valid_samples": va == vb}
        ok &= all(same.values())
        print(json.dumps({"arm": arm, "datasets": [len(ea["prefixes"]), len(eb["prefixes"])],
                          "n_train_samples": len(ta), "n_valid_samples": {d: len(v) for d, v in va.items()},
                          "sample_tokens": sum(len(s) for s in ta), **same}))
    print(json.dumps({"identical": bool(ok)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

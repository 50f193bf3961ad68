"""Run one stage's share of work from a frozen stage folder (srun / Slurm array / torchrun).

The launcher process composes the config with Hydra once and writes `<stage_dir>/config.yaml`;
workers read that file instead of composing again (Hydra in every rank would fight over output
folders). Rank and world size come from attninf.dist.

  python -m attninf.worker runs/x/score          # e.g. inside an sbatch --array script
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omegaconf import OmegaConf

from attninf import manifest
from attninf.context import Incomplete, StageContext
from attninf.runner import setup_logging, stage_dirs
from attninf.stages import STAGES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage_dir", type=Path)
    args = p.parse_args(argv)
    setup_logging()
    m = manifest.read(args.stage_dir)
    if m is None:
        raise SystemExit(f"{args.stage_dir}: no manifest.json; start the stage with `attninf` first")
    cfg = OmegaConf.load(args.stage_dir / "config.yaml")
    dirs = stage_dirs(cfg, [], multirun=False)
    dirs[(m["stage"], m["arm"])] = args.stage_dir
    for k, v in (m.get("inputs") or {}).items():
        stage, _, arm = k.partition("/")
        dirs[(stage, arm or None)] = Path(v["path"])
    ctx = StageContext(name=m["stage"], arm=m["arm"], run_dir=Path(cfg.run_dir), out=args.stage_dir,
                       cfg=cfg, dirs=dirs)
    try:
        STAGES[m["stage"]].fn()(ctx)
    except Incomplete as e:
        logging.getLogger("attninf").info("worker share finished; stage not complete yet: %s", e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

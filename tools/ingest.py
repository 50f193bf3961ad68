"""`python -m tools.ingest corpus=smollm_corpus ingest.out=DIR [key=value ...]`: one task of the ingest.

`--corpus-file F.yaml` takes the corpus section from a plain YAML file instead of the `corpus`
group (tools.synth_corpus writes one for its local hub layout).

Composes the `corpus` group and `conf/ingest/default.yaml` with Hydra (the same overrides as
`attninf`), plans the parts (every data file of every source), ingests the parts of this task
(part i belongs to task i % world: attninf.dist.rank_world, so a Slurm array or
ATTNINF_RANK/ATTNINF_WORLD_SIZE fans it out) and, when every part is done, writes the totals
and `DIR/corpus.yaml`. Prints a JSON summary. See selection/ingest.py for what a part does.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from attninf.config import build
    from attninf.dist import rank_world
    from selection.corpora import CorpusConfig
    from pretrain.mix import check_task_count
    from selection.ingest import IngestConfig, finish, plan, run_parts

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    corpus_file = None
    if "--corpus-file" in argv:
        k = argv.index("--corpus-file")
        corpus_file = argv[k + 1]
        del argv[k:k + 2]
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", overrides=["+ingest=default", *argv])
    corpus = OmegaConf.load(corpus_file) if corpus_file else cfg.corpus
    ccfg = build(CorpusConfig, OmegaConf.to_container(corpus, resolve=True), "corpus")
    icfg = build(IngestConfig, OmegaConf.to_container(cfg.ingest, resolve=True), "ingest")
    out = Path(icfg.out)
    rank, world = rank_world()
    parts = plan(ccfg, icfg, out)
    check_task_count(world, len(parts), "ingest", "ingest with fewer array tasks (a part is one data file)")
    mine = [p for i, p in enumerate(parts) if i % world == rank]
    done = run_parts(mine, ccfg, icfg, out)
    summary = finish(parts, out)
    summary["this_task"] = {"rank": rank, "world": world, "parts": len(mine), "ingested_now": len(done)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

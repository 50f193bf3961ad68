"""`attninf`: the Hydra front door. Composes the config once, then hands it to the runner.

Examples:
  attninf +experiment=demo                       # the whole offline CPU experiment
  attninf stages=[detect] run_dir=runs/x model.path=HuggingFaceTB/SmolLM2-135M
  attninf -m +experiment=demo select.ratio=0.1,0.2  # sweep; scoring is shared
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from attninf.config import ConfigError
from attninf.context import Incomplete, MissingInput

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

log = logging.getLogger("attninf")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    from attninf.runner import run_pipeline, setup_logging

    setup_logging(cfg.get("log_level", "INFO"))
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run_pipeline(cfg, overrides=list(hc.overrides.task), multirun=multirun)
    except Incomplete as e:
        log.info("%s (other workers are still running; re-run to finish the stage)", e)
    except (ConfigError, MissingInput) as e:
        log.error("%s", e)
        if multirun:
            raise
        sys.exit(2)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

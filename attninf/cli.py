"""`attninf`: the Hydra front door. Composes the config once, then hands it to the runner.

Examples:
  attninf +experiment=demo                       # the whole offline CPU experiment
  attninf stages=[detect] run_dir=runs/x model.path=HuggingFaceTB/SmolLM2-135M
  attninf -m +experiment=demo select.ratio=0.1,0.2  # sweep; scoring is shared
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from attninf.config import ConfigError
from attninf.context import Incomplete, InputError, MissingInput

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

log = logging.getLogger("attninf")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    from attninf.runner import run_pipeline, setup_logging

    setup_logging(cfg.get("log_level", "INFO"))
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    overrides = list(hc.overrides.task)
    if multirun:
        overrides = swept_overrides(overrides, Path(hc.sweep.dir) / "multirun.yaml")
    if (cfg.get("cluster") or {}).get("kind") == "slurm":
        sys.exit(_submit(cfg, multirun))
    try:
        run_pipeline(cfg, overrides=overrides, multirun=multirun)
    except Incomplete as e:
        log.info("%s (other workers are still running; re-run to finish the stage)", e)
    except (ConfigError, MissingInput, InputError) as e:
        # Expected failures: one line and exit 2; a traceback only when asked for.
        if multirun or _debug():
            raise
        log.error("%s", e)
        sys.exit(2)


def _debug() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("ATTNINF_DEBUG") == "1"


def _submit(cfg: DictConfig, multirun: bool) -> int:
    """cluster=slurm: submit the stages as Slurm jobs and return; bad input is one line, exit 2."""
    from attninf.submit import SubmitError, submit_pipeline

    if multirun:
        log.error("cluster=slurm submits one run; for a sweep use `-m hydra/launcher=slurm` "
                  "(each point a Slurm job running its stages) with cluster=local")
        return 2
    try:
        submit_pipeline(cfg)
    except (ConfigError, MissingInput, InputError, SubmitError) as e:
        log.error("%s", e)
        return 2
    return 0


def swept_overrides(job_overrides: list[str], multirun_yaml: Path) -> list[str]:
    """This job's values of the keys the sweep varies (`select.ratio=0.1,0.2` -> `select.ratio=0.1`).

    Only swept keys name sweep folders, so a sweep shares every stage they do not touch with the
    plain run of the same command (its scoring, say). Keys fixed on the command line still reach
    the config, and the stage manifests catch any mismatch. The original command line lives in
    the sweep folder's multirun.yaml, which Hydra writes before launching any job.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if not multirun_yaml.exists():
        return job_overrides
    original = OmegaConf.load(multirun_yaml).hydra.overrides.task
    parsed = OverridesParser.create().parse_overrides([str(o) for o in original])
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    jobs = OverridesParser.create().parse_overrides(job_overrides)
    return [raw for raw, o in zip(job_overrides, jobs) if o.get_key_element() in swept]


def main() -> None:
    if "--debug" in sys.argv[1:]:  # tracebacks for expected failures too (HYDRA_FULL_ERROR=1)
        sys.argv.remove("--debug")
        os.environ["ATTNINF_DEBUG"] = "1"
        os.environ["HYDRA_FULL_ERROR"] = "1"
    _main()


if __name__ == "__main__":
    main()

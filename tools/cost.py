"""`python -m tools.cost PRESET.yaml | --paper`: GPU-hours of scoring and pretraining, as a table.

The model itself lives in attninf/cost.py (the Slurm preflight reads it for every job); this is
its command line. Everything it defines is re-exported here.
"""

from __future__ import annotations

import sys

from attninf.cost import *  # noqa: F401,F403
from attninf.cost import main

if __name__ == "__main__":
    sys.exit(main())

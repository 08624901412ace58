"""``python -m mosmos.benchmark --config FILE`` (also under ``accelerate launch -m mosmos.benchmark``)."""

import sys

from mosmos.benchmark.run import main
from mosmos.entry import run_stage

sys.exit(run_stage("benchmark", main))

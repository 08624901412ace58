"""``python -m finetune --config FILE`` (also under ``accelerate launch -m finetune``)."""

import sys

from finetune.train import main
from mosmos.cli import run_stage

sys.exit(run_stage("finetune", main))

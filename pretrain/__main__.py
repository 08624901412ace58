"""``python -m pretrain --config FILE`` (also under ``accelerate launch -m pretrain``)."""

import sys

from mosmos.cli import run_stage
from pretrain.train import main

sys.exit(run_stage("pretrain", main))

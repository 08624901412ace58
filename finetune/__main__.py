"""``python -m mosmos.finetune --config FILE`` (also under ``accelerate launch -m mosmos.finetune``)."""

import sys

from mosmos.entry import run_stage
from mosmos.finetune.train import main

sys.exit(run_stage("finetune", main))

"""``python -m mosmos.pretrain --config FILE`` (also under ``accelerate launch -m mosmos.pretrain``)."""

import sys

from mosmos.entry import run_stage
from mosmos.pretrain.train import main

sys.exit(run_stage("pretrain", main))

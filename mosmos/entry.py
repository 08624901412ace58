"""What every entry point shares: logging set-up and mosmos' error handling.

Used by ``mosmos`` (the CLI) and by each stage's ``python -m mosmos.<stage>`` /
``accelerate launch -m mosmos.<stage>``, so a stage never imports the CLI above it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from mosmos.errors import MosmosError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not verbose:  # accelerate logs every file of every checkpoint at INFO
        logging.getLogger("accelerate").setLevel(logging.WARNING)


def run_stage(name: str, fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a stage's ``main`` with mosmos' error handling (for ``python -m`` / ``accelerate launch``)."""
    setup_logging()
    try:
        return int(fn(argv) or 0)
    except MosmosError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2

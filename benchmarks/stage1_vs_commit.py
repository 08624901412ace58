"""Stage 1 demo step time of this checkout against an earlier commit, side by side on this machine.

Each side runs its own ``configs/pretrain/demo.yaml`` through its own command line on the same
generated pairs, twice: for ``--short`` and for ``--long`` optimizer steps. The difference of the
two wall times over the difference in steps is the time per step with data loading, augmentation
and everything the loop does, start-up and the final evaluation cancelling out; it needs nothing
from the old code but its command line. Sides alternate (old, new, old, new) so load drift hits both.

    python benchmarks/stage1_vs_commit.py --commit 8cedae3 [--short 10 --long 50] [--data DIR]
        [--overrides train.cpu_processes=auto]

The earlier commit is checked out with ``git worktree`` into a temporary folder and run with this
environment's Python and libraries (its packages first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, synth, timed_command

#: Run an installed-name tree (``mosmos.pretrain`` from the top-level ``pretrain/`` folder) from its
#: own files: this environment's editable install would map ``mosmos.pretrain`` to this checkout, so
#: its finder is dropped and the tree's root joins ``mosmos.__path__`` (where the folders are found).
_OWN_TREE = (
    "import runpy, sys; root = sys.argv.pop(1); "
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in type(f).__module__]; "
    "import mosmos; mosmos.__path__.append(root); "
    "runpy.run_module('mosmos.pretrain', run_name='__main__', alter_sys=True)"
)


def _uses_installed_name(root: Path) -> bool:
    """Whether the tree installs its stages inside ``mosmos`` (after the redesign) or top-level."""
    return (root / "mosmos" / "entry.py").is_file()


def _command(root: Path) -> list[str]:
    config = ["--config", str(root / "configs/pretrain/demo.yaml")]
    if root.resolve() == REPO.resolve():
        return [sys.executable, "-m", "mosmos.pretrain", *config]
    if _uses_installed_name(root):
        return [sys.executable, "-c", _OWN_TREE, str(root), *config]
    return [sys.executable, "-m", "pretrain", *config]


def timed_run(root: Path, data: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> float:
    """Wall seconds of one stage 1 run of ``steps`` optimizer steps from the tree at ``root``."""
    pairs = data / "pretrain"
    overrides = [
        f"output_dir={out}",
        f"data.table={pairs / 'reports.csv'}",
        f"data.image_root={pairs / 'images'}",
        f"data.ground_truth={pairs / 'ground_truth'}",
        f"data.cache_dir={out.parent / ('cache-' + root.name)}",
        f"train.max_steps={steps}",
        "train.checkpoint_every=100000",
        "eval.attention_overlays=0",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore"}
    return timed_command([*_command(root), *overrides], out.parent, env, f"{root}: stage 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="8cedae3", help="the earlier commit (default: 8cedae3)")
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--data", type=Path, help="a `mosmos synth` output (default: generate 600 pairs)")
    parser.add_argument(
        "--overrides",
        nargs="*",
        default=[],
        help="dotted overrides for this checkout's side only, e.g. train.cpu_processes=auto",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mosmos-vs-") as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(old), args.commit],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            data = args.data or synth(tmp / "data", pretrain_cases=600, workers=os.cpu_count() or 1)
            sides = {f"commit {args.commit}": old, "this checkout": REPO}
            per_step: dict[str, list[float]] = {k: [] for k in sides}
            extra = {old: (), REPO: tuple(args.overrides)}
            for root in sides.values():  # fill each side's cache first (not timed)
                timed_run(root, data, tmp / f"warm-{root.name}", 1, extra[root])
            for r in range(args.rounds):
                for name, root in sides.items():
                    short = timed_run(root, data, tmp / f"s{r}-{root.name}", args.short, extra[root])
                    long = timed_run(root, data, tmp / f"l{r}-{root.name}", args.long, extra[root])
                    per_step[name].append((long - short) / (args.long - args.short))
                    print(f"{name}: {per_step[name][-1]:.3f} s per step (round {r + 1})", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, capture_output=True)
    base, new = (min(v) for v in per_step.values())
    print(
        f"stage 1 demo step, {args.long - args.short} steps differenced: commit {args.commit} "
        f"{base:.3f} s, this checkout {' '.join(args.overrides)} {new:.3f} s: {base / new:.2f}x faster"
    )


if __name__ == "__main__":
    main()

"""User-facing errors: raised at the boundary with a message that names the file, key or value."""

from __future__ import annotations

from dataclasses import dataclass


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (MONAI wraps errors raised inside transforms several
    levels deep); a cycle in the chain ends the walk."""
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc


class MosmosError(Exception):
    """A problem with the user's input (file, config, data). The CLI prints it without a traceback."""


class ConfigError(MosmosError, ValueError):
    """An invalid config key, type or value."""


class DataError(MosmosError, ValueError):
    """A dataset, table or volume that cannot be used as it is."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, found by ``mosmos check`` or a run's start-up checks.

    ``case`` is set when the problem belongs to one case (which can then be skipped); problems
    without a case concern a whole table or dataset.
    """

    path: str  # the file (or folder) at fault
    message: str  # what is wrong, in words a user can act on
    case: str | None = None  # the case id it belongs to
    dataset: str | None = None  # the dataset / table it belongs to
    severity: str = "error"  # "error" (unusable) or "warning" (usable, but look at it)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

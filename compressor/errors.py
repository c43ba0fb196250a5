"""Typed errors and the exit codes the CLI maps them to.

Exit codes (DESIGN.md, "CLI contract"):

* 0 success
* 1 a gate failed (a metric regression)
* 2 bad usage, recipe or input; nothing was written
* 3 any other failure
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 3


class CompressError(Exception):
    """Base class of every error the CLI reports without a traceback.

    Attributes:
        exit_code: the process exit status the CLI uses for this error.
    """

    exit_code = EXIT_FAILURE


class UserInputError(CompressError):
    """Bad usage, recipe, model or data given by the user (exit 2).

    Raised before anything is written, so a failed command leaves no run directory.
    """

    exit_code = EXIT_BAD_INPUT


class RecipeError(UserInputError):
    """One or more recipe problems, all reported at once.

    Args:
        problems: one human-readable line each, already naming file, line and field path.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the recipe:"
        super().__init__("\n".join([head, *("  - " + p for p in self.problems)]))


class NotBuiltError(UserInputError):
    """The recipe asks for a feature this version validates but does not run yet (exit 2)."""


class DataError(UserInputError):
    """Bad data: missing or corrupt images, empty captions, malformed annotation files (exit 2).

    Args:
        message: what is wrong and how to fix it.
        rows: the offending rows (one string each), listed in the message (first 20).
    """

    def __init__(self, message: str, rows: Iterable[str] = ()):
        self.rows = list(rows)
        text = message
        if self.rows:
            shown = self.rows[:20]
            text += "\n" + "\n".join("  - " + r for r in shown)
            if len(self.rows) > len(shown):
                text += f"\n  … and {len(self.rows) - len(shown)} more"
        super().__init__(text)


class ModelSpecError(UserInputError):
    """The model named by the recipe or the command line cannot be found or built (exit 2)."""


class GateFailed(CompressError):
    """A regression gate failed (exit 1). The report is still written."""

    exit_code = EXIT_GATE_FAILED


class StageError(CompressError):
    """A stage failed while running (exit 3 unless a more specific error is raised)."""


class VerificationError(CompressError):
    """A written artifact failed its check (reload, hash, numerical comparison) (exit 3)."""


class CorruptInputError(VerificationError):
    """A folder given as input fails its ``SHA256SUMS`` (corrupted, truncated or edited) (exit 2:
    bad input, not a failure of this run)."""

    exit_code = EXIT_BAD_INPUT


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest valid name, or an empty string.

    Args:
        name: the unknown name the user wrote.
        choices: the valid names.

    Returns:
        A sentence to append to an error message (with a leading space), or ``""``.
    """
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""

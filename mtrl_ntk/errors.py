"""The errors a run stops with, on the ground floor: any module raises them without climbing.

Every deliberate stop is a :class:`RunStopped` carrying the exit status the entry
point (``run_mt10.py``) uses; invalid input is a :class:`ConfigError` (exit status 2),
raised before any work starts.
"""

from __future__ import annotations

EXIT_FAILED = 1


class ConfigError(ValueError):
    """An invalid configuration: one line naming the key and what is allowed."""


class RunStopped(RuntimeError):
    """The run stopped before its last step, with a message for a person (no traceback)."""

    exit_code = EXIT_FAILED


class RunInterrupted(RunStopped):
    """SIGTERM or SIGINT: a checkpoint was written, then the run stopped."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number  # the shell's convention for "killed by signal"


class NonFiniteUpdates(RunStopped):
    """Too many consecutive updates had a non-finite loss or gradient."""


class CheckpointError(RunStopped):
    """A checkpoint could not be written or read; the previous one is intact."""


class EnvWorkerError(RuntimeError):
    """An environment worker died (a killed or crashed process, a failed EnvPool pool)."""

"""The exceptions the CLI turns into exit codes: bad input (exit 2) and preemption (exit 128 + signal)."""
from __future__ import annotations

from typing import Any

EXIT_CONFIG = 2  # bad option or file
EXIT_FAILED = 1  # the job ran and failed


class ConfigError(ValueError):
    """Bad input named by option or file. The CLI prints its message as one line and exits 2."""


class Preempted(BaseException):
    """A preemption signal arrived during training; a checkpoint was written.

    A BaseException so that no `except Exception` on the way up turns it into a failed job: the job must stop
    and be requeued, and its rerun resumes from the checkpoint.
    """

    def __init__(self, message: str, signum: int, previous_handler: Any) -> None:
        super().__init__(message)
        self.signum = signum
        self.previous_handler = previous_handler  # e.g. submitit's checkpoint-and-requeue handler

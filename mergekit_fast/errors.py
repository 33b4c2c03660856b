"""The package's error types, in one place so that every layer can raise them without import cycles.

Exit codes of the CLI: every error here (and every ValueError / OSError) is exit 2.
"""

from __future__ import annotations


class MergeError(RuntimeError):
    """The merge cannot proceed; the message says why (file, tensor or option)."""


class OutputError(MergeError):
    """OUT cannot be written as asked; the message names the paths and what to do."""


class Interrupted(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM, SIGHUP) ended the run; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

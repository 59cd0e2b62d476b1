"""The two failures a user sees as exit codes: bad input (2) and a failed run (3)."""

from __future__ import annotations

__all__ = ["BadInput", "RunFailed", "one_line", "EXIT_PASS", "EXIT_GATE_FAILED", "EXIT_BAD_INPUT", "EXIT_RUN_FAILED"]

EXIT_PASS = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 3


class BadInput(Exception):
    """A config, model file, weights, dataset or argument the harness cannot use.

    `where` names the file and/or key path; the message says what is wrong and, where it
    helps, what would have been valid. The CLI prints it as one line and exits 2.
    """

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}" if where else problem)


class RunFailed(Exception):
    """The run itself failed after the input was accepted (exit 3); finished results are kept."""


def one_line(error: object, limit: int = 300) -> str:
    """An exception's (or any) text on one line, cut to `limit` characters: how a message that quotes a
    library's error stays the one clear line bad input promises."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."

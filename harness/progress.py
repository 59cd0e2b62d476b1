"""Progress bars that show on a terminal or in Jupyter and stay quiet in CI logs."""

from __future__ import annotations

import sys
from typing import Optional

__all__ = ["progress_bar", "interactive"]


def interactive() -> bool:
    if getattr(sys.stderr, "isatty", lambda: False)():
        return True
    try:  # a Jupyter kernel: stderr is no TTY, but a widget bar is wanted
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
    except Exception:
        return False


def progress_bar(total: int, desc: str, enabled: Optional[bool] = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not (interactive() if enabled is None else enabled))

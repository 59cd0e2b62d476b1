"""Progress bars for a terminal and for Jupyter, silent where nobody watches (CI logs, pipes).

tqdm.auto draws a widget in a Jupyter kernel (a text bar there when ipywidgets is missing) and a
text bar on a terminal. Whether to draw at all is decided here, not by tqdm: a bar written into a
pipe or a CI log is a screen of carriage returns.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

__all__ = ["progress_bar", "interactive", "in_notebook"]


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (notebook, lab, VS Code, Colab): there stderr is no
    TTY, yet the frontend shows a bar."""
    if "ipykernel.zmqshell" not in sys.modules:  # never import IPython to find out
        return False
    try:
        from IPython import get_ipython
        from ipykernel.zmqshell import ZMQInteractiveShell
    except Exception:
        return False
    return isinstance(get_ipython(), ZMQInteractiveShell)


def _ci() -> bool:
    # Some CI runners (Buildkite, Jenkins with a PTY) hand the job a terminal; their logs still
    # should not fill with redrawn bars.
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def interactive() -> bool:
    """Whether someone watches the run: a Jupyter kernel, or a terminal on stderr outside CI."""
    if _ci():
        return False
    if in_notebook():
        return True
    try:
        tty = bool(sys.stderr.isatty())
    except (AttributeError, ValueError, OSError):  # no stderr, a replaced one, or a closed one
        return False
    return tty and os.environ.get("TERM") != "dumb"


def progress_bar(total: int, desc: str, enabled: Optional[bool] = None) -> Any:
    """A tqdm bar counting batches; a no-op bar when `enabled` is False, or is None and
    `interactive()` says nobody watches. Use as a context manager, `.update(n)` per batch."""
    import warnings

    with warnings.catch_warnings():
        # tqdm.auto warns once when a kernel lacks ipywidgets, then falls back to a text bar,
        # which Jupyter shows as well: nothing for the user to act on mid-run.
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

    show = interactive() if enabled is None else bool(enabled)
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not show, dynamic_ncols=True)

"""A quiet terminal: the engines' own chatter (xfuser's DEBUG/INFO lines, transformers'
torchvision notices, torch's deprecation warnings) is not shown, for `spectrum-xdit generate`
unless ``--verbose`` and for the server's ranks unless ``--debug``. Errors still are."""

from __future__ import annotations

import contextlib
import logging
import warnings


def silence_engines() -> None:
    """For the rest of this process: every logger's WARNING and below (xfuser's own handlers
    too), and future and deprecation warnings."""
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@contextlib.contextmanager
def quiet_engines(enabled: bool = True):
    """:func:`silence_engines` for the duration of the block."""
    if not enabled:
        yield
        return
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        silence_engines()
        try:
            yield
        finally:
            logging.disable(previous)

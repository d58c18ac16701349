"""A quiet terminal for `spectrum-xdit generate`: the engines' own chatter (xfuser's DEBUG/INFO
lines, transformers' torchvision notices, torch's deprecation warnings) is not shown unless
``--verbose`` asks for it. Errors still are."""

from __future__ import annotations

import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet_engines(enabled: bool = True):
    if not enabled:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)   # every logger's WARNING and below, xfuser's own handlers too
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            yield
        finally:
            logging.disable(previous)

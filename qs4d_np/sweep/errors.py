"""The error every part of a sweep raises for a problem of the user's input."""
from __future__ import annotations


class SweepError(ValueError):
    """A bad spec, a sweep directory of another spec, an unreachable scheduler, an unmeetable budget.

    A ``ValueError`` so that the command line reports it as one message (no traceback), like its
    other input errors.
    """

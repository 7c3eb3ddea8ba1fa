"""The errors of :mod:`spray.correction`: every bad input to a correction is a :class:`CorrectionError`."""

from __future__ import annotations


class CorrectionError(ValueError):
    """A correction that cannot be built as asked; the message says why and how to fix it."""


class CAVError(CorrectionError):
    """A CAV cannot be estimated from the given samples or parameters; the message says why and how to fix it."""

"""The error types a user can cause; every CLI prints them as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the CLIs print it on one line and exit 2."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""

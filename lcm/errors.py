"""The project's own exception types.

Every error a user can cause (bad input file, bad config, wrong checkpoint) is raised as a
subclass of :class:`LcmError` whose message names the offending file and what is wrong. The
CLI turns these into one readable line and a non-zero exit; anything else is a bug.
"""

from __future__ import annotations


class LcmError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class DataError(LcmError):
    """A dataset file (annotations, images, shards, masks, manifests) is missing or malformed."""


class ConfigError(LcmError):
    """params.yaml or a command-line option is invalid."""


class CheckpointError(LcmError):
    """A model directory is missing, incomplete or incompatible with the request."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries add context lines below)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""Hand what a command already checked to the flow it starts, in the same process.

``lcm evaluate`` and ``lcm batch-predict`` check their inputs before a Prefect server starts
(a bad path fails in a second, as one line). The flow they then call takes plain parameters
(a deployment's run builds the same flow from JSON), so the resolved inputs travel beside
them: :func:`hand_over` keeps them under a token, the flow passes the token on, and
:func:`take` gives them back once. A run in another process (a deployment's worker, a Dask
worker) finds no token and checks its inputs itself.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

_HANDED: dict[str, Any] = {}
_LOCK = threading.Lock()


def hand_over(value: Any) -> str:
    """Keep ``value`` for one :func:`take` in this process; returns its token."""
    token = uuid.uuid4().hex
    with _LOCK:
        _HANDED[token] = value
    return token


def take(token: str | None) -> Any | None:
    """The value handed over under ``token`` (once), or None."""
    if not token:
        return None
    with _LOCK:
        return _HANDED.pop(token, None)

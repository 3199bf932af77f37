"""Small pieces the flows share."""

from __future__ import annotations

from typing import Any

from lcm.errors import LcmError


def retry_unless_user_error(_task: Any, _run: Any, state: Any) -> bool:
    """A bad input fails the same way twice: retry only unexpected failures."""
    try:
        state.result()
    except LcmError:
        return False
    except Exception:
        return True
    return False

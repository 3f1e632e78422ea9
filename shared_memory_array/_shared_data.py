"""PLACEHOLDER: SharedData (issue 3) is being written; replace this whole file."""

from __future__ import annotations

__all__ = ["SharedData"]


class SharedData:
    pass

"""PLACEHOLDER: list_blocks/cleanup (issue 5) are being written; replace this whole file."""

from __future__ import annotations

__all__ = ["BlockInfo", "CleanupResult", "cleanup", "list_blocks"]


class BlockInfo:
    pass


class CleanupResult:
    pass


def list_blocks() -> list[BlockInfo]:
    raise NotImplementedError


def cleanup(dry_run: bool = False) -> CleanupResult:
    raise NotImplementedError

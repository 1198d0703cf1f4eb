"""Errors of the core that callers map (kept apart from the modules that import torch)."""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export that failed one of its checks."""

    code = "export_failed"

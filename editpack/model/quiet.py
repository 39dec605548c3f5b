"""Keeping the libraries quiet while editpack loads and saves models: transformers' per-tensor progress bars,
and log messages that would repeat on every call."""

from __future__ import annotations

import contextlib
import logging

from .._lazy import hf_logging


class _OnceFilter(logging.Filter):
    """Let a log message that starts with ``prefix`` through the first time only."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def log_once(logger_name: str, prefix: str) -> None:
    """bitsandbytes logs its 8-bit cast warning on every matmul (hundreds per generated token)."""
    log = logging.getLogger(logger_name)
    if not any(isinstance(f, _OnceFilter) and f.prefix == prefix for f in log.filters):
        log.addFilter(_OnceFilter(prefix))


@contextlib.contextmanager
def quiet_progress():
    """Hide transformers' per-tensor "Loading weights" and "Writing model shards" bars (restored afterwards)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

"""One log format for the driver and the replicas."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stderr(level: int) -> None:
    """Send this package's log records at ``level`` and above to stderr, which Ray forwards to the
    driver: a Ray worker starts with logging's defaults, which print warnings only."""
    logger = logging.getLogger("pipeline")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)

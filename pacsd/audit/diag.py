"""Diagnostic logging for operators (stderr), kept apart from the audit trail.

structlog renders key=value lines; stdlib loggers (pynetdicom's among them) go through
the same ProcessorFormatter, so every line on stderr has one shape. Audit records never
pass through here.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def configure_logging(level: str = "info") -> None:
    """Configure structlog and stdlib logging to stderr; raises ValueError for a bad level."""
    try:
        lvl = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level {level!r} is not one of {', '.join(_LEVELS)}") from None
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(
                key_order=["timestamp", "level", "logger", "event"], drop_missing=True),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    # pynetdicom narrates every PDU at INFO; operators want its warnings unless debugging
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if lvl == logging.DEBUG
                                             else logging.WARNING)

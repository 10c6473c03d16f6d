"""Logging set-up for the command-line tools: plain text, or one JSON object per line.

``setup_logging(level, "json")`` makes every record one line such as::

    {"time": "2026-12-05T13:00:00.123+00:00", "level": "WARNING", "logger": "remoterl.broker.sessions",
     "message": "worker w1 (0a1b2c3d) missed its heartbeats; purging it (4 slots)"}

with ``"exc"`` (the formatted traceback) when the record carries an exception, ready for
a log shipper (Loki, Elasticsearch, CloudWatch) to parse. Library code never calls this;
only the entry points do (``remoterl-broker``, ``remoterl-worker`` and their child
processes).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

__all__ = ["FORMATS", "JsonFormatter", "announce", "setup_logging"]

FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, and ``exc`` when there is exception or stack text."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def setup_logging(level: int, fmt: str = "text") -> None:
    """Send log records of ``level`` and above to stderr, as text or JSON lines (``fmt``),
    replacing the root logger's handlers (what ``logging.basicConfig(force=True)`` does).

    Raises:
        ValueError: ``fmt`` is not one of :data:`FORMATS`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def announce(logger: str, message: str, fmt: str = "text") -> None:
    """Tell the operator ``message`` on stderr whatever the log level (a CLI's "listening on",
    "stopped"): the text as it is, or in ``json`` one record of level INFO from ``logger``."""
    if fmt == "json":
        record = logging.LogRecord(logger, logging.INFO, __file__, 0, message, None, None)
        line = JsonFormatter().format(record)
    else:
        line = message
    sys.stderr.write(line + "\n")
    sys.stderr.flush()

"""What this process last saw of the database's storage: a full disk cannot be recorded *in* the
database, so the alarm lives here, in memory, is logged at CRITICAL for the operators' log alerting,
and /healthz reports it (503) until a later write succeeds."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, Any] = {"since": None, "last": None, "sqlstate": None}


def is_storage_error(exc: BaseException) -> bool:
    """Disk full (53100) or out of memory/resources (class 53): the database cannot store anything."""
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.Error) and isinstance(sqlstate, str) and sqlstate.startswith("53")


def storage_failed(exc: BaseException) -> None:
    now = datetime.now(UTC)
    with _lock:
        first = _state["since"] is None
        _state.update(since=_state["since"] or now, last=now, sqlstate=getattr(exc, "sqlstate", None))
    if first:
        log.critical("ops.storage_full: the database cannot store data; nothing is scored until it can",
                     extra={"sqlstate": getattr(exc, "sqlstate", None)})


def storage_ok() -> None:
    with _lock:
        was = _state["since"]
        _state.update(since=None, last=None, sqlstate=None)
    if was is not None:
        log.warning("ops.storage_recovered: the database stores data again", extra={"since": was.isoformat()})


def storage_alarm() -> dict[str, Any] | None:
    with _lock:
        if _state["since"] is None:
            return None
        return {"code": "ops.storage_full", "since": _state["since"].isoformat(), "last": _state["last"].isoformat(),
                "sqlstate": _state["sqlstate"]}


@contextmanager
def storage_watch() -> Iterator[None]:
    """Around a unit of work that writes: a storage error raises the alarm (and propagates), a success
    clears it."""
    try:
        yield
    except psycopg.Error as exc:
        if is_storage_error(exc):
            storage_failed(exc)
        raise
    storage_ok()

"""Keep patient text and identifiers out of logs: a structlog processor and a stdlib logging.Filter.

Logs travel further than the database (aggregators, support tickets, developers' terminals) and are
not encrypted or erased with the patient, so nothing that identifies a patient or quotes them may
reach them. Two layers:

* values under keys that carry patient data (``text``, ``payload``, ``name``, ``telecom`` ...) are
  replaced by ``[redacted]`` whatever they contain;
* every other string is masked where it looks like an identifier or patient text: FHIR Patient
  references, Chinese resident ID numbers (18 digits), phone numbers, e-mail addresses, and runs of
  two or more CJK characters (patient text in this service is mostly Chinese; single characters are
  kept so that e.g. unit labels survive).

Use :func:`configure_logging` once per process; it routes structlog and stdlib logging through the
same scrubbing and one renderer (JSON lines by default).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[redacted]"
SENSITIVE_KEYS = frozenset(k.lower().replace("_", "") for k in (
    "text", "message_text", "payload", "content", "name", "given", "family", "birthDate", "birth_date",
    "telecom", "address", "identifier", "resource", "transcript", "answer", "note", "valueString",
    "contentString", "display", "phone", "email", "id_card", "comment", "body"))
# structlog/stdlib keys that are ours, never patient data, even when they match a name above
_SAFE_KEYS = frozenset({"event", "level", "logger", "timestamp", "exc_info", "exception", "stack"})

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bPatient/[A-Za-z0-9\-.]{1,64}"), "Patient/[id]"),
    (re.compile(r"(?<![0-9])[1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"
                r"[0-9]{3}[0-9Xx](?![0-9A-Za-z])"), "[id-card]"),
    (re.compile(r"(?<![0-9])[0-9]{17}[0-9Xx](?![0-9])"), "[id-card]"),
    (re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"), "[email]"),
    (re.compile(r"(?<![0-9])(?:\+?86[\s\-]?)?1[3-9][0-9](?:[\s\-]?[0-9]{4}){2}(?![0-9])"), "[phone]"),
    (re.compile(r"(?<![0-9])0[0-9]{2,3}-[0-9]{7,8}(?![0-9])"), "[phone]"),
    (re.compile(r"\+[0-9][0-9\s\-().]{7,16}[0-9]"), "[phone]"),
    (re.compile(r"(?<![0-9])\(?[0-9]{3}\)?[\s\-.][0-9]{3}[\s\-.][0-9]{4}(?![0-9])"), "[phone]"),
    (re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
                "\U00020000-\U0002ebef]{2,}"), "[cjk]"),
)


def scrub_text(text: str) -> str:
    """Mask identifiers and patient text inside a free string."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _is_sensitive(key: Any) -> bool:
    folded = str(key).lower().replace("_", "").replace("-", "")
    return folded in SENSITIVE_KEYS


def scrub_value(value: Any, key: Any = None) -> Any:
    """Scrub one value: redacted under a sensitive key, masked if a string, recursed into containers."""
    if key is not None and key not in _SAFE_KEYS and _is_sensitive(key):
        return REDACTED if value not in (None, "", [], {}) else value
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        return {k: scrub_value(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [scrub_value(v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return scrub_text(repr(value))  # anything else is rendered, so scrub what it renders to


def scrub_event(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: place after ``format_exc_info`` and before the renderer."""
    for key in list(event_dict):
        if key.startswith("_"):
            continue  # structlog internals (_record, _from_structlog)
        event_dict[key] = scrub_value(event_dict[key], key)
    return event_dict


_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class PhiFilter(logging.Filter):
    """stdlib filter: scrubs the formatted message, ``extra`` fields and the exception text in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):
            return True  # from structlog: its event dict already went through scrub_event
        if not getattr(record, "_phi_scrubbed", False):
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a broken format string must not stop logging
                message = str(record.msg)
            record.msg = scrub_text(message)
            record.args = None
            for key, value in list(vars(record).items()):
                if key not in _RECORD_ATTRS and not key.startswith("_"):
                    setattr(record, key, scrub_value(value, key))
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = scrub_text(record.exc_text)
            if record.stack_info:
                record.stack_info = scrub_text(record.stack_info)
            record._phi_scrubbed = True
        return True


def configure_logging(json: bool = True, *, level: int | str = "INFO", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging through one handler on ``stream`` (stderr) with PHI scrubbing;
    JSON lines when ``json``, else a readable console format. Idempotent."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        scrub_event,
    ]
    renderer: Any = structlog.processors.JSONRenderer(ensure_ascii=False) if json \
        else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(PhiFilter())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    handler._cds_scrubbing = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_cds_scrubbing", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)

"""compliance.logscrub: a log line with PHI, through the real configured loggers, contains none of it."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from compliance.logscrub import PhiFilter, configure_logging, scrub_event, scrub_text

PHI = ["我不想活了", "张三", "13812345678", "138 1234 5678", "+86 138-1234-5678", "010-62345678",
       "110105199003074518", "11010519900307451X", "zhang.san@example.com", "Patient/123", "Patient/abc-9",
       "1990-03-07", "北京市朝阳区", "Zhang", "San"]


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging(json=True, stream=buf)
    yield buf
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    structlog.reset_defaults()


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def _assert_clean(text: str) -> None:
    for phi in PHI:
        assert phi not in text, f"{phi!r} leaked into the log: {text}"


def test_structlog_line_with_phi_contains_none_of_it(captured: io.StringIO) -> None:
    log = structlog.get_logger("cds.pipeline")
    log.info("screened message for Patient/123 我不想活了", patient_ref="Patient/123", text="我不想活了",
             resource={"resourceType": "Patient", "name": [{"family": "Zhang", "given": ["San"]}],
                       "birthDate": "1990-03-07", "telecom": [{"value": "13812345678"}],
                       "address": [{"text": "北京市朝阳区"}]},
             note="call 138 1234 5678 or +86 138-1234-5678 or 010-62345678",
             contact="zhang.san@example.com", id_number="110105199003074518",
             tier=4, event_id=42, rule="suicidal-ideation-v2", score=0.93)
    out = captured.getvalue()
    _assert_clean(out)
    line = _lines(captured)[0]
    assert line["tier"] == 4 and line["event_id"] == 42 and line["score"] == 0.93
    assert line["rule"] == "suicidal-ideation-v2" and line["level"] == "info"
    assert line["text"] == "[redacted]" and line["resource"] == "[redacted]"
    assert line["patient_ref"] == "Patient/[id]" and line["id_number"] == "[id-card]"
    assert line["event"] == "screened message for Patient/[id] [cjk]"


def test_stdlib_logging_extras_and_exceptions_are_scrubbed(captured: io.StringIO) -> None:
    log = logging.getLogger("integrations.fhir")
    log.warning("bad input from %s: %s", "Patient/abc-9", "我不想活了", extra={"payload": {"x": "张三"},
                                                                               "phone": "13812345678",
                                                                               "attempts": 3})
    try:
        raise ValueError("cannot parse answer 我不想活了 for Patient/123, id 11010519900307451X")
    except ValueError:
        log.exception("parse failed")
        structlog.get_logger().exception("parse failed again")
    out = captured.getvalue()
    _assert_clean(out)
    first, second, third = _lines(captured)
    assert first["event"] == "bad input from Patient/[id]: [cjk]" and first["attempts"] == 3
    assert first["payload"] == "[redacted]"
    assert "ValueError: cannot parse answer [cjk] for Patient/[id], id [id-card]" in second["exception"]
    assert "ValueError" in third["exception"]


def test_scrub_text_keeps_what_is_not_phi() -> None:
    assert scrub_text("event 1700000000123 took 12.5 ms at 2024-01-01T00:00:00+00:00") == \
        "event 1700000000123 took 12.5 ms at 2024-01-01T00:00:00+00:00"
    assert scrub_text("tier 高 risk") == "tier 高 risk"  # a single CJK character is kept
    assert scrub_text("RiskAssessment/77 Practitioner/9") == "RiskAssessment/77 Practitioner/9"
    assert scrub_text("Patient/7") == "Patient/[id]"


def test_processor_and_filter_work_on_their_own() -> None:
    event = scrub_event(None, "info", {"event": "hi 张三", "given": "San", "_record": "internal"})
    assert event == {"event": "hi [cjk]", "given": "[redacted]", "_record": "internal"}
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("张三",), None)
    assert PhiFilter().filter(record) and record.getMessage() == "hello [cjk]"

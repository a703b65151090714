"""The worker's cache of earlier chat messages (cds.store.events.ContextCache), on real PostgreSQL with the
real cipher: each message is decrypted once for context, not once per later message, and an erased patient's
messages are never served from it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.samples import stored_chat

pytestmark = pytest.mark.integration

REF = "Patient/ctx-1"


def _say(service: Any, text: str) -> str:
    r = stored_chat(REF, text, session="S-ctx")
    [result] = service.pipeline.ingest_batch([r], source="ehr")
    assert result.event_id is not None
    return str(r["id"])


class _Spy:
    """The real cipher, with the AADs it was asked to decrypt written down (nothing else changes)."""

    def __init__(self, cipher: Any) -> None:
        self._cipher = cipher
        self.opened: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cipher, name)

    def decrypt(self, conn: Any, blob: bytes, aad: bytes) -> bytes:
        self.opened.append(aad.decode())
        return bytes(self._cipher.decrypt(conn, blob, aad))


def _opened_messages(spy: _Spy) -> list[str]:
    return [aad.split("|")[3] for aad in spy.opened if aad.startswith("events.resource|")]


def test_each_earlier_message_is_decrypted_once_and_the_assessment_still_reads_it(service: Any) -> None:
    spy = _Spy(service.pipeline.cipher)
    service.pipeline.cipher = spy
    try:
        first = _say(service, "I keep thinking about the pills")
        [done] = service.pipeline.process_pending()
        assert done.status == "done"
        later = [_say(service, text) for text in ("work was long", "I bought them today")]
        spy.opened.clear()
        results = service.pipeline.process_pending(1) + service.pipeline.process_pending(1)
    finally:
        service.pipeline.cipher = spy._cipher
    assert [r.status for r in results] == ["done", "done"]
    # Each new message is opened once, when claimed; the earlier ones come from the cache (what each said was
    # kept when it was assessed), "first" included.
    assert _opened_messages(spy) == later
    # The context still counts: the pills before "I bought them today" make it high, as without the cache.
    assert results[-1].assessment is not None and results[-1].assessment.tier.label in ("high", "imminent")
    assert first not in _opened_messages(spy)


def test_an_erased_patients_messages_are_not_served_from_the_cache(service: Any) -> None:
    from compliance.crypto import erase_subject

    _say(service, "I keep thinking about the pills")
    [done] = service.pipeline.process_pending()
    assert done.status == "done" and len(service.pipeline.context_cache) == 1  # kept as it was assessed
    _say(service, "work was long")
    [done] = service.pipeline.process_pending()
    assert done.status == "done" and len(service.pipeline.context_cache) == 2
    with service.pool.connection() as conn:
        assert erase_subject(conn, REF, "PIPL Art. 47 request (test)", "Practitioner/dpo") == 1
    _say(service, "I bought them today")
    [after] = service.pipeline.process_pending()
    # The earlier messages cannot be read any more: not from the database, and not from the cache either.
    assert after.status != "done" and after.assessment is None

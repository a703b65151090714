"""Builders for synthetic FHIR test resources (never real patients)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

PHQ9_ITEMS = ("44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8")
PHQ9_ANSWERS = {0: ("LA6568-5", "Not at all"), 1: ("LA6569-3", "Several days"),
                2: ("LA6570-1", "More than half the days"), 3: ("LA6571-9", "Nearly every day")}


def patient(family: str = "Test", given: str = "Pat", mrn: str = "MRN-T-1") -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family, "given": [given]}],
            "identifier": [{"system": "http://hospital.example.org/mrn", "value": mrn}],
            "gender": "female", "birthDate": "1990-04-01"}


def phq9(patient_ref: str, answers: Sequence[int | None], *, slash: bool = True,
         authored: str = "2026-11-20T03:00:00Z") -> dict[str, Any]:
    items = []
    for code, value in zip(PHQ9_ITEMS, answers):
        item: dict[str, Any] = {"linkId": ("/" if slash else "") + code}
        if value is not None:
            la, display = PHQ9_ANSWERS[value]
            item["answer"] = [{"valueCoding": {"system": "http://loinc.org", "code": la, "display": display}}]
        items.append(item)
    return {"resourceType": "QuestionnaireResponse", "status": "completed",
            "questionnaire": "http://loinc.org/q/44249-1", "subject": {"reference": patient_ref},
            "authored": authored, "item": items}


def chat(patient_ref: str, text: str, *, session: str = "S-1", sent: str = "2026-11-20T03:00:00Z",
         sender: str | None = None) -> dict[str, Any]:
    return {"resourceType": "Communication", "status": "completed", "subject": {"reference": patient_ref},
            "identifier": [{"system": "http://hospital.example.org/chat-session", "value": session}],
            "category": [{"text": "counselling-chat"}], "sent": sent,
            "sender": {"reference": sender or patient_ref}, "payload": [{"contentString": text}]}


def stored_chat(patient_ref: str, text: str, *, session: str, resource_id: str | None = None) -> dict[str, Any]:
    """``chat`` as the EHR hands it out: with an id and ``meta.versionId`` (what an ingested event is keyed by)."""
    r = chat(patient_ref, text, session=session)
    r["id"] = resource_id or str(uuid.uuid4())
    r["meta"] = {"versionId": "1", "lastUpdated": "2026-12-07T10:00:00.000Z"}
    return r


def sign_in(client: Any, service: Any, role: str = "nurse", *, username: str | None = None,
            wards: tuple[str, ...] = ("*",), password: str = "correct horse battery") -> Any:
    """Create a user with ``role`` and sign the Flask test client in through the real login form."""
    from cds.web.auth import create_user

    name = username or f"{role}-1"
    with service.pool.connection() as conn:
        user = create_user(conn, username=name, display=name.title(), role=role, password=password, wards=wards)
        conn.commit()
    with client.session_transaction() as sess:
        sess["csrf"] = "test-csrf"
    r = client.post("/auth/login", data={"username": name, "password": password, "csrf_token": "test-csrf"})
    assert r.status_code == 302, r.data
    with client.session_transaction() as sess:
        sess["csrf"] = "test-csrf"
    return user


def wait_until(check: Any, timeout_s: float = 30.0, every_s: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy (a generous bound, not a timing assertion)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s} s")

"""Sign-in, lock-out, idle timeout, CSRF and access by need (real DB, real app)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cds.errors import InputError
from cds.web import auth
from tests.samples import sign_in

pytestmark = pytest.mark.integration


def _login(client: Any, username: str, password: str) -> Any:
    with client.session_transaction() as sess:
        sess["csrf"] = "t"
    return client.post("/auth/login", data={"username": username, "password": password, "csrf_token": "t"})


def test_passwords_are_scrypt_hashed_and_checked() -> None:
    stored = auth.hash_password("correct horse battery")
    assert stored.startswith("scrypt$") and "correct" not in stored
    assert auth.check_password(stored, "correct horse battery")
    assert not auth.check_password(stored, "wrong horse battery")


def test_sign_in_sign_out_and_audit(client: Any, service: Any) -> None:
    sign_in(client, service, "nurse", username="zhou")
    assert client.get("/triage").status_code == 200
    r = client.post("/auth/logout", data={"csrf_token": "test-csrf"})
    assert r.status_code == 302
    assert client.get("/triage").status_code == 302
    with service.pool.connection() as conn:
        events = [r[0] for r in conn.execute("SELECT event_type FROM audit_log WHERE actor = 'zhou' ORDER BY seq")]
    assert events[0] == "login" and "logout" in events


def test_five_failures_lock_the_account(client: Any, service: Any) -> None:
    with service.pool.connection() as conn:
        auth.create_user(conn, username="li", display="Li", role="nurse", password="correct horse battery")
        conn.commit()
    for _ in range(5):
        assert _login(client, "li", "wrong password!!").status_code == 401
    locked = _login(client, "li", "correct horse battery")
    assert locked.status_code == 401 and b"15" in locked.data  # even the right password, while locked
    with service.pool.connection() as conn:
        failed = conn.execute("SELECT count(*) FROM audit_log WHERE event_type = 'login.failed'").fetchone()[0]
    assert failed == 6


def test_idle_session_ends(client: Any, service: Any) -> None:
    sign_in(client, service, "nurse")
    with client.session_transaction() as sess:
        sess["seen"] = sess["seen"] - auth.IDLE_MINUTES * 60 - 1
    assert client.get("/triage").status_code == 302


def test_forms_without_the_csrf_token_are_refused(client: Any, service: Any) -> None:
    sign_in(client, service, "nurse")
    r = client.post("/auth/logout", data={})
    assert r.status_code == 403


def test_wrong_role_gets_403_and_is_audited(client: Any, service: Any) -> None:
    sign_in(client, service, "compliance", username="auditor")
    r = client.get("/triage", headers={"Accept": "text/html"})
    assert r.status_code == 403
    with service.pool.connection() as conn:
        denied = conn.execute("SELECT count(*) FROM audit_log WHERE event_type = 'access.denied'"
                              " AND actor = 'auditor'").fetchone()[0]
    assert denied == 1


def test_clinicians_see_their_wards_and_others_need_break_glass(service: Any) -> None:
    now = datetime.now(UTC)
    with service.pool.connection() as conn:
        conn.execute("INSERT INTO patients (patient_ref, ward) VALUES ('Patient/w5', 'ward5'),"
                     " ('Patient/w9', 'ward9')")
        nurse = auth.create_user(conn, username="n5", display="N5", role="nurse", password=None, wards=("ward5",))
        officer = auth.create_user(conn, username="c1", display="C1", role="compliance", password=None,
                                   wards=("*",))
        assert auth.can_see_patient(conn, nurse, "Patient/w5", now)
        assert not auth.can_see_patient(conn, nurse, "Patient/w9", now)
        assert not auth.can_see_patient(conn, officer, "Patient/w5", now)  # audit data, not transcripts
        with pytest.raises(InputError, match="reason"):
            auth.grant_break_glass(conn, nurse, "Patient/w9", "short")
        auth.grant_break_glass(conn, nurse, "Patient/w9", "patient transferred at night, on-call cover")
        assert auth.can_see_patient(conn, nurse, "Patient/w9", now)
        conn.commit()
        logged = conn.execute("SELECT count(*) FROM audit_log WHERE event_type = 'break-glass'").fetchone()[0]
    assert logged == 1

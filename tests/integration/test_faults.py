"""Faults a hospital will have: the database restarts, a worker is killed, the model file or the
key-encryption key is wrong. Nothing may be lost, doubled, or silently scored as "none"."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cds.errors import ConfigError, ModelError
from cds.jobs import ingest_cycle
from cds.settings import REPO_ROOT
from tests.samples import chat, patient, phq9

pytestmark = pytest.mark.integration


def test_postgres_restart_mid_stream_loses_nothing(ehr: Any, service: Any, restart_postgres: Any) -> None:
    refs = []
    for i in range(3):
        ref = f"Patient/{ehr.create(patient(mrn=f'MRN-F-{i}'))['id']}"
        refs.append(ref)
        ehr.create(phq9(ref, [1, 1, 1, 1, 1, 1, 1, 1, 2]))
    ingest_cycle(service)
    restart_postgres()  # every pooled connection is now broken
    for ref in refs:
        ehr.create(chat(ref, "I have saved up my pills and I will take them tonight"))
    for _ in range(3):  # the pool notices broken connections and reconnects; a failed round is retried
        try:
            ingest_cycle(service)
        except psycopg.OperationalError:
            time.sleep(0.5)
    ingest_cycle(service)
    with service.pool.connection() as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM events GROUP BY status").fetchall())
        pending_out = conn.execute("SELECT count(*) FROM outbox WHERE status <> 'sent'").fetchone()[0]
    assert statuses == {"done": 6}
    assert pending_out == 0
    for ref in refs:
        assert len(ehr.search("Flag", subject=ref)) == 1  # raised to stat once, never doubled
        assert len(ehr.search("Task", patient=ref)) == 1


def test_a_worker_killed_mid_batch_leaves_its_work_to_another(ehr: Any, settings_env: dict[str, str],
                                                               service: Any) -> None:
    n_patients, per_patient = 20, 6
    refs = [f"Patient/{ehr.create(patient(mrn=f'MRN-K-{i}'))['id']}" for i in range(n_patients)]
    entries = [{"resource": chat(ref, text, session=f"S-{ref}"), "request": {"method": "POST", "url": "Communication"}}
               for ref in refs for text in ["I want to die", "I bought a rope today", "tonight", "ok",
                                            "I can't go on", "goodbye everyone"][:per_patient]]
    ehr.http.post(ehr.base, json={"resourceType": "Bundle", "type": "batch", "entry": entries},
                  timeout=60).raise_for_status()
    env = {**os.environ, **settings_env, "CDS_WORKER_BATCH_SIZE": "40", "CDS_LOG_FORMAT": "json"}
    worker = subprocess.Popen([sys.executable, "-m", "cds.cli", "worker"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill it once it has started assessing, before it finishes
            with service.pool.connection() as conn:
                done = conn.execute("SELECT count(*) FROM events WHERE status = 'done'").fetchone()[0]
            if done >= 1:
                break
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
    for _ in range(10):  # another worker (this process) picks up whatever was claimed or left
        ingest_cycle(service)
    with service.pool.connection() as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM events GROUP BY status").fetchall())
        per_event = conn.execute("SELECT max(n) FROM (SELECT count(*) AS n FROM assessments WHERE NOT shadow"
                                 " GROUP BY event_id) x").fetchone()[0]
        open_alerts = conn.execute("SELECT count(*) FROM alerts WHERE kind = 'risk' AND status <> 'resolved'"
                                   ).fetchone()[0]
    assert statuses == {"done": n_patients * per_patient}
    assert per_event == 1  # no event assessed twice
    assert open_alerts == n_patients  # one per patient, none doubled, none lost
    flags = ehr.search("Flag", _count=1000)
    keys = [f["identifier"][0]["value"] for f in flags]
    assert len(keys) == len(set(keys))


def test_a_corrupt_model_stops_start_up_unless_degraded_mode_is_chosen(tmp_path: Path, settings_env: dict[str, str],
                                                                      service: Any, ehr: Any) -> None:
    from cds.pipeline import Engines
    from cds.service import Service
    from cds.settings import Settings

    model_dir = tmp_path / "model"
    shutil.copytree(REPO_ROOT / "cds" / "nlp" / "model", model_dir)
    with open(model_dir / "model.onnx", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00" * 64)
    with pytest.raises(ModelError, match="sha256|corrupt|match"):
        Engines.load(Settings.from_env({**settings_env, "CDS_MODEL_DIR": str(model_dir)}))
    result = subprocess.run([sys.executable, "-m", "cds.cli", "worker"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **settings_env, "CDS_MODEL_DIR": str(model_dir)})
    assert result.returncode != 0 and "ModelError" in result.stderr and "Traceback" not in result.stderr

    degraded = Settings.from_env({**settings_env, "CDS_MODEL_DIR": str(model_dir), "CDS_REQUIRE_MODEL": "false"})
    svc = Service.start(degraded, migrate=False, pool_size=2)
    try:
        ref = f"Patient/{ehr.create(patient(mrn='MRN-M-1'))['id']}"
        ehr.create(chat(ref, "I have saved up the pills and I will take them all tonight"))
        ehr.create(chat(ref, "今天天气不错", session="S-2"))
        ingest_cycle(svc)
        with svc.pool.connection() as conn:
            rows = conn.execute("SELECT tier, flags, missing FROM assessments WHERE patient_ref = %s ORDER BY id",
                                (ref,)).fetchall()
        assert rows[0][0] >= 3  # the safety net still catches the explicit plan
        assert all("indeterminate" in r[1] for r in rows)  # never silently "none"
        assert any("text risk model" in m for r in rows for m in r[2])
        from cds.web import create_app

        health = create_app(svc, {"TESTING": True}).test_client().get("/healthz").get_json()
        assert health["model"]["status"] == "unavailable"
    finally:
        svc.close()


def test_a_wrong_key_encryption_key_is_refused_at_start_up(settings_env: dict[str, str], service: Any,
                                                           ehr: Any, tmp_path: Path) -> None:
    from cds.service import Service
    from cds.settings import Settings

    ref = f"Patient/{ehr.create(patient(mrn='MRN-K-9'))['id']}"
    ehr.create(phq9(ref, [0] * 9))
    ingest_cycle(service)  # data keys now exist, wrapped under the demo KEK
    other = tmp_path / "other-kek.key"
    with pytest.raises(ConfigError, match="does not match the stored data keys"):
        Service.start(Settings.from_env({**settings_env, "CDS_KEK_FILE": str(other), "CDS_DEMO": "true",
                                         "CDS_DATA_DIR": str(tmp_path / "other")}), migrate=False, pool_size=1)


def test_an_event_that_cannot_be_assessed_is_parked_and_the_rest_of_its_batch_is_assessed(
        ehr: Any, service: Any) -> None:
    # A QuestionnaireResponse that passes intake but whose answer is impossible (scoring refuses it)
    # sits in one batch between two good chat messages.
    ref = f"Patient/{ehr.create(patient(mrn='MRN-F-P'))['id']}"
    bad = phq9(ref, [1] * 9)
    bad["item"][3]["answer"][0]["valueCoding"]["code"] = "LA-not-an-answer"
    ehr.create(chat(ref, "I keep thinking about killing myself", session="S-p1"))
    bad_id = ehr.create(bad)["id"]
    ehr.create(chat(ref, "我想自杀，每天都在想", session="S-p2"))
    ingest_cycle(service)
    with service.pool.connection() as conn:
        rows = conn.execute("SELECT resource_type, resource_id, status, attempts, last_error FROM events"
                            " WHERE patient_ref = %s ORDER BY id", (ref,)).fetchall()
        assessed = conn.execute("SELECT count(*) FROM assessments a JOIN events e ON e.id = a.event_id"
                                " WHERE e.patient_ref = %s AND NOT a.shadow", (ref,)).fetchone()[0]
    assert sorted((r[0], r[2]) for r in rows) == [("Communication", "done"), ("Communication", "done"),
                                                  ("QuestionnaireResponse", "pending")]
    qr = next(r for r in rows if r[0] == "QuestionnaireResponse")
    assert qr[1] == bad_id and qr[3] == 1 and "InputError" in qr[4]
    assert assessed == 2  # the good messages are assessed once each, not lost with the bad one
    assert service.pipeline.process_pending() == []  # not tried again at once: it waits (5 s, then 10 s ...)
    for _ in range(4):  # retried up to the limit, then parked as failed with an audit record
        with service.pool.connection() as conn:  # the wait is over (instead of sleeping through it)
            conn.execute("UPDATE events SET retry_at = now() - interval '1 second' WHERE resource_id = %s",
                         (bad_id,))
        assert [p.status for p in service.pipeline.process_pending()] in (["retry"], ["failed"])
    with service.pool.connection() as conn:
        status, attempts = conn.execute("SELECT status, attempts FROM events WHERE resource_id = %s",
                                        (bad_id,)).fetchone()
        audited = conn.execute("SELECT count(*) FROM audit_log WHERE event_type = 'event.failed'"
                               " AND patient_ref = %s", (ref,)).fetchone()[0]
        assessed_again = conn.execute("SELECT count(*) FROM assessments a JOIN events e ON e.id = a.event_id"
                                      " WHERE e.patient_ref = %s AND NOT a.shadow", (ref,)).fetchone()[0]
    assert (status, attempts, audited, assessed_again) == ("failed", 5, 1, 2)


REFUSALS = {  # a statement the database refuses for one patient only, as a constraint would
    # its assessment INSERT, in the middle of its event (the next read is its alert's)
    "assessment": ("assessments", "INSERT", "TRUE"),
    # the UPDATE marking its event done, its last statement: in the batch the next read is the next
    # event's patient lock, so the error comes back while the first try is processing another event
    "done": ("events", "UPDATE", "NEW.status = 'done'"),
}


def _refuse(admin_url: str, what: str, patient_ref: str) -> None:
    table, op, condition = REFUSALS[what]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"""CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.patient_ref = '{patient_ref.replace("'", "''")}' AND {condition} THEN
                RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'check_violation';
              END IF;
              RETURN NEW;
            END $$""")
        conn.execute(f"CREATE TRIGGER test_refuse BEFORE {op} ON {table} FOR EACH ROW EXECUTE FUNCTION test_refuse()")


@pytest.mark.parametrize("what", sorted(REFUSALS))
def test_a_statement_failing_in_pipeline_mode_rolls_back_only_its_event_in_the_retry(
        ehr: Any, service: Any, db_admin_url: str, what: str, caplog: pytest.LogCaptureFixture) -> None:
    from compliance import audit

    refs = sorted(f"Patient/{ehr.create(patient(mrn=f'MRN-F-PL-{what}-{i}'))['id']}" for i in range(3))
    for ref in refs:  # the batch takes patient locks in this order: the refused one is in the middle
        ehr.create(chat(ref, "I have saved up my pills and I will take them all tonight", session=f"S-{ref}"))
    _refuse(db_admin_url, what, refs[1])
    with caplog.at_level("WARNING", logger="cds.pipeline"):
        ingest_cycle(service)  # one batch: the pipelined try fails as a whole, the retry event by event
    assert any("doing it again event by event" in r.getMessage() for r in caplog.records)
    with service.pool.connection() as conn:
        events = {r[0]: r[1:] for r in conn.execute(
            "SELECT patient_ref, status, attempts, last_error FROM events WHERE patient_ref = ANY(%s)", (refs,))}
        assessed = dict(conn.execute("SELECT patient_ref, count(*) FROM assessments WHERE NOT shadow"
                                     " AND patient_ref = ANY(%s) GROUP BY patient_ref", (refs,)).fetchall())
        alerts = dict(conn.execute("SELECT patient_ref, count(*) FROM alerts WHERE patient_ref = ANY(%s)"
                                   " GROUP BY patient_ref", (refs,)).fetchall())
        written = dict(conn.execute("SELECT patient_ref, count(*) FROM outbox WHERE patient_ref = ANY(%s)"
                                    " GROUP BY patient_ref", (refs,)).fetchall())
        verified = audit.verify(conn)
    assert [events[r][:2] for r in refs] == [("done", 1), ("pending", 1), ("done", 1)]  # only its own counted
    assert "CheckViolation: refused by the test" in events[refs[1]][2]
    assert (assessed, alerts) == ({refs[0]: 1, refs[2]: 1}, {refs[0]: 1, refs[2]: 1})  # nothing doubled
    assert refs[1] not in written and written[refs[0]] >= 1
    assert verified.ok


def test_a_statement_failing_in_pipeline_mode_on_the_screening_path_keeps_the_message(
        client: Any, api_key: str, service: Any, db_admin_url: str) -> None:
    _refuse(db_admin_url, "done", "Patient/p-refused")
    body = {"patient": "Patient/p-refused", "conversation": "c-r", "message": "I will take all my pills tonight"}
    r = client.post("/api/v1/screen", json=body, headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert "not yet screened" in r.get_json()["issue"][0]["diagnostics"]
    with service.pool.connection() as conn:
        rows = conn.execute("SELECT status, attempts, last_error FROM events WHERE patient_ref = 'Patient/p-refused'"
                            ).fetchall()
        assessed = conn.execute("SELECT count(*) FROM assessments WHERE patient_ref = 'Patient/p-refused'"
                                ).fetchone()[0]
    assert [r[:2] for r in rows] == [("pending", 1)] and "refused by the test" in rows[0][2]
    assert assessed == 0

"""Alert lifecycle against the real EHR and PostgreSQL, driven by a controllable clock: every
escalation step is checked in the EHR (Task owner, businessStatus, deadline; Communication to who acts)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cds.alerts import set_oncall
from cds.alerts.workflow import acknowledge_alert, resolve_alert
from cds.jobs import deliver_outbox, escalate_overdue, ingest_cycle
from tests.samples import chat, patient

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 20, 3, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def clocked(settings_env: dict[str, str], engines: Any, clock: Clock) -> Iterator[Any]:
    from cds.service import Service
    from cds.settings import Settings

    svc = Service.start(Settings.from_env({**settings_env, "CDS_CARE_TEAM_REF": "CareTeam/ward5"}),
                        migrate=False, engines=engines, pool_size=4, clock=clock)
    with svc.pool.connection() as conn:
        for role, ref, name in (("charge_nurse", "Practitioner/cn-1", "Zhou Min"),
                                ("psychiatrist", "Practitioner/psy-1", "Dr Whitfield")):
            set_oncall(conn, role=role, practitioner_ref=ref, display=name, starts_at=T0 - timedelta(hours=1),
                       ends_at=T0 + timedelta(days=1), actor="test")
        conn.commit()
    yield svc
    svc.close()


def _task(ehr: Any, ref: str) -> dict[str, Any]:
    tasks = ehr.search("Task", patient=ref)
    assert len(tasks) == 1, tasks
    return tasks[0]


def _communications_to(ehr: Any, ref: str, recipient: str) -> list[dict[str, Any]]:
    return [c for c in ehr.search("Communication", subject=ref)
            if any(r.get("reference") == recipient for r in c.get("recipient", []))]


def test_every_escalation_step_reaches_the_ehr(ehr: Any, clocked: Any, clock: Clock) -> None:
    pat = ehr.create(patient(mrn="MRN-E-1"))
    ref = f"Patient/{pat['id']}"
    ehr.create(chat(ref, "I have saved up the pills and I will take them all tonight"))
    ingest_cycle(clocked)
    task = _task(ehr, ref)
    assert task["status"] == "requested" and task["priority"] == "stat"
    assert task["businessStatus"]["coding"][0]["code"] == "level-0"
    assert task["owner"]["reference"] == "CareTeam/ward5"
    assert task["restriction"]["period"]["end"].startswith("2026-11-20T03:05")  # stat: 5 minutes
    assert task["focus"]["identifier"]["system"].endswith("/assessment")

    clock.advance(minutes=4)
    assert escalate_overdue(clocked) == 0  # not yet overdue

    clock.advance(minutes=2)
    assert escalate_overdue(clocked) == 1
    task = _task(ehr, ref)
    assert task["businessStatus"]["coding"][0]["code"] == "level-1"
    assert task["owner"]["reference"] == "Practitioner/cn-1"
    assert len(_communications_to(ehr, ref, "Practitioner/cn-1")) == 1

    clock.advance(minutes=6)
    assert escalate_overdue(clocked) == 1
    task = _task(ehr, ref)
    assert task["businessStatus"]["coding"][0]["code"] == "level-2"
    assert task["owner"]["reference"] == "Practitioner/psy-1"
    assert len(_communications_to(ehr, ref, "Practitioner/psy-1")) == 1

    with clocked.pool.connection() as conn:
        alert_id = str(conn.execute("SELECT id FROM alerts WHERE patient_ref = %s", (ref,)).fetchone()[0])
        acknowledge_alert(conn, clocked.cipher, clocked.settings, alert_id, actor="psy-1", role="psychiatrist",
                          now=clock())
        conn.commit()
    deliver_outbox(clocked)
    assert _task(ehr, ref)["status"] == "accepted"
    clock.advance(minutes=30)
    assert escalate_overdue(clocked) == 0  # acknowledged alerts do not escalate

    with clocked.pool.connection() as conn:
        resolve_alert(conn, clocked.cipher, clocked.settings, alert_id, actor="psy-1", role="psychiatrist",
                      now=clock(), code="one-to-one", note="1:1 observation on ward")
        conn.commit()
        transitions = [r[0] for r in conn.execute(
            "SELECT to_status FROM alert_transitions WHERE alert_id = %s ORDER BY id", (alert_id,))]
        audited = conn.execute("SELECT count(*) FROM audit_log WHERE event_type LIKE 'alert.%%'"
                               " AND patient_ref = %s", (ref,)).fetchone()[0]
    deliver_outbox(clocked)
    task = _task(ehr, ref)
    assert task["status"] == "completed" and task["statusReason"]["coding"][0]["code"] == "one-to-one"
    flags = ehr.search("Flag", subject=ref)
    assert len(flags) == 1 and flags[0]["status"] == "inactive" and "end" in flags[0]["period"]
    assert transitions == ["open", "escalated", "escalated", "acknowledged", "resolved"]
    assert audited >= 5


def test_a_restart_in_the_middle_of_an_escalation_loses_nothing(ehr: Any, settings_env: dict[str, str],
                                                                 engines: Any, clocked: Any, clock: Clock) -> None:
    from cds.service import Service
    from cds.settings import Settings

    pat = ehr.create(patient(mrn="MRN-E-2"))
    ref = f"Patient/{pat['id']}"
    ehr.create(chat(ref, "我已经攒够了安眠药，打算今晚全部吃掉"))
    ingest_cycle(clocked)
    ehr.fault(mode="down", methods=["POST", "PUT"])
    clock.advance(minutes=6)
    assert escalate_overdue(clocked) == 1  # escalated while the EHR is down: the Task update waits
    clocked.close()  # the worker process dies

    restarted = Service.start(Settings.from_env(settings_env), migrate=False, engines=engines, pool_size=2,
                              clock=clock)
    try:
        ehr.clear_fault()
        with restarted.pool.connection() as conn:
            conn.execute("UPDATE outbox SET next_attempt_at = now()")
            conn.commit()
        deliver_outbox(restarted)
        assert _task(ehr, ref)["businessStatus"]["coding"][0]["code"] == "level-1"
        clock.advance(minutes=6)
        assert escalate_overdue(restarted) == 1
        assert _task(ehr, ref)["businessStatus"]["coding"][0]["code"] == "level-2"
    finally:
        restarted.close()


def test_duplicate_and_concurrent_deliveries_give_one_alert(ehr: Any, service: Any) -> None:
    from cds.pipeline import Pipeline

    pat = ehr.create(patient(mrn="MRN-E-3"))
    ref = f"Patient/{pat['id']}"
    messages = [ehr.create(chat(ref, text, sent=f"2026-11-20T03:0{i}:00Z"))
                for i, text in enumerate(["I want to kill myself", "I have a rope ready", "tonight is the night"])]
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            for m in messages:
                service.pipeline.ingest(m, source="ehr")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    second = Pipeline(service.pool, service.cipher, service.engines, service.settings)
    workers = [threading.Thread(target=p.process_pending) for p in (service.pipeline, second, service.pipeline)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    with service.pool.connection() as conn:
        events = conn.execute("SELECT count(*), count(*) FILTER (WHERE status = 'done') FROM events").fetchone()
        alerts = conn.execute("SELECT count(*) FROM alerts WHERE patient_ref = %s AND kind = 'risk'",
                              (ref,)).fetchone()[0]
        assessments = conn.execute("SELECT count(*) FROM assessments WHERE NOT shadow").fetchone()[0]
    assert events == (3, 3)
    assert assessments == 3
    assert alerts == 1


def test_the_oncall_roster_is_set_and_listed_from_the_command_line(service: Any) -> None:
    from click.testing import CliRunner

    from cds.cli import cli

    env = {"CDS_DATABASE_URL": service.db_url}
    runner = CliRunner()
    empty = runner.invoke(cli, ["oncall", "list"], env=env)
    assert empty.exit_code == 0 and "nobody is on call" in empty.output
    set_ = runner.invoke(cli, ["oncall", "set", "psychiatrist", "Practitioner/psy-9", "--name", "Dr Lin"], env=env)
    assert set_.exit_code == 0, set_.output
    listed = runner.invoke(cli, ["oncall", "list"], env=env)
    assert listed.exit_code == 0 and "psychiatrist" in listed.output and "Practitioner/psy-9" in listed.output


def test_actions_of_one_alert_kind_are_merged_before_the_alert_is_raised() -> None:
    from cds.domain import Action
    from cds.pipeline import alert_requests

    actions = [Action("nurse_alert", "urgent", 240), Action("crisis_resources", "stat", 5),
               Action("discordance_alert", "urgent", 240), Action("nurse_alert", "stat", 5),
               Action("nurse_alert", "stat", 3), Action("nurse_alert", "routine", 1)]
    # kinds in the order they first appear; the highest priority, then the shortest SLA at that priority
    assert list(alert_requests(actions).items()) == [("risk", ("stat", 3)), ("discordance", ("urgent", 240))]
    assert alert_requests([Action("nurse_alert", "asap", None)]) == {"risk": ("asap", 15)}  # the manifest's SLA
    assert alert_requests([Action("referral", "routine", 1440)]) == {}


def test_two_actions_of_one_kind_open_and_join_one_alert_once(ehr: Any, clocked: Any, clock: Clock,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import cds.alerts

    calls: list[tuple[str, str, int]] = []
    real = cds.alerts.raise_alert

    def counting(conn: Any, **kw: Any) -> Any:
        calls.append((kw["kind"], kw["priority"], kw["sla_minutes"]))
        return real(conn, **kw)

    monkeypatch.setattr(cds.alerts, "raise_alert", counting)
    ref = f"Patient/{ehr.create(patient(mrn='MRN-A-M'))['id']}"
    ehr.create(chat(ref, "I have saved up my pills and I will take them all tonight", session="S-m1"))
    ingest_cycle(clocked)
    with clocked.pool.connection() as conn:
        actions = conn.execute("SELECT actions FROM assessments WHERE patient_ref = %s AND NOT shadow",
                               (ref,)).fetchone()[0]
        alerts = conn.execute("SELECT id, kind, priority, due_at, task_version FROM alerts WHERE patient_ref = %s",
                              (ref,)).fetchall()
        moves = conn.execute("SELECT count(*) FROM alert_transitions WHERE alert_id = %s", (alerts[0][0],)
                             ).fetchone()[0]
        audited = conn.execute("SELECT event_type, detail->>'priority' FROM audit_log WHERE event_type LIKE 'alert.%%'"
                               " AND patient_ref = %s", (ref,)).fetchall()
    assert len([x for x in actions if x["kind"] == "nurse_alert"]) >= 2  # the safety net's and the tier's
    assert calls == [("risk", "stat", 5)]  # one call for the two actions, at the higher priority and its SLA
    assert [(k, p, due - T0, v) for _, k, p, due, v in alerts] == [("risk", "stat", timedelta(minutes=5), 1)]
    assert moves == 1 and audited == [("alert.open", "stat")]

    clock.advance(minutes=1)  # the same risk again: the open alert is joined once and not raised
    ehr.create(chat(ref, "I have saved up my pills and I will take them all tonight", session="S-m2"))
    ingest_cycle(clocked)
    with clocked.pool.connection() as conn:
        again = conn.execute("SELECT id, priority, due_at, task_version FROM alerts WHERE patient_ref = %s",
                             (ref,)).fetchall()
        moves = conn.execute("SELECT count(*) FROM alert_transitions WHERE alert_id = %s", (alerts[0][0],)
                             ).fetchone()[0]
    assert calls == [("risk", "stat", 5)] * 2
    assert again == [(alerts[0][0], "stat", alerts[0][3], 1)] and moves == 1


def test_an_escalation_storm_is_escalated_in_batches_with_one_audit_append_each(
        clocked: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """45 alerts nobody acknowledged fall due together: one job run escalates every one (its transition,
    Task version and audit record), in batches of ESCALATION_BATCH that each take the audit chain's
    append lock once, not once per alert (every other writer waits on that lock). Counts the real
    appends; nothing is mocked."""
    from cds.alerts import raise_alert
    from cds.alerts.workflow import ESCALATION_BATCH
    from cds.domain import RiskTier
    from compliance import audit

    n = 45
    with clocked.pool.connection() as conn:
        for i in range(n):
            raise_alert(conn, patient_ref=f"Patient/storm-{i}", kind="risk", tier=RiskTier.HIGH, priority="asap",
                        reason="test", assessment_id=None, sla_minutes=15, now=clock.now)
        conn.commit()
    appends: list[int] = []
    real_append = audit._append
    monkeypatch.setattr(audit, "_append", lambda conn, records: appends.append(
        sum(r.event_type == "alert.escalate" for r in records)) or real_append(conn, records))
    clock.advance(minutes=16)
    assert escalate_overdue(clocked) == n
    # (the write-backs delivered after it append their own fhir.write records)
    assert [k for k in appends if k] == [ESCALATION_BATCH, ESCALATION_BATCH, n - 2 * ESCALATION_BATCH]
    with clocked.pool.connection() as conn:
        rows = conn.execute("SELECT status, escalation_level, task_version FROM alerts"
                            " WHERE patient_ref LIKE 'Patient/storm-%'").fetchall()
        assert rows and all(r == ("escalated", 1, 2) for r in rows) and len(rows) == n
        logged = conn.execute("SELECT count(*) FROM audit_log WHERE event_type = 'alert.escalate'"
                              " AND patient_ref LIKE 'Patient/storm-%'").fetchone()[0]
        assert logged == n
        assert audit.verify(conn).ok
        conn.rollback()
    assert escalate_overdue(clocked) == 0  # nothing left due

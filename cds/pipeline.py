"""ingest -> assess -> triage -> act: the one path every input takes.

``assess`` is pure (no I/O) and is what ``cds assess`` runs offline; ``Pipeline`` wraps it with the
store: events are stored once (idempotent on source id + version), processed by whichever worker
claims them (SKIP LOCKED), and each event's assessment, alert changes, outbox rows and audit record
commit in one transaction, so a crash loses nothing and a retry doubles nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from cds.domain import FLAG_INDETERMINATE, Action, Assessment, Event, Evidence, History, RiskTier, Signal
from cds.errors import CdsError, CryptoError, InputError
from cds.settings import Settings
from cds.storage_health import is_storage_error, storage_watch
from cds.store import assessments as assessment_store
from cds.store import events as event_store
from cds.store import outbox
from cds.store.affinity import ClaimAffinity
from cds.store.cipher import Cipher
from cds.store.db import pipelined_transaction

if TYPE_CHECKING:
    from cds.alerts import Alert

log = logging.getLogger(__name__)

LOOKBACK_DAYS = 14
HISTORY_TTL = timedelta(hours=24)
HISTORY_RETRY = timedelta(minutes=10)
Clock = Callable[[], datetime]
_T = TypeVar("_T")
# patient refs -> {ref: integrations.fhir.history.PatientHistory | None} (None: the EHR could not answer)
HistorySource = Callable[[Sequence[str]], Mapping[str, Any]]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Engines:
    """What assessment needs, loaded once at start-up (rules, instruments, text model)."""

    instruments: Any  # cds.instruments.InstrumentCatalog
    ruleset: Any  # cds.triage.RuleSet (live)
    shadow_rulesets: tuple[Any, ...]
    text_model: Any | None  # cds.nlp.TextRiskModel; None only when the model is not required

    @classmethod
    def load(cls, settings: Settings) -> Engines:
        from cds.instruments import load_catalog
        from cds.triage import load_ruleset

        catalog = load_catalog(settings.rules_dir)
        ruleset = load_ruleset(settings.rules_dir / "triage")
        shadows = tuple(load_ruleset(d) for d in settings.shadow_rulesets)
        text_model = load_text_model(settings)
        return cls(instruments=catalog, ruleset=ruleset, shadow_rulesets=shadows, text_model=text_model)

    @functools.cached_property
    def lookback_signals(self) -> frozenset[str]:
        """Earlier signals any rule (live or shadow) counts; the only ones read back from the store."""
        names: frozenset[str] = self.ruleset.lookback_signals
        for shadow in self.shadow_rulesets:
            names |= shadow.lookback_signals
        return names

    @property
    def model_sha256(self) -> str | None:
        return getattr(self.text_model, "sha256", None)


def load_text_model(settings: Settings) -> Any | None:
    """The ONNX text model; a missing or corrupt model stops start-up unless explicitly not required."""
    from cds.errors import ModelError
    from cds.nlp import TextRiskModel

    try:
        return TextRiskModel.load(settings.model_dir)
    except ModelError:
        if settings.require_model:
            raise
        log.error("text model unavailable: chat is screened by the safety net only (indeterminate)")
        return None


def _history_due(checked_at: datetime | None, now: datetime) -> bool:
    return checked_at is None or now - checked_at > HISTORY_TTL


@dataclass(frozen=True)
class Assessed:
    assessment: Assessment
    scores: dict[str, Any]
    shadow: tuple[Assessment, ...] = ()


def _text_signals(engines: Engines, text: str, context: Sequence[str], ref: str) -> list[Signal]:
    if engines.text_model is not None:
        result = engines.text_model.assess_conversation([*context, text], new=1)  # context: assessed before
        return list(result.signals(ref))
    # Degraded: the deterministic safety net still runs, and the result says the model is missing.
    from cds.nlp.safety_net import conversation_scan

    scan = conversation_scan([*context, text])
    source = ",".join(scan.lexicons) or "lexicon"
    evidence = tuple(Evidence(e.start, e.end, e.kind, ref=ref, source=e.source, text=e.text) for e in scan.evidence)
    signals = [Signal(name="text.tier", value=scan.tier.label if scan.tier is not None else None, source=source,
                      tier=scan.tier, evidence=evidence, missing=("text risk model (unavailable)",)),
               Signal(name="text.harm_to_others", value=scan.harm_to_others, source=source),
               Signal(name="text.victimisation", value=scan.victimisation, source=source)]
    if scan.kinds:
        signals.append(Signal(name="text.safety_net", value=list(scan.kinds), source=source, tier=scan.tier,
                              evidence=evidence))
    return signals


def _outcome_to_assessment(outcome: Any, event: Event, signals: Sequence[Signal], probability: float | None,
                           engines: Engines, basis: Sequence[str]) -> Assessment:
    missing = tuple(dict.fromkeys([*outcome.missing, *(m for s in signals for m in s.missing)]))
    flags = set(outcome.flags)
    if missing:
        flags.add(FLAG_INDETERMINATE)
    return Assessment(
        patient_ref=event.patient_ref, tier=outcome.tier, probability=probability, flags=frozenset(flags),
        missing=missing, signals=tuple(signals), fired=tuple(outcome.fired), actions=tuple(outcome.actions),
        ruleset_hash=outcome.ruleset_hash, model_sha256=engines.model_sha256,
        thresholds=dict(getattr(engines.text_model, "thresholds", {}) or {}), basis=tuple(basis))


def event_reference(event: Event) -> str:
    if event.source == "ehr":
        return f"{event.resource_type}/{event.resource_id}/_history/{event.version_id}"
    return f"{event.resource_type}/{event.resource_id}"


def assess(event: Event, history: History, engines: Engines, *, now: datetime,
           context: Sequence[str] = ()) -> Assessed | None:
    """Assess one event in its context. Pure: same inputs, same engines -> same Assessment.

    Returns None for inputs that carry no patient statement to assess (a bot's or counsellor's turn).
    """
    from cds.instruments import score_questionnaire_response
    from integrations.fhir.mapping import communication_text, is_patient_authored

    ref = event_reference(event)
    scores: dict[str, Any] = {}
    probability: float | None = None
    if event.resource_type == "QuestionnaireResponse":
        result = score_questionnaire_response(event.resource, engines.instruments)
        signals = list(result.signals)
        scores[result.instrument] = result.scores
    elif event.resource_type == "Communication":
        if not is_patient_authored(event.resource, event.patient_ref):
            return None
        signals = _text_signals(engines, communication_text(event.resource), context, ref)
        probability = next((float(s.value) for s in signals if s.name == "text.probability"
                            and isinstance(s.value, (int, float))), None)
    else:
        raise InputError(f"cannot assess a {event.resource_type}")
    outcome = engines.ruleset.evaluate(signals, history, now)
    assessment = _outcome_to_assessment(outcome, event, signals, probability, engines, [ref])
    shadows = tuple(_outcome_to_assessment(rs.evaluate(signals, history, now), event, signals, probability,
                                           engines, [ref]) for rs in engines.shadow_rulesets)
    return Assessed(assessment, scores, shadows)


# -- with the store -------------------------------------------------------------------------------



def _path(value: Any, *keys: str) -> Any:
    """value[k1][k2]... where every step is a JSON object, else None."""
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _append_audits(conn: psycopg.Connection[Any], audits: list[dict[str, Any]]) -> None:
    from compliance import audit

    audit.record_batch(conn, audits)


@dataclass(frozen=True)
class IngestResult:
    event_id: int | None
    duplicate: bool
    quarantine_id: int | None = None
    reason: str | None = None
    event: Event | None = None  # what was stored (in memory only)


@dataclass(frozen=True)
class Processed:
    event_id: int
    status: str  # done | superseded | failed
    assessment_id: int | None = None
    assessment: Assessment | None = None
    alert_ids: tuple[str, ...] = ()


ALERT_ACTIONS = {"nurse_alert": "risk", "discordance_alert": "discordance"}


def alert_requests(actions: Sequence[Action]) -> dict[str, tuple[str, int]]:
    """The alert each alert kind asks for, as (priority, SLA minutes), kinds in the order they first appear.

    Several actions can ask for one alert kind (a stat safety-net alert and a by-tier alert are both
    "risk"): there is one open alert per patient and kind, so they are merged first and the alert is
    opened or joined once, with one audit record. The merged request has the highest priority asked and,
    among the actions asking that priority, the shortest SLA. The rules' actions come sorted by priority,
    highest first, and their SLA follows their priority (the manifest's table), so this is what joining the
    alert once per action did: the first call set the alert, the others could not raise it."""
    from cds.alerts import PRIORITY_RANK
    from cds.triage import sla_for

    merged: dict[str, tuple[str, int]] = {}
    for action in actions:
        kind = ALERT_ACTIONS.get(action.kind)
        if kind is None:
            continue
        kind = str(action.params.get("alert_kind", kind))
        sla = action.sla_minutes if action.sla_minutes is not None else sla_for(action.priority)
        seen = merged.get(kind)
        if (seen is None or PRIORITY_RANK[action.priority] > PRIORITY_RANK[seen[0]]
                or (action.priority == seen[0] and sla < seen[1])):
            merged[kind] = (action.priority, sla)
    return merged


# What one event's processing may raise without it being the store's fault (those roll back that event only).
EVENT_ERRORS = (CdsError, CryptoError, psycopg.Error, ValueError, KeyError, TypeError)


def _savepoints_only_if_needed(run: Callable[[bool], _T]) -> _T:
    """``run(False)``: one transaction without a savepoint per event (two round trips fewer each). If an
    event fails, that transaction has rolled back as a whole; ``run(True)`` does the work again with a
    savepoint per event, so the failing event is counted and the others are kept. A full disk is not an
    event's fault: it propagates."""
    try:
        return run(False)
    except EVENT_ERRORS as exc:
        if is_storage_error(exc):
            raise
        log.warning("an event failed: its transaction rolled back; doing it again event by event",
                    extra={"error": exc.__class__.__name__})
        return run(True)


@contextmanager
def _transaction(conn: psycopg.Connection[Any], *, pipelined: bool) -> Iterator[None]:
    """One unit of work's transaction; in psycopg's pipeline mode when ``pipelined``: a statement whose
    answer is not read (an UPDATE, an INSERT without RETURNING) is sent without waiting for it and shares
    the next round trip, and queries sent together are answered in one.

    A failing statement then raises at the next read or at the commit, in whatever code runs then. So
    only the first try runs pipelined: any error rolls it back as a whole, whichever statement raised
    it, and the same exception (a full disk is still a DiskFull) reaches ``_savepoints_only_if_needed``.
    The retry with a savepoint per event runs statement by statement, so each error is raised inside
    its own event's savepoint and is charged to that event only."""
    if pipelined and psycopg.Pipeline.is_supported():
        with pipelined_transaction(conn):
            yield
    else:
        with conn.transaction():
            yield


@dataclass(frozen=True)
class _EventReads:
    """The store's answers one event's processing needs, each read when called (``Pipeline._send_reads``)."""

    newer_version_done: Callable[[], bool]
    context: Callable[[], list[str]]  # what the patient said in the conversation's earlier messages
    recent_signals: Callable[[], list[Signal]]


def _log_processed(results: Sequence[Processed]) -> None:
    """After the commit: one line per batch (counts and tiers, no PHI), one DEBUG line per event."""
    if not results:
        return
    tiers: dict[str, int] = {}
    for r in results:
        if r.assessment is not None:
            tiers[r.assessment.tier.label] = tiers.get(r.assessment.tier.label, 0) + 1
        log.debug("event processed", extra={"event_id": r.event_id, "status": r.status,
                                            "assessment_id": r.assessment_id, "alerts": len(r.alert_ids)})
    log.info("events processed", extra={"count": len(results), "tiers": tiers,
                                        "alerts": sum(len(r.alert_ids) for r in results),
                                        "failed": sum(1 for r in results if r.status in ("failed", "retry"))})


class Pipeline:
    def __init__(self, pool: ConnectionPool, cipher: Cipher, engines: Engines, settings: Settings,
                 clock: Clock = utcnow, history_source: HistorySource | None = None) -> None:
        self.history_source = history_source
        self.affinity: ClaimAffinity | None = None  # a worker's preferred share of the patients (cds.store.affinity)
        self.context_cache = event_store.ContextCache()  # earlier messages' texts, read again with each new one
        self.pool = pool
        self.cipher = cipher
        self.engines = engines
        self.settings = settings
        self.clock = clock

    # ingest ---------------------------------------------------------------------------------------

    def ingest(self, resource: Any, *, source: str, actor: str = "psych-cds") -> IngestResult:
        """Validate and store one input once; bad input goes to quarantine with the reason."""
        return self.ingest_batch([resource], source=source, actor=actor)[0]

    def ingest_batch(self, resources: Sequence[Any], *, source: str, actor: str = "psych-cds") -> list[IngestResult]:
        """Store a page of inputs in one transaction (one commit, audit records appended last)."""
        with storage_watch():
            return self._ingest_batch(resources, source=source, actor=actor)

    def _ingest_batch(self, resources: Sequence[Any], *, source: str, actor: str) -> list[IngestResult]:
        audits: list[dict[str, Any]] = []
        with self.pool.connection() as conn, conn.transaction():
            results = self._store_inputs(conn, resources, source, actor, audits)
            _append_audits(conn, audits)
        stored = sum(1 for r in results if r.event_id is not None and not r.duplicate)
        if stored:
            log.info("events stored", extra={"count": stored, "source": source})
        return results

    def ingest_and_process(self, resource: Any, *, source: str, actor: str = "psych-cds"
                           ) -> tuple[IngestResult, Processed | None]:
        """Store one input and assess it in the same transaction (the screening API's synchronous path):
        the caller gets its answer only once both are committed, and a failure leaves nothing half done
        (a failed assessment leaves the event stored and pending for the workers).

        Tried first without a savepoint (two round trips fewer); if the assessment fails, that
        transaction rolls back and the input is stored again with the assessment under a savepoint."""
        with storage_watch():
            result, processed = _savepoints_only_if_needed(
                lambda guarded: self._ingest_and_process(resource, source, actor, guarded=guarded))
        if processed is not None:
            _log_processed([processed])
        return result, processed

    def _ingest_and_process(self, resource: Any, source: str, actor: str, *, guarded: bool
                            ) -> tuple[IngestResult, Processed | None]:
        with self.pool.connection() as conn, _transaction(conn, pipelined=not guarded):
            audits: list[dict[str, Any]] = []
            result = self._store_inputs(conn, [resource], source, actor, audits)[0]
            processed = None
            if result.event_id is not None and not result.duplicate and result.event is not None:
                # Inserted by this transaction: no other worker can see it, let alone claim it.
                stored = event_store.StoredEvent(id=result.event_id, attempts=0, event=result.event)
                ids = assessment_store.AssessmentIds(conn, self._assessments_per_event, ahead=True)
                processed = (self._process_guarded(conn, stored, audits, ids) if guarded
                             else self._process(conn, stored, audits, ids))
            _append_audits(conn, audits)
        return result, processed

    def _store_inputs(self, conn: psycopg.Connection[Any], resources: Sequence[Any], source: str, actor: str,
                      audits: list[dict[str, Any]]) -> list[IngestResult]:
        from integrations.fhir.mapping import to_event

        results: list[IngestResult] = []
        for resource in resources:
            try:
                event = to_event(resource, source=source)
            except InputError as exc:
                qid = self._quarantine(conn, resource, source, str(exc), audits)
                results.append(IngestResult(None, False, quarantine_id=qid, reason=str(exc)))
                continue
            event_id, inserted = event_store.insert_event(conn, self.cipher, event)
            audits.append(dict(event_type="event.received", action="C", actor=actor,
                               patient_ref=event.patient_ref, outcome=0,
                               entity={"what": event_reference(event), "event_id": event_id},
                               detail={"duplicate": not inserted, "source": source}))
            results.append(IngestResult(event_id, duplicate=not inserted, event=event))
        return results

    def _quarantine(self, conn: psycopg.Connection[Any], resource: Any, source: str, reason: str,
                    audits: list[dict[str, Any]]) -> int:
        from integrations.fhir.mapping import reference_id

        # Bad input can have any shape: read it defensively (a crash here would lose it).
        rtype, rid = _path(resource, "resourceType"), _path(resource, "id")
        vid = _path(resource, "meta", "versionId")
        subject = _path(resource, "subject", "reference")
        patient_ref = reference_id(subject, "Patient") if isinstance(subject, str) else None
        qid = event_store.quarantine_input(conn, self.cipher, source=source, payload=resource, reason=reason,
                                           resource_type=str(rtype)[:64] if rtype else None,
                                           resource_id=str(rid)[:64] if rid else None,
                                           version_id=str(vid)[:64] if vid else None, patient_ref=patient_ref)
        audits.append(dict(event_type="event.quarantined", action="C", actor="psych-cds", outcome=4,
                           entity={"quarantine_id": qid, "type": str(rtype)[:64] if rtype else None},
                           detail={"reason": reason[:500], "source": source}))
        log.warning("input quarantined", extra={"quarantine_id": qid, "reason": reason[:300]})
        return qid

    # process --------------------------------------------------------------------------------------

    def process_pending(self, limit: int | None = None) -> list[Processed]:
        """Claim and process a batch of pending events in one transaction.

        Audit records of the batch are appended together just before the commit: the audit chain's
        append lock is then held for milliseconds, not for the whole batch (which would make every
        ingest and every other worker wait on it, and could deadlock against row locks).

        The batch first runs without a savepoint per event (two round trips fewer per event). If one
        event fails, that whole transaction rolls back and the batch runs again with a savepoint per
        event, so the failing event is counted and parked while the others are assessed.
        """
        size = limit or self.settings.worker_batch_size
        with storage_watch():
            results = _savepoints_only_if_needed(lambda guarded: self._process_batch(size, guarded=guarded))
        _log_processed(results)
        return results

    def _process_batch(self, size: int, *, guarded: bool) -> list[Processed]:
        results: list[Processed] = []
        with self.pool.connection() as conn, _transaction(conn, pipelined=not guarded):
            audits: list[dict[str, Any]] = []
            claimed = event_store.claim_pending(conn, self.cipher, size,
                                                self.affinity.share() if self.affinity is not None else None)
            histories = self._prefetch_histories(conn, claimed)
            ids = assessment_store.AssessmentIds(conn, len(claimed) * self._assessments_per_event,
                                                 ahead=bool(claimed))
            # Patient row locks are taken in patient order, so concurrent workers never deadlock.
            for stored in sorted(claimed, key=lambda s: (s.event.patient_ref, s.id)):
                results.append(self._process_guarded(conn, stored, audits, ids, histories) if guarded
                               else self._process(conn, stored, audits, ids, histories))
            _append_audits(conn, audits)
        return results

    def _prefetch_histories(self, conn: psycopg.Connection[Any], claimed: Sequence[event_store.StoredEvent]
                            ) -> Mapping[str, Any]:
        """The EHR history of every patient in the batch whose history is due, asked in one search per
        50 patients instead of two requests per patient while the batch's locks are held."""
        if self.history_source is None or not claimed:
            return {}
        refs = sorted({s.event.patient_ref for s in claimed})
        now = self.clock()
        checked = dict(conn.execute("SELECT patient_ref, history_checked_at FROM patients"
                                    " WHERE patient_ref = ANY(%s)", (refs,)).fetchall())
        due = [ref for ref in refs if _history_due(checked.get(ref), now)]
        return self.history_source(due) if due else {}

    @property
    def _assessments_per_event(self) -> int:
        """The live assessment and one per shadow rule set."""
        return 1 + len(self.engines.shadow_rulesets)

    def _process_guarded(self, conn: psycopg.Connection[Any], stored: event_store.StoredEvent,
                         audits: list[dict[str, Any]], ids: assessment_store.AssessmentIds,
                         histories: Mapping[str, Any] | None = None) -> Processed:
        mark = len(audits)
        try:
            with conn.transaction():
                return self._process(conn, stored, audits, ids, histories)
        except EVENT_ERRORS as exc:
            if is_storage_error(exc):  # not this event's fault: the whole batch waits, nothing counts as tried
                raise
            del audits[mark:]  # what the rolled-back savepoint did, it did not do
            # Never swallowed: counted, logged without PHI, and parked as failed after the last attempt.
            error = f"{exc.__class__.__name__}: {str(exc)[:300]}"
            status = event_store.record_failure(conn, stored.id, error, max_attempts=5)
            log.error("event processing failed", extra={"event_id": stored.id, "error": error, "status": status})
            if status == "failed":
                audits.append(dict(event_type="event.failed", action="E", actor="psych-cds", outcome=8,
                                   patient_ref=stored.event.patient_ref,
                                   entity={"event_id": stored.id, "what": event_reference(stored.event)},
                                   detail={"error": error}))
            return Processed(stored.id, "failed" if status == "failed" else "retry")

    def _history(self, conn: psycopg.Connection[Any], state: assessment_store.PatientState, now: datetime,
                 recent: Callable[[], list[Signal]], histories: Mapping[str, Any] | None) -> History:
        """Previous tier and recent signals from the store; diagnoses, prior attempt and age from the
        EHR, asked at most once a day per patient (``histories``: what the batch already asked). If the
        EHR cannot answer, they stay unknown."""
        if self.history_source is not None and _history_due(state.history_checked_at, now):
            ref = state.patient_ref
            fetched = histories[ref] if histories and ref in histories else self.history_source([ref]).get(ref)
            if fetched is None:  # the EHR could not answer: history stays unknown; ask again in 10 minutes
                assessment_store.history_unavailable(conn, state.patient_ref, now - HISTORY_TTL + HISTORY_RETRY)
            else:
                assessment_store.save_history(conn, state.patient_ref, fetched.conditions, fetched.prior_attempt,
                                              fetched.birth_date)
                state = assessment_store.PatientState(
                    state.patient_ref, state.current_tier, state.tier_since, fetched.conditions,
                    fetched.prior_attempt, fetched.birth_date, now)
        age = None
        if state.birth_date is not None:
            today = now.date()
            age = today.year - state.birth_date.year - ((today.month, today.day) <
                                                         (state.birth_date.month, state.birth_date.day))
        return History(previous_tier=state.current_tier if state.current_tier > RiskTier.NONE else None,
                       prior_attempt=state.prior_attempt, conditions=state.conditions or (), age_years=age,
                       recent_signals=tuple(recent()))

    def _send_reads(self, conn: psycopg.Connection[Any], stored: event_store.StoredEvent,
                    now: datetime) -> _EventReads:
        """What processing an event reads from the store, asked at once (none depends on another's answer)."""
        event = stored.event
        context: Callable[[], list[str]] = list
        if event.resource_type == "Communication":
            context = event_store.conversation_texts_deferred(conn, self.cipher, stored, self.context_cache)
        return _EventReads(
            newer_version_done=event_store.newer_version_done_deferred(conn, stored),
            context=context,
            recent_signals=assessment_store.recent_signals_deferred(
                conn, event.patient_ref, now - timedelta(days=LOOKBACK_DAYS), self.engines.lookback_signals))

    def _process(self, conn: psycopg.Connection[Any], stored: event_store.StoredEvent,
                 audits: list[dict[str, Any]], ids: assessment_store.AssessmentIds,
                 histories: Mapping[str, Any] | None = None) -> Processed:
        from cds.alerts import get_alert

        event = stored.event
        now = self.clock()
        # The patient's lock, then what is read under it, sent together: in pipeline mode one round trip,
        # and the reads still run after the lock is granted (a new patient's are sent again once it is).
        locked = assessment_store.lock_patient_deferred(conn, event.patient_ref, self.settings.default_ward)
        reads = self._send_reads(conn, stored, now)
        state, new_patient = locked()
        if new_patient:
            reads = self._send_reads(conn, stored, now)
        if reads.newer_version_done():
            event_store.mark_event(conn, stored.id, "superseded")
            return Processed(stored.id, "superseded")
        context = reads.context()
        self.context_cache.remember(stored)  # the context of this patient's next messages
        history = self._history(conn, state, now, reads.recent_signals, histories)
        assessed = assess(event, history, self.engines, now=now, context=context)
        if assessed is None:
            event_store.mark_event(conn, stored.id, "done")
            return Processed(stored.id, "done")
        a = assessed.assessment
        assessment_id, *shadow_ids = ids.take(self._assessments_per_event, after=state.last_assessment_id)
        assessment_store.insert_assessment(
            conn, self.cipher, a, event_id=stored.id, scores=assessed.scores,
            ruleset_version=self.engines.ruleset.version, assessment_id=assessment_id)
        for shadow_rs, shadow, shadow_id in zip(self.engines.shadow_rulesets, assessed.shadow, shadow_ids):
            assessment_store.insert_assessment(conn, self.cipher, shadow, event_id=stored.id,
                                               scores=assessed.scores, shadow=True,
                                               ruleset_version=shadow_rs.version, assessment_id=shadow_id)
        assessment_store.raise_patient_tier(conn, event.patient_ref, a.tier, assessment_id)
        alert_ids, changed, priority = self._act_on_alerts(conn, a, assessment_id, now, audits)
        # Written back when it changes what someone must do: an alert opened or raised, the patient's
        # tier rose, or the data is incomplete. Evidence that only joins an open alert stays here (the
        # dashboard shows it), so a long risky conversation does not flood the EHR.
        if changed or a.tier > state.current_tier or (a.indeterminate and a.tier >= RiskTier.LOW):
            self._enqueue_writeback(conn, a, assessment_id, alert_ids[0] if alert_ids else None,
                                    [get_alert(conn, alert_id) for alert_id in changed],
                                    priority, now)
        audits.append(dict(event_type="assessment", action="C", actor="psych-cds",
                     patient_ref=event.patient_ref, outcome=0,
                     entity={"what": event_reference(event), "assessment_id": assessment_id},
                     detail={"tier": a.tier.label, "flags": sorted(a.flags),
                             "rules": [f"{f.id}@{f.version}" for f in a.fired],
                             "ruleset": a.ruleset_hash, "model_sha256": a.model_sha256,
                             "alerts": list(alert_ids)}))
        event_store.mark_event(conn, stored.id, "done")
        return Processed(stored.id, "done", assessment_id, a, tuple(alert_ids))

    def _act_on_alerts(self, conn: psycopg.Connection[Any], a: Assessment, assessment_id: int,
                       now: datetime, audits: list[dict[str, Any]]) -> tuple[list[str], list[str], str]:
        from cds.alerts import PRIORITY_RANK, raise_alert

        alert_ids: list[str] = []
        changed: list[str] = []
        top_priority = "routine"
        reason = "; ".join(f.title for f in a.fired) or "risk signal"
        for kind, (priority, sla) in alert_requests(a.actions).items():
            change = raise_alert(conn, patient_ref=a.patient_ref, kind=kind, tier=a.tier, priority=priority,
                                 reason=reason, assessment_id=assessment_id, sla_minutes=sla, now=now)
            alert_ids.append(change.alert_id)
            if change.created or change.raised:
                changed.append(change.alert_id)
                audits.append(dict(event_type="alert.open" if change.created else "alert.raise",
                                   action="C" if change.created else "U", actor="psych-cds",
                                   patient_ref=a.patient_ref,
                                   entity={"alert_id": change.alert_id, "assessment_id": assessment_id},
                                   detail={"priority": priority, "kind": kind, "tier": a.tier.label}))
            if PRIORITY_RANK[priority] > PRIORITY_RANK[top_priority]:
                top_priority = priority
        return alert_ids, changed, top_priority

    def _enqueue_writeback(self, conn: psycopg.Connection[Any], a: Assessment, assessment_id: int,
                           alert_id: str | None, changed: Sequence[Alert], priority: str, now: datetime) -> None:
        """Queue the write-back with the Task of each alert this event opened or raised (``changed``) in
        the same transaction Bundle: one outbox row and one EHR request instead of one per alert too.

        The Tasks keep their deterministic ids and PUTs, so a retried Bundle writes nothing twice, and
        the row's dedupe key stays ``assessment:{id}``. Those Task versions get no ``alert:...:task:...``
        row of their own: only a later transition (which bumps the version) queues one, after this row.
        A Task that cannot share the transaction is queued alone after it, as every Task was before."""
        from cds.alerts.mirror import alert_task_bundle, mirror_alert
        from integrations.fhir.mapping import join_transactions

        bundle = self._writeback_bundle(a, assessment_id, alert_id, bool(changed), priority, now)
        alone: list[Alert] = []
        for alert in changed:
            joined = join_transactions(bundle, alert_task_bundle(alert, self.settings))
            if joined is None:
                alone.append(alert)
            else:
                bundle = joined
        # Its answer (queued, or there already) was never used: in pipeline mode it is not waited for.
        outbox.enqueue_deferred(conn, self.cipher, dedupe_key=f"assessment:{assessment_id}",
                                kind="assessment-writeback", patient_ref=a.patient_ref, payload=bundle)
        for alert in alone:  # after the write-back: one patient's outbox rows are delivered in order
            mirror_alert(conn, self.cipher, alert, self.settings)

    def _writeback_bundle(self, a: Assessment, assessment_id: int, alert_id: str | None, new_alert: bool,
                          priority: str, now: datetime) -> dict[str, Any]:
        from integrations.fhir.mapping import writeback_bundle

        return writeback_bundle(
            assessment_id=assessment_id, patient_ref=a.patient_ref, tier=a.tier, probability=a.probability,
            flags=sorted(a.flags), missing=a.missing, reasons=[f.title for f in a.fired], basis=a.basis,
            ruleset_hash=a.ruleset_hash, ruleset_version=self.engines.ruleset.version,
            model_sha256=a.model_sha256, occurred_at=now, alert_id=alert_id, priority=priority,
            care_team_ref=self.settings.care_team_ref,
            dashboard_url=f"{self.settings.public_base_url}/triage", new_alert=new_alert)

"""`make bench`: measure what the issues promise and write bench/results.json.

Never part of `make test`. Each figure runs against the real local EHR and an embedded PostgreSQL
started here, with the real worker process and the real model; the machine and commit are recorded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.json"


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    gpu = None
    try:
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "gpu": gpu, "python": platform.python_version(),
            "platform": platform.platform()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    except OSError:
        return "unknown"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class Stack:
    """Embedded PostgreSQL + local EHR + N `cds worker` processes, all started here and stopped after."""

    def __init__(self, workers: int = 1, poll_page_size: int = 100, poll_interval_s: float = 0.5) -> None:
        from cds.demo import start_sandbox, wait_for
        from cds.store.db import migrate, start_embedded

        self.tmp = Path(tempfile.mkdtemp(prefix="cds-bench-"))
        self.db_url = start_embedded(self.tmp / "pg")
        migrate(self.db_url)
        port = 18090 + int.from_bytes(os.urandom(1), "big")
        self.ehr_root = f"http://127.0.0.1:{port}"
        self.sandbox = start_sandbox(port, log_path=self.tmp / "sandbox.log")
        wait_for(f"{self.ehr_root}/healthz", 30, "the local EHR", self.sandbox)
        self.env = {**os.environ, "CDS_DATABASE_URL": self.db_url, "CDS_FHIR_BASE_URL": f"{self.ehr_root}/fhir",
                    "CDS_DATA_DIR": str(self.tmp), "CDS_DEMO": "true", "CDS_POLL_INTERVAL_S": str(poll_interval_s),
                    "CDS_OUTBOX_INTERVAL_S": "0.25", "CDS_POLL_OVERLAP_S": "5", "CDS_LOG_FORMAT": "json",
                    "CDS_POLL_PAGE_SIZE": str(poll_page_size), "CDS_PUBLIC_BASE_URL": "http://127.0.0.1:18080"}
        self.workers = [subprocess.Popen([sys.executable, "-m", "cds.cli", "worker"], env=self.env,
                                         stdout=open(self.tmp / f"worker{i}.log", "ab"), stderr=subprocess.STDOUT)
                        for i in range(workers)]
        self.http = requests.Session()

    def post(self, resource: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(f"{self.ehr_root}/fhir/{resource['resourceType']}", json=resource,
                           headers={"Content-Type": "application/fhir+json"}, timeout=10)
        r.raise_for_status()
        return dict(r.json())

    def search(self, resource_type: str, **params: Any) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.ehr_root}/fhir/{resource_type}", params=params, timeout=10)
        r.raise_for_status()
        return [e["resource"] for e in r.json().get("entry", [])]

    def close(self) -> None:
        from cds.store.db import stop_embedded

        for proc in [*self.workers, self.sandbox]:
            proc.terminate()
        for proc in [*self.workers, self.sandbox]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop_embedded(self.tmp / "pg")


def bench_questionnaire_to_writeback(n: int = 20) -> dict[str, Any]:
    """Seconds from POSTing a positive PHQ-9 into the EHR to its RiskAssessment being readable there."""
    from tests.samples import patient, phq9, wait_until

    stack = Stack(workers=1)
    try:
        time.sleep(3)  # let the worker finish start-up (model load) so the first sample is not start-up time
        latencies = []
        for i in range(n):
            pat = stack.post(patient(mrn=f"MRN-B-{i}"))
            ref = f"Patient/{pat['id']}"
            t0 = time.monotonic()
            stack.post(phq9(ref, [1, 1, 1, 1, 1, 1, 1, 1, 2]))
            wait_until(lambda: stack.search("RiskAssessment", subject=ref), timeout_s=60, every_s=0.02)
            latencies.append(time.monotonic() - t0)
        return {"n": n, "median_s": round(statistics.median(latencies), 3),
                "p90_s": round(percentile(latencies, 90), 3), "max_s": round(max(latencies), 3),
                "poll_interval_s": 0.5, "mode": "polled"}
    finally:
        stack.close()


RISK_MIX = (  # (share, text, expected to alert): a realistic day is mostly everyday talk
    (0.55, "今天考试压力好大，不过还好", False),
    (0.20, "work was long today, I'm tired but ok", False),
    (0.08, "有时候觉得活着没什么意思", False),
    (0.07, "I keep thinking about killing myself", True),
    (0.05, "我想自杀，每天都在想", True),
    (0.03, "I have saved up the pills and I will take them all tonight", True),
    (0.02, "我已经攒够了安眠药，打算这周末全部吃掉", True),
)


def _day_of_messages(patients: list[str], n: int, seed: int = 7) -> list[tuple[str, str, bool]]:
    import random

    rng = random.Random(seed)
    shares = [m[0] for m in RISK_MIX]
    out = []
    for i in range(n):
        _, text, alerting = rng.choices(RISK_MIX, weights=shares)[0]
        out.append((patients[i % len(patients)], f"{text} ({i})", alerting))
    return out


def _start_web(stack: Stack, port: int, extra_env: dict[str, str], processes: int = 1) -> subprocess.Popen[bytes]:
    from cds.demo import wait_for

    env = {**stack.env, "CDS_PORT": str(port), **extra_env}
    web = subprocess.Popen([sys.executable, "-m", "cds.cli", "serve", "--workers", str(processes)], env=env,
                           stdout=open(stack.tmp / "web.log", "ab"), stderr=subprocess.STDOUT)
    wait_for(f"http://127.0.0.1:{port}/healthz", 60, "the web service", web)
    return web


def _feed(stack: Stack, day: list[tuple[str, str, bool]], rate: float | None, tick_s: float = 0.1) -> float:
    """Create the day's messages in the EHR: ``rate`` messages/s in small batch Bundles every ``tick_s``
    (a chatbot gateway's steady stream), or all at once in Bundles of 100 when ``rate`` is None.
    Returns the seconds it took."""
    from tests.samples import chat

    per_tick = len(day) if rate is None else max(1, round(rate * tick_s))
    size = 100 if rate is None else per_tick
    t0 = time.monotonic()
    for n, i in enumerate(range(0, len(day), size)):
        if rate is not None:  # absolute schedule: a slow tick is caught up, the offered rate holds
            delay = t0 + n * tick_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        entries = [{"resource": chat(ref, text, session=f"S-{ref}"), "request": {"method": "POST",
                                                                               "url": "Communication"}}
                   for ref, text, _ in day[i:i + size]]
        stack.http.post(f"{stack.ehr_root}/fhir", json={"resourceType": "Bundle", "type": "batch",
                                                        "entry": entries}, timeout=60).raise_for_status()
    return time.monotonic() - t0


def bench_ingest(n_patients: int = 300, n_messages: int = 6000, workers: int = 1, *, rate: float | None = None,
                 mode: str = "polled") -> dict[str, Any]:
    """A synthetic ward day created in the EHR and read by psych-cds, polled or pushed to it by a FHIR
    Subscription: throughput, creation -> write-back latency, lost and duplicated alerts (checked in the EHR).

    ``rate`` None pushes the whole day at once (capacity: how fast the backlog drains); a number feeds
    that many messages per second (sustained: the latency a steady stream sees)."""
    from tests.samples import patient, wait_until

    # with a Subscription, polling only reconciles (BENCH_RECONCILE_S to change how often)
    poll_interval = 0.5 if mode == "polled" else float(os.environ.get("BENCH_RECONCILE_S", "30"))
    stack = Stack(workers=workers, poll_page_size=500, poll_interval_s=poll_interval)
    web = None
    try:
        if mode == "subscription":
            from integrations.fhir.client import FhirClient
            from integrations.fhir.subscriptions import ensure_subscription

            secret = os.urandom(16).hex()
            port = 18300 + int.from_bytes(os.urandom(1), "big")
            web = _start_web(stack, port, {"CDS_NOTIFY_SECRET": secret})
            sub = ensure_subscription(FhirClient(f"{stack.ehr_root}/fhir"), f"http://127.0.0.1:{port}/fhir/notify",
                                      secret, SUBSCRIPTION_TOPIC, payload="full-resource", heartbeat_s=60,
                                      filters=("Communication?status=completed",))
            wait_until(lambda: stack.search("Subscription", _id=sub["id"], status="active"), timeout_s=30,
                       every_s=0.02)
        time.sleep(3)
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": patient(mrn=f"MRN-D-{i}"), "request": {"method": "POST", "url": "Patient"}}
            for i in range(n_patients)]}
        created = stack.http.post(f"{stack.ehr_root}/fhir", json=bundle, timeout=60).json()
        refs = [e["response"]["location"].split("/_history")[0] for e in created["entry"]]
        day = _day_of_messages(refs, n_messages)
        expected = {ref for ref, _, alerting in day if alerting}
        posted_s = _feed(stack, day, rate)

        import psycopg

        def settled() -> bool:
            with psycopg.connect(stack.db_url) as conn:
                done = conn.execute("SELECT count(*) FROM events WHERE status IN ('done', 'failed')").fetchone()[0]
                pending = conn.execute("SELECT count(*) FROM outbox WHERE status = 'pending'"
                                       " AND kind <> 'audit-export'").fetchone()[0]
            return bool(done >= n_messages and pending == 0)

        # checked every second: counting a growing table 50 times a second would load the 2 cores measured
        wait_until(settled, timeout_s=3600, every_s=1.0)
        with psycopg.connect(stack.db_url) as conn:
            lat = [float(r[0]) for r in conn.execute(
                "SELECT extract(epoch FROM o.sent_at - e.source_updated) * 1000 FROM assessments a"
                " JOIN events e ON e.id = a.event_id JOIN outbox o ON o.dedupe_key = 'assessment:' || a.id"
                " WHERE o.status = 'sent' AND NOT a.shadow AND a.event_id IS NOT NULL")]
            assessed_lat = [float(r[0]) for r in conn.execute(
                "SELECT extract(epoch FROM processed_at - source_updated) * 1000 FROM events"
                " WHERE status = 'done'")]
            first, last = conn.execute("SELECT min(source_updated), max(processed_at) FROM events").fetchone()
            a_first, a_last = conn.execute("SELECT min(received_at), max(processed_at) FROM events").fetchone()
            sent_n, s_first, s_last = conn.execute(
                "SELECT count(*), min(sent_at), max(sent_at) FROM outbox WHERE status = 'sent'"
                " AND kind <> 'audit-export'").fetchone()
            alerted = {r[0] for r in conn.execute("SELECT DISTINCT patient_ref FROM alerts")}
            failed = conn.execute("SELECT count(*) FROM events WHERE status = 'failed'").fetchone()[0]
        flags = []
        url = f"{stack.ehr_root}/fhir/Flag?_count=1000"
        while url:
            page = stack.http.get(url, timeout=60).json()
            flags += [e["resource"] for e in page.get("entry", [])]
            url = next((lk["url"] for lk in page.get("link", []) if lk.get("relation") == "next"), None)
        per_alert: dict[str, int] = {}
        for f in flags:
            key = f["identifier"][0]["value"]
            per_alert[key] = per_alert.get(key, 0) + 1
        span = (last - first).total_seconds() if first and last else float("nan")
        return {"patients": n_patients, "messages": n_messages, "workers": workers, "mode": mode,
                "offered_per_s": rate if rate is not None else "all at once",
                "poll_interval_s": poll_interval, "post_s": round(posted_s, 1),
                # first message created in the EHR -> last one assessed
                "messages_per_s": round(n_messages / span, 1) if span else None,
                "assessed_per_s": round(n_messages / (a_last - a_first).total_seconds(), 1),
                "ehr_writebacks_per_s": round(sent_n / max((s_last - s_first).total_seconds(), 1e-3), 1)
                if s_first else None,
                "p50_ms": round(percentile(lat, 50), 1) if lat else None,
                "p99_ms": round(percentile(lat, 99), 1) if lat else None,
                "max_ms": round(max(lat), 1) if lat else None,
                "assessed_p50_ms": round(percentile(assessed_lat, 50), 1) if assessed_lat else None,
                "assessed_p99_ms": round(percentile(assessed_lat, 99), 1) if assessed_lat else None,
                "writebacks": len(lat), "expected_alert_patients": len(expected),
                "lost": len(expected - alerted), "duplicated": sum(n - 1 for n in per_alert.values() if n > 1),
                "failed_events": failed}
    finally:
        if web is not None:
            web.terminate()
            web.wait(timeout=15)
        stack.close()


# The sandbox's topic for "a Communication or QuestionnaireResponse was created or updated" (see
# integrations/sandbox/README.md); a hospital's EHR names its own.
SUBSCRIPTION_TOPIC = "http://psych-cds.example.org/fhir/SubscriptionTopic/patient-input"


def bench_scale() -> dict[str, Any]:
    """Pipeline capacity with 1, 2 and 4 worker processes: a backlog pushed at once, drained by N workers."""
    n = int(os.environ.get("BENCH_SCALE_MESSAGES", "3000"))
    rows = []
    for workers in (1, 2, 4):
        result = bench_ingest(n_patients=200, n_messages=n, workers=workers)
        rows.append({"workers": workers, "messages_per_s": result["messages_per_s"],
                     "assessed_per_s": result["assessed_per_s"],
                     "ehr_writebacks_per_s": result["ehr_writebacks_per_s"], "p99_ms": result["p99_ms"],
                     "lost": result["lost"], "duplicated": result["duplicated"]})
    return {"workers": rows, "messages": n}


def bench_classifier() -> dict[str, Any]:
    from cds.nlp.bench import run
    from cds.settings import Settings

    return dict(run(model_dir=Settings.from_env().model_dir))  # the model the service and the ingest sections run


def bench_rules(n: int = 20000) -> dict[str, Any]:
    """Assessments per second of the triage engine alone, over a mix of signals."""
    from datetime import UTC, datetime

    from cds.domain import History, RiskTier, Signal
    from cds.triage import load_ruleset

    ruleset = load_ruleset()
    now = datetime.now(UTC)
    mixes = [
        [Signal("phq9.item9", 2, "bench", RiskTier.MODERATE), Signal("phq9.total", 14, "bench")],
        [Signal("text.tier", "high", "bench", RiskTier.HIGH), Signal("text.harm_to_others", False, "bench")],
        [Signal("text.safety_net", ["plan", "timing"], "bench", RiskTier.IMMINENT),
         Signal("text.tier", "imminent", "bench", RiskTier.IMMINENT)],
        [Signal("gad7.total", 9, "bench"), Signal("phq9.item9", 0, "bench", RiskTier.NONE)],
    ]
    history = History(previous_tier=RiskTier.LOW, prior_attempt=False,
                      recent_signals=(Signal("text.tier", "moderate", "bench", RiskTier.MODERATE, observed_at=now),))
    t0 = time.perf_counter()
    for i in range(n):
        ruleset.evaluate(mixes[i % len(mixes)], history, now)
    rate = round(n / (time.perf_counter() - t0), 1)
    # a chatty patient: 200 earlier chat messages in the look-back window, each one text.tier signal
    tiers = [RiskTier.NONE, RiskTier.LOW, RiskTier.MODERATE]
    chatty = History(previous_tier=RiskTier.LOW, prior_attempt=False, recent_signals=tuple(
        Signal("text.tier", tiers[i % 3].label, "bench", tiers[i % 3], observed_at=now) for i in range(200)))
    t0 = time.perf_counter()
    for i in range(n // 4):
        ruleset.evaluate(mixes[i % len(mixes)], chatty, now)
    return {"assessments_per_s": rate, "rules": len(ruleset.rules), "n": n,
            "assessments_per_s_200_recent_signals": round((n // 4) / (time.perf_counter() - t0), 1)}


def bench_audit() -> dict[str, Any]:
    from cds.store.db import start_embedded, stop_embedded
    from compliance.bench import bench_audit as run

    pgdata = Path(tempfile.mkdtemp(prefix="cds-bench-audit-")) / "pg"
    try:
        url = start_embedded(pgdata)
        return dict(run(url, n_append=2000, n_verify=int(os.environ.get("BENCH_AUDIT_VERIFY", "1000000"))))
    finally:
        stop_embedded(pgdata)


def bench_screen_api(clients: int = 4, per_client: int = 250) -> dict[str, Any]:
    """POST /api/v1/screen through gunicorn (2 processes) with the model and the pipeline in the path."""
    import threading

    import psycopg

    from cds.store.clients import add_client

    stack = Stack(workers=0)
    port = 18080
    web = _start_web(stack, port, {"CDS_SCREEN_RATE_PER_MIN": "100000"}, processes=2)
    try:
        with psycopg.connect(stack.db_url) as conn:
            conn.execute("SET ROLE cds_app")
            key = add_client(conn, "bench-bot", "bench")
            conn.commit()
        texts = [text for _, text, _ in RISK_MIX]
        latencies: list[float] = []
        errors: list[int] = []
        lock = threading.Lock()

        def client(c: int) -> None:
            http = requests.Session()
            for i in range(per_client):
                body = {"patient": f"Patient/bench-{c}-{i % 20}", "conversation": f"conv-{c}-{i % 20}",
                        "message": f"{texts[i % len(texts)]} #{i}", "lang": "zh" if i % 2 else "en"}
                t = time.perf_counter()
                r = http.post(f"http://127.0.0.1:{port}/api/v1/screen", json=body,
                              headers={"Authorization": f"Bearer {key}"}, timeout=30)
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    latencies.append(ms)
                    if r.status_code != 200:
                        errors.append(r.status_code)

        # warm-up: first requests load the model in each gunicorn process
        for i in range(10):
            requests.post(f"http://127.0.0.1:{port}/api/v1/screen", headers={"Authorization": f"Bearer {key}"},
                          json={"patient": "Patient/warm", "conversation": "w", "message": f"hello {i}"}, timeout=30)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        return {"clients": clients, "requests": len(latencies), "errors": len(errors),
                "p50_ms": round(percentile(latencies, 50), 1), "p99_ms": round(percentile(latencies, 99), 1),
                "requests_per_s": round(len(latencies) / elapsed, 1), "web_processes": 2,
                "note": "load generator on the same 2 cores as the server"}
    finally:
        web.terminate()
        web.wait(timeout=15)
        stack.close()


SECTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "questionnaire_to_writeback": bench_questionnaire_to_writeback,
    "classifier": bench_classifier,
    "rules": bench_rules,
    "audit": bench_audit,
    # 6,000 requests: with 1,000, p99 is the 10th-slowest request and two runs of the same code gave 45.6
    # and 54.0 ms
    "screen_api": lambda: bench_screen_api(clients=4, per_client=1500),
    "screen_api_single_client": lambda: bench_screen_api(clients=1, per_client=300),
    # a steady stream pushed by a Subscription (the deployment the target names), offered 10% above the
    # 200 messages/s target: messages_per_s can never exceed what is offered (200 offered measures 199.4
    # when it keeps up), so "sustains 200" needs more offered than 200
    "ingest_to_alert": lambda: bench_ingest(
        int(os.environ.get("BENCH_PATIENTS", "2000")),
        int(float(os.environ.get("BENCH_RATE", "220")) * float(os.environ.get("BENCH_DURATION_S", "120"))),
        workers=int(os.environ.get("BENCH_WORKERS", "2")), rate=float(os.environ.get("BENCH_RATE", "220")),
        mode="subscription"),
    # the same stream for a whole synthetic hospital day (100,000 messages, ~7.5 min at 220/s): what the
    # 2-minute figure cannot show, the cost per message as the database and the EHR fill up
    "ingest_day": lambda: bench_ingest(
        int(os.environ.get("BENCH_PATIENTS", "2000")), int(os.environ.get("BENCH_DAY_MESSAGES", "100000")),
        workers=int(os.environ.get("BENCH_WORKERS", "2")), rate=float(os.environ.get("BENCH_RATE", "220")),
        mode="subscription"),
    # a steady rate well below what these 2 cores carry (the AMD EPYC VM of 2026-12-01/02 carried ~100
    # messages/s), where latency is not queueing; BENCH_STEADY_RATE to change it (the committed results use 80)
    "ingest_steady": lambda: bench_ingest(
        int(os.environ.get("BENCH_PATIENTS", "2000")),
        int(float(os.environ.get("BENCH_STEADY_RATE", "80")) * float(os.environ.get("BENCH_DURATION_S", "120"))),
        workers=int(os.environ.get("BENCH_WORKERS", "2")), rate=float(os.environ.get("BENCH_STEADY_RATE", "80")),
        mode="subscription"),
    "ingest_polled": lambda: bench_ingest(
        int(os.environ.get("BENCH_PATIENTS", "2000")),
        int(float(os.environ.get("BENCH_RATE", "220")) * float(os.environ.get("BENCH_DURATION_S", "120"))),
        workers=int(os.environ.get("BENCH_WORKERS", "2")), rate=float(os.environ.get("BENCH_RATE", "220")),
        mode="polled"),
    "ingest_backlog": lambda: bench_ingest(300, int(os.environ.get("BENCH_BACKLOG_MESSAGES", "6000"))),
    "scale": bench_scale,
}


def main(argv: list[str]) -> None:
    chosen = argv or list(SECTIONS)
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    here = machine()
    results.update({"commit": commit(), "machine": here,
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for name in chosen:
        print(f"bench {name} ...", flush=True)
        # Each section keeps the machine it ran on: a run of some sections leaves the others as they were,
        # maybe from another machine, and the top-level "machine" only names the latest run's.
        results[name] = {**SECTIONS[name](), "commit": results["commit"], "machine": here,
                         "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(f"  {json.dumps(results[name])}", flush=True)
        RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")  # after each section
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])

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

    def __init__(self, workers: int = 1) -> None:
        from cds.demo import start_sandbox, wait_for
        from cds.store.db import migrate, start_embedded

        self.tmp = Path(tempfile.mkdtemp(prefix="cds-bench-"))
        self.db_url = start_embedded(self.tmp / "pg")
        migrate(self.db_url)
        port = 18090
        self.ehr_root = f"http://127.0.0.1:{port}"
        self.sandbox = start_sandbox(port, log_path=self.tmp / "sandbox.log")
        wait_for(f"{self.ehr_root}/healthz", 30, "the local EHR", self.sandbox)
        self.env = {**os.environ, "CDS_DATABASE_URL": self.db_url, "CDS_FHIR_BASE_URL": f"{self.ehr_root}/fhir",
                    "CDS_DATA_DIR": str(self.tmp), "CDS_DEMO": "true", "CDS_POLL_INTERVAL_S": "0.5",
                    "CDS_OUTBOX_INTERVAL_S": "0.25", "CDS_POLL_OVERLAP_S": "5", "CDS_LOG_FORMAT": "json"}
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
        for proc in [*self.workers, self.sandbox]:
            proc.terminate()
        for proc in [*self.workers, self.sandbox]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for_result(check: Callable[[], Any], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise TimeoutError("no result")


def bench_questionnaire_to_writeback(n: int = 20) -> dict[str, Any]:
    """Seconds from POSTing a positive PHQ-9 into the EHR to its RiskAssessment being readable there."""
    from tests.samples import patient, phq9

    stack = Stack(workers=1)
    try:
        time.sleep(3)  # let the worker finish start-up (model load) so the first sample is not start-up time
        latencies = []
        for i in range(n):
            pat = stack.post(patient(mrn=f"MRN-B-{i}"))
            ref = f"Patient/{pat['id']}"
            t0 = time.monotonic()
            stack.post(phq9(ref, [1, 1, 1, 1, 1, 1, 1, 1, 2]))
            wait_for_result(lambda: stack.search("RiskAssessment", subject=ref))
            latencies.append(time.monotonic() - t0)
        return {"n": n, "median_s": round(statistics.median(latencies), 3),
                "p90_s": round(percentile(latencies, 90), 3), "max_s": round(max(latencies), 3),
                "poll_interval_s": 0.5, "mode": "polled"}
    finally:
        stack.close()


SECTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "questionnaire_to_writeback": bench_questionnaire_to_writeback,
}


def main(argv: list[str]) -> None:
    chosen = argv or list(SECTIONS)
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update({"commit": commit(), "machine": machine(),
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for name in chosen:
        print(f"bench {name} ...", flush=True)
        results[name] = SECTIONS[name]()
        print(f"  {json.dumps(results[name])}", flush=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])

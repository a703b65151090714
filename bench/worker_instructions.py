"""The worker's cost per chat message, counted in instructions: a figure that does not move with the machine.

Wall-clock and CPU time on a shared 2-core VM vary by 15-25% from one run to the next, so a change worth 5% cannot
be seen in them. Under valgrind's callgrind the same run of the same code counts the same instructions to 0.1%.
This runs the real pipeline in-process against an embedded PostgreSQL (the server is a child process and is not
counted): ``--earlier`` chat messages per patient first (uncounted, so that conversations have their context
and the caches are as a running worker's), then ``--messages`` more, counted from claim to commit.

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.out \\
        .venv/bin/python -m bench.worker_instructions --workers 2 --affinity
    grep totals /tmp/cg.out        # instructions; divide by the "assessed" count it prints

``--workers 2`` runs two pipelines with their own model and caches taking batches in turn, as two worker
processes claiming in id order do; ``--affinity`` gives each a claim-affinity slot (cds.store.affinity). Without
valgrind it prints process CPU time per message (noisy: compare only runs made back to back). Not part of
``make bench``: the CHANGELOG's callgrind figures come from here (386 messages, 40 patients, 20 earlier each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

BATCH = 22


def _callgrind(on: bool) -> None:
    """Start or stop counting when running under callgrind (nothing happens otherwise)."""
    if shutil.which("callgrind_control"):
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], capture_output=True,
                       check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--earlier", type=int, default=20, help="messages per patient before the counted ones")
    parser.add_argument("--workers", type=int, choices=(1, 2), default=1)
    parser.add_argument("--affinity", action="store_true", help="claim affinity (with --workers 2)")
    args = parser.parse_args()

    from bench.run import _day_of_messages
    from cds.nlp.safety_net import LEXICON_DIR
    from cds.pipeline import Pipeline, load_text_model
    from cds.service import Service
    from cds.settings import Settings
    from cds.store.affinity import ClaimAffinity
    from cds.store.db import migrate, start_embedded, stop_embedded
    from integrations.fhir.history import PatientHistory
    from tests.samples import stored_chat

    tmp = Path(tempfile.mkdtemp(prefix="cds-instructions-"))
    url = start_embedded(tmp / "pg")
    migrate(url)
    env = {**os.environ, "CDS_DATABASE_URL": url, "CDS_DATA_DIR": str(tmp), "CDS_DEMO": "true",
           "CDS_FHIR_BASE_URL": "http://127.0.0.1:9/fhir", "CDS_LOG_LEVEL": "WARNING"}
    svc = Service.start(Settings.from_env(env), migrate=False)
    try:
        # No EHR here: every patient's history is known and empty (the same for every run).
        svc.pipeline.history_source = lambda refs: {r: PatientHistory((), False, date(1990, 1, 1)) for r in refs}
        pipes = [svc.pipeline]
        if args.workers == 2:
            # Its own model and its own lexicon cache key (a copy of the lexicons), as another process has.
            lexicons = tmp / "lexicons"
            shutil.copytree(LEXICON_DIR, lexicons)
            model = load_text_model(svc.settings)
            assert model is not None, "the text model is required"
            model.lexicon_dir = lexicons
            pipes.append(Pipeline(svc.pipeline.pool, svc.pipeline.cipher,
                                  dataclasses.replace(svc.pipeline.engines, text_model=model), svc.settings,
                                  history_source=svc.pipeline.history_source))
            if args.affinity:
                for p in pipes:  # no steal under valgrind's slowness: every event waits longer than 10 s there
                    p.affinity = ClaimAffinity(url, 1e9)
        earlier = args.earlier * args.patients
        day = _day_of_messages([f"Patient/p{i}" for i in range(args.patients)], earlier + args.messages)

        def ingest(start: int, end: int) -> None:
            for i in range(start, end, BATCH):
                svc.pipeline.ingest_batch([stored_chat(ref, text, session=f"S-{ref}",
                                                       resource_id=str(uuid.UUID(int=i + j + 1)))
                                           for j, (ref, text, _) in enumerate(day[i:min(i + BATCH, end)])],
                                          source="ehr")

        def drain() -> int:
            n = k = idle = 0
            while idle < len(pipes):  # with affinity one pipeline can be done while the other is not
                got = pipes[k % len(pipes)].process_pending(BATCH)
                k += 1
                idle = 0 if got else idle + 1
                n += sum(1 for r in got if r.assessment is not None)
            return n

        ingest(0, earlier)
        drain()
        ingest(earlier, earlier + args.messages)
        _callgrind(True)
        cpu = time.process_time()
        assessed = drain()
        cpu = time.process_time() - cpu
        _callgrind(False)
        print(json.dumps({"assessed": assessed, "workers": args.workers, "affinity": args.affinity,
                          "cpu_ms_per_message": round(cpu / max(assessed, 1) * 1000, 3)}))
    finally:
        for p in pipes if "pipes" in locals() else []:
            if p.affinity is not None:
                p.affinity.close()
        svc.close()
        stop_embedded(tmp / "pg")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

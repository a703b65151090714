"""The garbage collector in the long-running processes (``cds worker``, each ``cds serve`` process).

The text model keeps per-message results so that a conversation's earlier messages are not assessed
again with each new one (cds.nlp.model, 3 x 65,536 entries; the safety net's per-message hits too).
That is about 12 GC-tracked objects per cached message: 250,000 after 20,000 messages, ~800,000 once
the caches are full. They live long and hold no reference cycles, but CPython's full collection walks
every tracked object with the GIL held, so it stalls every thread of the process: measured on the
2-core AMD EPYC VM during a 200 messages/s stream, a full collection every 8-15 s per worker, each
75 ms at the start and 400 ms after 2 minutes (~800 ms to 1 s with full caches), and none of them found
more than 30 objects to free.

So every ``freeze_every_s`` (CDS_GC_FREEZE_S, 10 s) the survivors are moved to the permanent generation
(``gc.freeze()``, after collecting the young generations, where short-lived cycles die): later full
collections walk only what was created since. Same bench, 2 workers over 2 minutes: full collections
took 8.5 s in all (longest 514 ms) without it, 3.7 s (257 ms) freezing every 60 s, 1.0 s (113 ms, at
start-up; 11-95 ms after) every 10 s. Reference counting still frees frozen objects that are dropped (an evicted cache
entry); only a cycle among frozen objects would wait, and ``sweep_every_s`` unfreezes everything and
runs one full collection to free those (one pause of about a second per hour per process).
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger(__name__)

_started = False
_lock = threading.Lock()


def freeze_survivors() -> int:
    """Collect the young generations, then freeze every tracked object; returns how many are frozen."""
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()


def sweep() -> int:
    """Unfreeze, run a full collection, freeze again; returns how many objects the collection freed."""
    gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    return freed


def run(freeze_every_s: float, sweep_every_s: float, stop: threading.Event) -> None:
    """The loop ``start`` runs in its thread, until ``stop`` is set."""
    last_sweep = time.monotonic()
    while not stop.wait(freeze_every_s):
        if sweep_every_s > 0 and time.monotonic() - last_sweep >= sweep_every_s:
            t0 = time.perf_counter()
            freed = sweep()
            last_sweep = time.monotonic()
            log.info("full garbage collection", extra={"freed": freed, "ms": round(1000 * (time.perf_counter() - t0)),
                                                       "frozen": gc.get_freeze_count()})
        else:
            freeze_survivors()


def start(freeze_every_s: float, sweep_every_s: float) -> threading.Event | None:
    """Start the pacing thread once per process (``freeze_every_s`` <= 0: off). Returns its stop event."""
    global _started
    if freeze_every_s <= 0:
        return None
    with _lock:
        if _started:
            return None
        _started = True
    stop = threading.Event()
    threading.Thread(target=run, args=(freeze_every_s, sweep_every_s, stop), name="gc-pacing", daemon=True).start()
    return stop

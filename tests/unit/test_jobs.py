"""Scheduled jobs: one processing thread per process, and no wake-up is lost to that rule."""

from __future__ import annotations

import threading

from cds.jobs import OneAtATime


def test_a_second_caller_neither_waits_nor_runs_beside_the_first_but_gets_one_more_round() -> None:
    gate = OneAtATime()
    started, release = threading.Event(), threading.Event()
    rounds: list[int] = []
    inside = 0
    most_inside = 0
    lock = threading.Lock()

    def work() -> int:
        nonlocal inside, most_inside
        with lock:
            inside += 1
            most_inside = max(most_inside, inside)
        rounds.append(len(rounds))
        if len(rounds) == 1:
            started.set()
            release.wait(5)
        with lock:
            inside -= 1
        return len(rounds)

    first: list[object] = []
    t = threading.Thread(target=lambda: first.append(gate.run(work)))
    t.start()
    assert started.wait(5)
    assert gate.run(work) is None and gate.run(work) is None  # returned at once: the first one is running
    release.set()
    t.join(5)
    assert most_inside == 1
    assert len(rounds) == 2  # the callers' work ran once more (both asks folded into one round)
    assert first == [2]
    assert gate.run(work) == 3  # free again


def test_an_error_frees_the_gate() -> None:
    gate = OneAtATime()

    def boom() -> None:
        raise RuntimeError("x")

    try:
        gate.run(boom)
    except RuntimeError:
        pass
    assert gate.run(lambda: 7) == 7

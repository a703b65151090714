"""cds.gc_pacing: survivors are frozen (full collections then skip them) and the sweep still frees a cycle
that died after it was frozen."""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from collections.abc import Iterator

import pytest

from cds import gc_pacing


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process keeps its ordinary collector


@pytest.fixture
def no_thread_switch() -> Iterator[None]:
    """Other threads of the test process (tqdm's monitor, left by an earlier test) free objects of their
    own; one that ran between the freeze and the count made the count one short (once, in a full make test).
    A long switch interval keeps them from running in between."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    yield
    sys.setswitchinterval(old)


def test_freeze_moves_the_survivors_out_of_what_a_full_collection_walks(no_thread_switch: None) -> None:
    keep = [Node() for _ in range(5000)]
    before = len(gc.get_objects())
    frozen = gc_pacing.freeze_survivors()
    assert frozen >= 5000 and gc.get_freeze_count() == frozen
    assert len(gc.get_objects()) < before - 5000  # a full collection no longer walks them
    assert all(isinstance(n, Node) for n in keep)


def test_a_dropped_frozen_object_is_still_freed_by_reference_counting() -> None:
    n = Node()
    alive = weakref.ref(n)
    gc_pacing.freeze_survivors()
    del n
    assert alive() is None


def test_the_sweep_frees_a_cycle_that_died_after_it_was_frozen() -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    gc_pacing.freeze_survivors()
    del a, b
    gc.collect()
    assert alive() is not None  # frozen: an ordinary full collection does not see the cycle
    assert gc_pacing.sweep() >= 2 and alive() is None
    assert gc.get_freeze_count() > 0  # and what survived the sweep is frozen again


def test_the_loop_freezes_every_interval_and_sweeps_when_due() -> None:
    stop = threading.Event()
    a, b = Node(), Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    gc_pacing.freeze_survivors()
    del a, b
    thread = threading.Thread(target=gc_pacing.run, args=(0.01, 0.05, stop), daemon=True)
    thread.start()
    try:
        for _ in range(500):  # the sweep unfreezes, collects, then freezes again: wait for all of it
            if alive() is None and gc.get_freeze_count() > 0:
                break
            stop.wait(0.01)
        assert alive() is None and gc.get_freeze_count() > 0
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_off_when_the_interval_is_zero() -> None:
    assert gc_pacing.start(0, 3600) is None

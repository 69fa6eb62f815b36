"""core.parallel: the worker count and the ordered window of jobs started ahead."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from dedupimg.core import parallel
from dedupimg.core.parallel import started_ahead, worker_count


def test_worker_count_is_cores_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, least, most, want in [(1, 2, 4, 2), (3, 2, 4, 3), (16, 2, 4, 4), (None, 2, 4, 2), (None, 1, 4, 1),
                                     (1, 1, 4, 1), (8, 1, 4, 4)]:
        monkeypatch.setattr(parallel.os, "cpu_count", lambda c=cores: c)
        assert worker_count(least, most) == want


def test_pairs_come_in_order_with_jobs_started_window_ahead() -> None:
    started: list[int] = []
    seen: list[tuple[int, int]] = []

    def start(i: int) -> int:
        started.append(i)
        return i * i

    for item, job in started_ahead(range(10), start, 3):
        assert started[-1] == min(9, item + 3)  # the jobs of the next 3 items are already started
        seen.append((item, job))
    assert seen == [(i, i * i) for i in range(10)]


def test_unhanded_futures_are_cancelled_when_the_loop_stops_early() -> None:
    gate = threading.Event()
    futures: list[Future[int]] = []
    with ThreadPoolExecutor(1) as pool:
        def start(i: int) -> Future[int]:
            futures.append(pool.submit(lambda: int(gate.wait())) if i == 0 else pool.submit(int, i))
            return futures[-1]

        with pytest.raises(RuntimeError):
            for item, _ in started_ahead(range(100), start, 4):
                if item == 0:
                    raise RuntimeError("stop")
        gate.set()
    assert len(futures) == 5
    assert all(f.cancelled() for f in futures[1:])  # queued behind the blocked first one: never run


def test_jobs_that_are_not_futures_pass_through() -> None:
    assert list(started_ahead("abc", lambda c: None if c == "b" else c.upper(), 1)) == [("a", "A"), ("b", None),
                                                                                         ("c", "C")]

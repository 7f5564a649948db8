"""moe.host.HostPinner: the thread that drives decode steps kept on the fastest allowed core."""
import os
import threading

import pytest

from moe.host import HostPinner, can_pin, python_speed_ns

pytestmark = pytest.mark.skipif(not can_pin() or len(os.sched_getaffinity(0)) < 2,
                                reason="needs per-thread CPU affinity and two allowed cores")


class FakeHost:
    """Speeds per core (ns a turn) that the test sets; read for the core the calling thread is pinned to."""
    def __init__(self, speeds):
        self.speeds = dict(speeds)
        self.t = 0.0
        self.reads = 0

    def speed(self):
        mask = os.sched_getaffinity(0)
        assert len(mask) == 1, "a reading is taken on one core"
        self.reads += 1
        return self.speeds[next(iter(mask))]

    def clock(self):
        return self.t


@pytest.fixture
def cores():
    mask = os.sched_getaffinity(0)
    yield sorted(mask)[:2]
    os.sched_setaffinity(0, mask)  # whatever a failing test left


def test_the_thread_goes_to_the_fastest_core_and_back_on_release(cores):
    whole = os.sched_getaffinity(0)
    fast, slow = cores[1], cores[0]
    host = FakeHost({slow: 200.0, fast: 100.0})
    p = HostPinner(cores=set(cores), speed=host.speed, clock=host.clock)
    assert p.check() == fast and os.sched_getaffinity(0) == {fast}
    assert p.readings == {slow: 200.0, fast: 100.0} and p.best_ns == 100.0 and p.sweeps == 1
    p.release()
    assert os.sched_getaffinity(0) == whole and p.core is None


def test_a_check_times_the_core_only_every_so_often_and_moves_when_it_slowed(cores):
    a, b = cores
    host = FakeHost({a: 100.0, b: 150.0})
    p = HostPinner(every_s=2.0, slack=1.25, cores=set(cores), speed=host.speed, clock=host.clock)
    assert p.check() == a
    reads = host.reads
    host.t = 1.0
    assert p.check() == a and host.reads == reads          # not yet due: no reading at all
    host.t = 2.5
    host.speeds[a] = 120.0                                  # slower, within the slack: stays
    assert p.check() == a and host.reads == reads + 1 and p.sweeps == 1
    host.t = 5.0
    host.speeds[a] = 300.0                                  # past the slack: a new sweep picks b
    assert p.check() == b and os.sched_getaffinity(0) == {b}
    assert p.sweeps == 2 and p.moves == 1 and p.best_ns == 150.0
    p.release()


def test_steps_from_another_thread_pin_that_thread(cores):
    a, b = cores
    host = FakeHost({a: 100.0, b: 300.0})
    p = HostPinner(cores=set(cores), speed=host.speed, clock=host.clock)
    whole = os.sched_getaffinity(0)
    seen = {}

    def worker():
        seen["core"] = p.check()
        seen["mask"] = os.sched_getaffinity(0)
        p.release()
        seen["after"] = os.sched_getaffinity(0)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"core": a, "mask": {a}, "after": whole}
    assert os.sched_getaffinity(0) == whole  # this thread was never pinned
    assert p.check() == a and p.thread == threading.get_ident()
    p.release()


def test_bad_settings_are_refused_and_the_real_timer_reads_a_speed(cores):
    with pytest.raises(ValueError, match="every_s > 0 and slack >= 1"):
        HostPinner(slack=0.5)
    with pytest.raises(ValueError, match="not allowed to this thread"):
        HostPinner(cores={max(os.sched_getaffinity(0)) + 1000})
    assert 0 < python_speed_ns(200) < 1e6
    assert HostPinner(cores={cores[0]}).check() is None  # one core: nothing to choose, nothing pinned

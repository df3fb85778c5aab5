"""gcpause: the cyclic collector is off while any dump or restore runs and
back on when the last of overlapping ones ends (a library may run two at
once in two threads)."""

import gc
import threading

from procsnap.gcpause import paused


def test_overlapping_pauses_end_with_the_collector_on():
    assert gc.isenabled()
    a, b = paused(), paused()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # the first to end is not the last running
    assert not gc.isenabled()
    b.__exit__(None, None, None)
    assert gc.isenabled()


def test_pauses_in_two_threads():
    inside, release = threading.Barrier(2), threading.Event()
    seen = []

    def run(wait):
        with paused():
            inside.wait()
            if wait:
                release.wait()
            seen.append(gc.isenabled())

    slow = threading.Thread(target=run, args=(True,))
    slow.start()
    run(False)  # this thread's pause ends first
    assert not gc.isenabled()
    release.set()
    slow.join()
    assert seen == [False, False] and gc.isenabled()


def test_a_collector_turned_off_by_the_caller_stays_off():
    gc.disable()
    try:
        with paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()

"""`python -m procsnap`: the CLI, ended by os._exit once its output is
flushed and the atexit handlers have run. The interpreter's own teardown
(every module of a dump or restore freed, ~24 M instructions, a tenth of a
small dump) has nothing left to do: the kernel closes the fds and the image
was made durable before dump returned. With a non-daemon thread still
running, output that cannot be flushed, or a profiler or tracer that
writes its results at exit (python -m cProfile -m procsnap, coverage), it
is the ordinary exit."""

import atexit
import os
import sys
import threading

from .cli import main


def _exit(code: int):
    if sys.getprofile() or sys.gettrace() or any(
            not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise SystemExit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        raise SystemExit(code) from None
    os._exit(code)


_exit(main())

"""seccomp (issue 11 part 6): strict mode and filters come back and still
act. The C target's modes (filter, threads, tsync, fork, strict) run in
every variant through test_dump_restore's cases; here: a sandboxed Python
program, a leave-running dump and a procsnap without CAP_SYS_ADMIN."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import (REPO, assert_cli_error, assert_pass, assert_untouched, dump_kill, proc_snapshot,
                      assert_same_snapshot, restore)

PYTHON = "/usr/bin/python3"

# A Python program that sandboxes itself with a small ctypes prctl: uname
# is refused with EPERM, kill() kills the process (SECCOMP_RET_KILL_PROCESS).
SANDBOXED = textwrap.dedent("""\
    import ctypes, os, signal, struct
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    NR_uname, NR_kill, AUDIT_ARCH_X86_64 = 63, 62, 0xC000003E
    RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
    LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
    insns = [(LD_W_ABS, 0, 0, 4), (JEQ_K, 1, 0, AUDIT_ARCH_X86_64), (RET_K, 0, 0, RET_ALLOW),
             (LD_W_ABS, 0, 0, 0),
             (JEQ_K, 0, 1, NR_uname), (RET_K, 0, 0, RET_ERRNO | 1),
             (JEQ_K, 0, 1, NR_kill), (RET_K, 0, 0, RET_KILL_PROCESS),
             (RET_K, 0, 0, RET_ALLOW)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *i) for i in insns))
    prog = struct.pack("<HxxxxxxQ", len(insns), ctypes.addressof(code))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    assert libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(prog), 0, 0) == 0, ctypes.get_errno()
    print("READY", flush=True)
    signal.sigwait({signal.SIGUSR1})
    try:
        os.uname()
        print("FAIL: uname worked", flush=True)
    except PermissionError:
        print("PASS", flush=True)
    os.kill(os.getppid(), 0)   # the filter kills us here
    print("FAIL: kill() did not kill", flush=True)
""")


def test_sandboxed_python_program(procs, tmp_path):
    """A python3 that sandboxes itself (ctypes prctl) is dumped, killed and
    restored: uname is still refused and kill() still kills it."""
    script = tmp_path / "sandboxed.py"
    script.write_text(SANDBOXED)
    t = procs.start([PYTHON, script], name="sandboxed")
    restore(procs, t, dump_kill(t, tmp_path / "img"))
    status, out = t.wait_result()
    assert out.endswith("READY\nPASS\n") and status == -31, f"{t}: status {status}, expected SIGSYS:\n{out}"


@pytest.mark.cases("seccomp-filter")
@pytest.mark.variants("pie")
def test_leave_running(procs, case, variant, tmp_path):
    """dump -R of a process whose filter kills on ptrace and refuses uname
    (the snapshot's injected fork runs with the filter suspended): the
    original carries on and passes, and so does its restore."""
    t = procs.start_case(case, variant)
    images = tmp_path / "img"
    images.mkdir()
    before = proc_snapshot(t.pid)
    r = subprocess.run([sys.executable, "-m", "procsnap", "dump", "-R", "-t", str(t.pid), "-D", str(images)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert_same_snapshot(before, proc_snapshot(t.pid))
    assert_pass(t)
    t.dumped = before
    restore(procs, t, images)
    assert_pass(t)


@pytest.mark.cases("seccomp-threads")
@pytest.mark.variants("pie")
def test_refused_without_cap_sys_admin(procs, case, variant, tmp_path):
    """A procsnap without CAP_SYS_ADMIN cannot suspend the filters (nor read
    them): the dump is refused naming the pid and the thread, the process
    is left running untouched."""
    t = procs.start_case(case, variant)
    images = tmp_path / "img"
    images.mkdir()
    before = proc_snapshot(t.pid)
    r = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
                        sys.executable, "-m", "procsnap", "dump", "-t", str(t.pid), "-D", str(images)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_cli_error(r, f"pid {t.pid}", "thread", "seccomp", "CAP_SYS_ADMIN")
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    assert_pass(t)


@pytest.mark.cases("seccomp-filter")
@pytest.mark.variants("pie")
def test_restore_refused_without_cap_sys_admin(procs, case, variant, tmp_path):
    """The image of a filtered process, restored by a procsnap without
    CAP_SYS_ADMIN: refused by name before any process is made (the filters
    could not be suspended for the rest of the rebuild)."""
    t = procs.start_case(case, variant)
    images = dump_kill(t, tmp_path / "img")
    t.dumped = None
    r = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
                        sys.executable, "-m", "procsnap", "restore", "-d", "-D", str(images)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_cli_error(r, f"pid {t.pid}", "seccomp", "CAP_SYS_ADMIN")
    assert not os.path.exists(f"/proc/{t.pid}"), "a process was made"

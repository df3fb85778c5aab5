"""What a new user meets: the README's examples run as written, the CLI's
verbs take DIR both ways and stop quietly on a closed pipe, messages read
as English, a process in a group or session led from outside the tree is
refused by name, restore reports the phase that takes the time, and
DumpStats prints short."""

import fcntl
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import procsnap
from conftest import (CASES_BY_ID, REPO, assert_cli_error, assert_pass, cli, descendants, dump_kill,
                      wait_until)
from procsnap.errors import article, plural

SLEEPER = CASES_BY_ID["sleep-pause"]
WRITER = CASES_BY_ID["writer"]  # 64 MiB in one mapping: more than one fill batch


def readme_python_examples():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_example_runs(procs, tmp_path):
    """Every python block of the README, run as written against a real
    target (its pid given as `pid`, /tmp/img moved under tmp_path); the
    process it restores passes its self-check."""
    examples = readme_python_examples()
    assert examples, "no python example in README.md"
    for i, code in enumerate(examples):
        t = procs.start_case(SLEEPER, "pie")
        images = tmp_path / f"img{i}" / "nested"  # not made beforehand: dump makes it
        script = f"pid = {t.pid}\n" + code.replace('"/tmp/img"', repr(str(images)))
        run = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            if "procsnap.restore(" in code:   # the example dumps it (killed) and restores it
                assert t.reap() == -signal.SIGKILL, t
            out, err = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        assert run.returncode == 0, f"README python example {i} failed:\n{code}\n{err}"
        if t.reaped:                          # the restored copy came back to us (the subreaper)
            wait_until(lambda: os.path.exists(f"/proc/{t.pid}"), f"restored pid {t.pid}")
            t.adopt(t.pid)
        assert_pass(t)


def test_show_quiet_on_a_closed_pipe(procs, tmp_path):
    """`procsnap show DIR | head -c 1`: no 'Broken pipe', no traceback,
    the status of a process killed by SIGPIPE (as cat has)."""
    t = procs.start_case(SLEEPER, "pie")
    images = tmp_path / "img"
    procsnap.dump(t.pid, str(images), leave_running=True)
    # A one-page pipe: show's output (~20 KiB) cannot all fit before head
    # exits, so show always meets the closed pipe (in a 64 KiB one it may
    # finish first and rightly exit 0).
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    show = subprocess.Popen([sys.executable, "-m", "procsnap", "show", str(images)], cwd=REPO,
                            stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    head = subprocess.run(["head", "-c", "1"], stdin=r, capture_output=True)
    os.close(r)                    # the only reader is gone now
    err = show.stderr.read().decode()
    show.wait(timeout=60)
    assert head.stdout == b"{"
    assert err == "", err
    assert show.returncode == 128 + signal.SIGPIPE, show.returncode
    assert_pass(t)


def test_show_and_verify_take_dir_both_ways(procs, tmp_path):
    t = procs.start_case(SLEEPER, "pie")
    images = tmp_path / "img"
    procsnap.dump(t.pid, str(images), leave_running=True)
    for verb in ("show", "verify"):
        by_arg, by_opt = cli(verb, images), cli(verb, "-D", images)
        assert by_arg.returncode == by_opt.returncode == 0, (by_arg.stderr, by_opt.stderr)
        assert by_arg.stdout == by_opt.stdout
        r = cli(verb)
        assert r.returncode == 2 and "give the image directory once" in r.stderr, r.stderr
    plain = tmp_path / "file"
    plain.write_text("x\n")
    for args in (("show", plain), ("verify", "-D", plain), ("restore", "-D", plain)):
        line = assert_cli_error(cli(*args), f"{plain}: not a directory")
        assert "File exists" not in line
    assert_pass(t)


def test_messages_are_english(procs, tmp_path):
    assert [plural(n, "process") for n in (0, 1, 2)] == ["0 processes", "1 process", "2 processes"]
    assert [plural(1, "problem"), plural(3, "problem")] == ["1 problem", "3 problems"]
    assert [article("pipe"), article("anon_inode"), article("unix socket")] == \
        ["a pipe", "an anon_inode", "a unix socket"]
    code = textwrap.dedent("""\
        import ctypes, signal
        fd = ctypes.CDLL(None).syscall(425, 4, ctypes.create_string_buffer(120))  # io_uring_setup
        print("READY", flush=True)
        signal.pause()
    """)
    t = procs.start([sys.executable, "-c", code], name="io_uring")
    with pytest.raises(procsnap.Unsupported) as exc:
        procsnap.dump(t.pid, str(tmp_path / "img"))
    assert "is an anon_inode (anon_inode:[io_uring])" in str(exc.value), str(exc.value)


def test_group_led_from_outside_refused(procs, targets, tmp_path):
    """A process whose session and group are led by its parent (a shell),
    dumped alone: refused naming it, the session, the group and the leader;
    --shell-job says that is wanted."""
    binary = targets.path(SLEEPER.target, "pie")
    sh = procs.start(["sh", "-c", f"{binary} {SLEEPER.mode} & wait"], name="sh-sleeper")
    wait_until(lambda: len(descendants(sh.pid)) == 1, "the shell's child")
    child = descendants(sh.pid)[0]
    with pytest.raises(procsnap.Unsupported) as exc:
        procsnap.dump(child, str(tmp_path / "img"))
    msg = str(exc.value)
    assert msg.startswith(f"pid {child}: session {sh.pid} (leader: pid {sh.pid}) and process group {sh.pid} "
                          f"(leader: pid {sh.pid}) are led from outside the dumped tree"), msg
    assert "--shell-job" in msg
    assert_cli_error(cli("dump", "-t", child, "-D", tmp_path / "img"), f"pid {child}", "--shell-job")
    stats = procsnap.dump(child, str(tmp_path / "img"), leave_running=True, shell_job=True)
    assert stats.checkpoint.task.pid == child
    os.kill(child, signal.SIGUSR1)
    status, out = sh.wait_exit()
    assert status == 0 and "PASS\n" in out, (status, out)


def test_restore_reports_phases(procs, tmp_path):
    """progress(phase, done, total): the page check, then the fill with
    real fractions in between (64 MiB in one mapping), each reaching its total."""
    t = procs.start_case(WRITER, "pie")
    images = dump_kill(t, tmp_path / "img")
    seen = []
    pid = procsnap.restore(str(images), progress=lambda phase, done, total: seen.append((phase, done, total)))
    t.adopt(pid)
    phases = list(dict.fromkeys(phase for phase, _, _ in seen))
    assert phases == ["check pages", "fill memory"], phases
    for phase in phases:
        reports = [(done, total) for p, done, total in seen if p == phase]
        totals = {total for _, total in reports}
        assert len(totals) == 1 and reports[-1][0] == reports[-1][1] > 64 << 20, (phase, reports[-3:])
        dones = [done for done, _ in reports]
        assert dones == sorted(dones), phase
        assert len([d for d in dones if 0 < d < reports[-1][1]]) >= 3, (phase, dones)
    assert_pass(t)


def test_dump_stats_repr_is_short(procs, tmp_path):
    t = procs.start_case(SLEEPER, "pie")
    stats = procsnap.dump(t.pid, str(tmp_path / "img"), leave_running=True)
    text = repr(stats)
    assert text.startswith("DumpStats(frozen_s=") and "checkpoint" not in text and len(text) < 300, text
    assert_pass(t)

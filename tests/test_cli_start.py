"""The CLI builds only the parser of the verb it is given (cli.build_parser(verb)):
what it parses must be what the whole parser parses, and what it refuses the
whole parser refuses with the same words."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import CASES_BY_ID, REPO, assert_pass, assert_same_snapshot, proc_snapshot
from procsnap import cli

ARGVS = [
    ["dump", "-t", "1", "-D", "d"],
    ["-v", "dump", "-t", "1", "-D", "d", "-R", "--external", "mnt[/x]:y", "--encrypt", "k", "--tls-ca", "c"],
    ["-vv", "restore", "-D", "d", "-d", "--pidfile", "p", "--inherit-fd", "fd[0]:pipe:[1]", "-v"],
    ["--verb", "pre-dump", "-t", "1", "-D", "d", "--dirty-tracking", "hashes"],
    ["migrate", "-t", "1", "--to", "h:1", "--max-rounds", "2"],
    ["receive", "-D", "d", "--listen", "127.0.0.1:0"],
    ["page-server", "-D", "d", "--stream", "-"],
    ["show", "d", "ps", "--json"],
    ["verify", "-D", "d", "--allow-setuid"],
    ["core", "d", "-o", "f", "--pid", "3"],
    ["diff", "a", "b", "--json"],
    ["gc", "d", "--keep", "x"],
    ["check", "--feature", "list"],
]


def parse(parser, argv):
    args, extra = parser.parse_known_args(argv)
    return vars(args), extra


@pytest.mark.parametrize("argv", ARGVS, ids=lambda a: " ".join(a[:2]))
def test_one_verb_parses_as_the_whole_parser(argv):
    verb = cli._named_verb(argv)
    assert verb == next(a for a in argv if not a.startswith("-"))
    assert parse(cli.build_parser(verb), argv) == parse(cli.build_parser(), argv)


def test_no_verb_or_an_unknown_one_builds_the_whole_parser():
    assert cli._named_verb(["-h"]) is None and cli._named_verb(["-", "dump"]) is None
    assert cli._named_verb(["--", "dump"]) is None and cli._named_verb([]) is None
    whole = cli.build_parser()._subparsers._group_actions[0].choices.keys()
    assert cli.build_parser("dmp")._subparsers._group_actions[0].choices.keys() == whole
    assert list(cli.build_parser("gc")._subparsers._group_actions[0].choices) == ["gc"]


@pytest.mark.parametrize("argv, said", [
    (["dmp"], "invalid choice: 'dmp' (choose from 'dump', 'pre-dump', 'restore'"),
    (["dump", "-D", "d"], "the following arguments are required: -t/--tree"),
    (["dump", "-t", "x", "-D", "d"], "argument -t/--tree: invalid int value: 'x'"),
    (["restore", "-D", "d", "--bogus"], "unrecognized arguments: --bogus"),
    (["show", "d", "nosuchview"], "show: unknown view 'nosuchview'"),
])
def test_bad_command_lines_are_refused_in_one_line(argv, said):
    p = subprocess.run([sys.executable, "-m", "procsnap", *argv], capture_output=True, text=True)
    assert p.returncode == 2 and said in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_help_lists_every_verb():
    p = subprocess.run([sys.executable, "-m", "procsnap", "--help"], capture_output=True, text=True)
    assert p.returncode == 0
    for verb in ("dump", "pre-dump", "restore", "migrate", "receive", "page-server", "verify", "show", "core",
                 "diff", "gc", "check"):
        assert verb in p.stdout


def test_the_quick_exit_keeps_output_status_and_profiles(tmp_path):
    """`python -m procsnap` ends with os._exit: what it printed is all there,
    its status is the verb's, and a profiler's results are still written."""
    listed = subprocess.run([sys.executable, "-m", "procsnap", "check", "--feature", "list"],
                            capture_output=True, text=True)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) > 10, listed
    bad = subprocess.run([sys.executable, "-m", "procsnap", "verify", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode not in (0, 2) and bad.stderr.startswith("procsnap: error: "), bad.stderr
    prof = tmp_path / "cli.prof"
    p = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "procsnap", "check", "--feature",
                        "list"], capture_output=True, text=True)
    assert p.returncode == 0 and prof.stat().st_size > 0, p.stderr


def _imported(stderr: str) -> set[str]:
    """The modules `python -X importtime` says it imported."""
    return {m.group(1) for m in re.finditer(r"^import time:.*\|\s+([\w.]+)$", stderr, re.M)}


def test_a_plain_dump_and_restore_import_no_socket_nor_pickle_nor_the_other_side(procs, tmp_path):
    """The CLI's dump and restore of a process with no socket, run as the
    bench runs them: socket, selectors and pickle stay out (imported where
    a socket, a FIN, a container needs them), the restore imports nothing
    of the dumper's, and the process restored passes its own check and the
    state check."""
    t = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")
    images = tmp_path / "img"
    t.dumped = proc_snapshot(t.pid)
    dump = subprocess.run([sys.executable, "-X", "importtime", "-m", "procsnap", "dump", "-t", str(t.pid), "-D",
                           str(images)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr[-2000:]
    assert t.reap() == -signal.SIGKILL
    restore = subprocess.run([sys.executable, "-X", "importtime", "-m", "procsnap", "restore", "-d", "-D", str(images)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert restore.returncode == 0, restore.stderr[-2000:]
    pid = int(restore.stdout.split()[-1])
    dumped, old = t.dumped, t.pid
    t.adopt(pid)  # the CLI is gone: it came back to us, the subreaper
    assert pid == old, f"restored pid {pid}, expected the original {old}"
    assert_same_snapshot(dumped, proc_snapshot(pid), ignore_pos=t.ignore_pos, ignore_state=t.ignore_state)
    for side, run in (("dump", dump), ("restore", restore)):
        mods = _imported(run.stderr)
        assert "procsnap.objects.file" in mods, f"{side}: importtime said nothing: {run.stderr[-500:]}"
        assert not mods & {"socket", "selectors", "pickle"}, f"{side}: imported {mods & {'socket', 'selectors', 'pickle'}}"
    assert not {m for m in _imported(restore.stderr) if m.startswith("procsnap.dumper")}
    os.kill(pid, signal.SIGUSR1)
    assert_pass(t)

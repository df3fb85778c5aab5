"""The CLI builds only the parser of the verb it is given (cli.build_parser(verb)):
what it parses must be what the whole parser parses, and what it refuses the
whole parser refuses with the same words."""

from __future__ import annotations

import subprocess
import sys

import pytest

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

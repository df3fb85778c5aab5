"""Test hosts: each a network namespace, a pid namespace and a mount
namespace with its own /proc, made by the test and removed after it, so
that the same pid can exist on a source and a destination at once, as on
two machines (issue 13, part 5). Nothing goes off this machine: the hosts
are joined by veth pairs with addresses of their own (10.x), and the
machine's own network is not touched.

    make_hosts(n)          the `hosts` fixture: n hosts, host i at 10.R.0.(i+1)
                           on one link each to host 0 (a star: 0 is the hub),
                           every one removed after the test, also on failure
    host.popen(argv)       a process inside the host (nsenter into its three
                           namespaces); HostProc: .inner (its pid in the host)
    host.run(argv)         subprocess.run inside the host
    host.outer(inner)      the pid in our namespace of the host's pid `inner`
    host.exits()           {inner pid: wait status} of what the host's init reaped
    host.snapshot(pid)     conftest.proc_snapshot of the host's pid, taken inside
    host.add_addr / del_addr   a virtual address moved between hosts

Each host's PID 1 is a small Python init that reaps whatever is orphaned to
it and writes each exit to a file. Killing it (SIGKILL, by its pid) ends
every process of the host; the network namespace and its veth ends go with
the last of them.

The files are the machine's (the mount namespace is a private copy of
ours), so a target's binary and output file are at the same paths in
every host, as on machines sharing a file system.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

INIT = r"""
import os, sys, time
log = open(sys.argv[1], "a", buffering=1)
log.write("READY\n")
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.02)
        continue
    except InterruptedError:
        continue
    log.write(f"{pid} {status}\n")
"""

SNAPSHOT = r"""
import pickle, sys
sys.path.insert(0, sys.argv[1])
import conftest
sys.stdout.buffer.write(pickle.dumps(conftest.proc_snapshot(int(sys.argv[2]))))
"""


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                out += [int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def ns_pids(outer: int) -> list[int]:
    """NSpid of a process of ours: its pid in each pid namespace, ours first."""
    with open(f"/proc/{outer}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"pid {outer}: no NSpid line")


def _wait(cond, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class HostProc:
    """A process started in a host through nsenter: `popen` is nsenter (ours),
    `outer` the process itself as we see it, `inner` its pid in the host."""

    def __init__(self, host: "Host", popen: subprocess.Popen, name: str, out: Path, err: Path):
        self.host, self.popen, self.name, self.out_path, self.err_path = host, popen, name, out, err
        self.outer = _wait(lambda: next(iter(_children(popen.pid)), None) or (popen.poll() is not None and -1),
                           f"{name}: nsenter's child in {host.name}")
        if self.outer == -1:
            raise AssertionError(f"{name}: nsenter exited with {popen.returncode} in {host.name}: {self.stderr()}")
        self.inner = ns_pids(self.outer)[-1]

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait(self, timeout: float = 120.0) -> int:
        return self.popen.wait(timeout)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The process in the host (not nsenter, which then ends with it)."""
        with contextlib.suppress(ProcessLookupError):
            if self.popen.poll() is None:
                os.kill(self.outer, sig)


class Host:
    def __init__(self, name: str, workdir: Path):
        self.name, self.dir = name, workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "init.log"
        self.started: list[HostProc] = []
        self.unshare = subprocess.Popen(
            ["unshare", "--net", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "private",
             sys.executable, "-c", INIT, str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.dir / "init.err", "w"),
            start_new_session=True)
        self.init = _wait(lambda: next(iter(_children(self.unshare.pid)), None) or
                          (self.unshare.poll() is not None and -1), f"{name}: its init")
        if self.init == -1:
            raise AssertionError(f"{name}: unshare exited with {self.unshare.returncode}: "
                                 f"{(self.dir / 'init.err').read_text()}")
        _wait(lambda: self.log.exists() and "READY" in self.log.read_text(), f"{name}: init READY")
        self.pidns = os.readlink(f"/proc/{self.init}/ns/pid")
        self.run(["ip", "link", "set", "lo", "up"], check=True)
        self.addr = ""

    def nsenter(self, argv) -> list[str]:
        return ["nsenter", "-t", str(self.init), "-p", "-m", "-n", f"--wd={REPO}", "--", *map(str, argv)]

    def env(self, extra=None) -> dict:
        return {**os.environ, "PYTHONPATH": str(REPO), **(extra or {})}

    def run(self, argv, check: bool = False, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
        r = subprocess.run(self.nsenter(argv), capture_output=True, text=True, timeout=timeout, env=self.env(env))
        if check and r.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(map(str, argv))}: exit {r.returncode}: {r.stderr}")
        return r

    def popen(self, argv, name: str, env=None, stdout=None) -> HostProc:
        out, err = self.dir / f"{name}-{len(self.started)}.out", self.dir / f"{name}-{len(self.started)}.err"
        with open(out, "w") as o, open(err, "w") as e:
            p = subprocess.Popen(self.nsenter(argv), stdin=subprocess.DEVNULL, stdout=o if stdout is None else stdout,
                                 stderr=e, env=self.env(env), start_new_session=True)
        proc = HostProc(self, p, name, out, err)
        self.started.append(proc)
        return proc

    def set_last_pid(self, pid: int) -> None:
        """The next process made in the host gets pid+1 (ns_last_pid of the host's own pid namespace)."""
        self.run(["sh", "-c", f"echo {pid} > /proc/sys/kernel/ns_last_pid"], check=True)

    def outer(self, inner: int) -> int | None:
        """Our pid of the host's process `inner`, or None if there is none."""
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == self.pidns and ns_pids(int(name))[-1] == inner:
                    return int(name)
            except (OSError, AssertionError):
                continue
        return None

    def processes(self) -> list[int]:
        """The host's pids (inner), init excluded."""
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.readlink(f"/proc/{name}/ns/pid") == self.pidns:
                        with open(f"/proc/{name}/stat") as f:
                            if f.read().rpartition(")")[2].split()[0] != "Z":
                                out.append(ns_pids(int(name))[-1])
                except (OSError, AssertionError):
                    continue
        return sorted(p for p in out if p != 1)

    def exits(self) -> dict[int, int]:
        out = {}
        for line in self.log.read_text().splitlines()[1:]:
            pid, status = line.split()
            out[int(pid)] = int(status)
        return out

    def snapshot(self, pid: int):
        """conftest.proc_snapshot(pid), taken inside the host (its /proc)."""
        r = subprocess.run(self.nsenter([sys.executable, "-c", SNAPSHOT, TESTS, pid]), capture_output=True,
                           timeout=120, env=self.env())
        if r.returncode != 0:
            raise AssertionError(f"{self.name}: state check of pid {pid}: {r.stderr.decode(errors='replace')}")
        return pickle.loads(r.stdout)

    def add_addr(self, addr: str, dev: str) -> None:
        self.run(["ip", "addr", "add", addr, "dev", dev], check=True)

    def del_addr(self, addr: str, dev: str) -> None:
        self.run(["ip", "addr", "del", addr, "dev", dev], check=True)

    def kill(self) -> None:
        """The host, as a machine goes down: its init killed, and with it every process in it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init, signal.SIGKILL)
        for p in self.started:  # nsenter stops itself when its child stops: it must go on to reap it
            with contextlib.suppress(ProcessLookupError):
                if p.popen.poll() is None:
                    os.kill(p.popen.pid, signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.unshare.wait(30)  # the pid namespace is gone once its processes are reaped
        for p in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(30)

    def remove(self) -> None:
        for p in self.started:
            p.kill()
        self.kill()


class Hosts(list):
    """Hosts joined to host 0 by one veth pair each: host i is 10.NET.i.2/24
    on its link `v{i}`, host 0 is 10.NET.i.1 on its end `v{i}` (a hub)."""

    def __init__(self, workdir: Path):
        super().__init__()
        self.workdir = workdir
        self.net = 100 + os.getpid() % 150  # another worker's hosts are in namespaces of their own anyway
        self.links: list[tuple[str, str]] = []

    def add(self) -> Host:
        i = len(self)
        host = Host(f"host{i}", self.workdir)
        self.append(host)
        if i == 0:
            return host
        hub = self[0]
        tag = f"{os.getpid() % 100000}{i}"
        a, b = f"psh{tag}a", f"psh{tag}b"
        subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
        self.links.append((a, b))
        subprocess.run(["ip", "link", "set", a, "netns", str(hub.init), "name", f"v{i}"], check=True)
        subprocess.run(["ip", "link", "set", b, "netns", str(host.init), "name", f"v{i}"], check=True)
        hub.add_addr(f"10.{self.net}.{i}.1/24", f"v{i}")
        hub.run(["ip", "link", "set", f"v{i}", "up"], check=True)
        host.add_addr(f"10.{self.net}.{i}.2/24", f"v{i}")
        host.run(["ip", "link", "set", f"v{i}", "up"], check=True)
        host.addr = f"10.{self.net}.{i}.2"
        if not hub.addr:
            hub.addr = f"10.{self.net}.1.1"
        return host

    def route_between(self) -> None:
        """Hosts 1..n reach each other through host 0 (forwarding in host 0's own namespace)."""
        self[0].run(["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"], check=True)
        for i, host in enumerate(self[1:], 1):
            host.run(["ip", "route", "add", f"10.{self.net}.0.0/16", "via", f"10.{self.net}.{i}.1"], check=True)

    def remove(self) -> None:
        for host in reversed(self):
            host.remove()
        for a, _ in self.links:  # gone with the namespaces, normally
            subprocess.run(["ip", "link", "del", a], capture_output=True)


@pytest.fixture
def hosts(tmp_path):
    """make(n) -> Hosts: n test hosts (see above), removed after the test."""
    made = Hosts(tmp_path / "hosts")

    def make(n: int) -> Hosts:
        for _ in range(n):
            made.add()
        return made

    try:
        yield make
    finally:
        made.remove()

"""Pseudo-terminals whose master is held inside the tree: both ends, the
bytes queued each way, the settings, and the session they control.

    master (/dev/ptmx)  --to_slave-->   slave (/dev/pts/N): its readers' input
                        <--to_master--  the slave's output, for the master's readers

dump     per pty (found by the master's fdinfo tty-index, the slave's device
         number): termios (TCGETS2), window size, packet mode, lock, the
         slave's exclusive mode; both queues read through copies of the
         tree's fds (pidfd_getfd), the slave's with ICANON off for the
         moment (a canonical reader sees only whole lines), and written back
         at once (see refill), so a tree left running keeps them. From
         /proc/PID/stat (tty_nr, tpgid): the session it controls and that
         session's foreground process group.
restore  a master opened until the kernel hands out the same index (it
         gives the lowest free one; the extra masters are closed again),
         refilled, its settings set; the session leader takes it as its
         controlling terminal (TIOCSCTTY) right after setsid, before it makes
         its children (they inherit it); a process of the foreground group
         makes that group the foreground (TIOCSPGRP, SIGTTOU blocked) once it
         is in it. /dev/tty is opened again in each process once its
         controlling terminal is there.

A slave whose master is outside the tree is a terminal of the outside
world: tty.py's (--shell-job).
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import os
import signal
import stat
import termios

from .. import model
from ..errors import RestoreError, Unsupported
from . import protocol
from .protocol import OpenFd, Restoring

PTS_DIR = "/dev/pts/"
MAX_OPENS = 4096  # masters opened at most to reach a given index


@dataclasses.dataclass
class Pty:
    """A pseudo-terminal pair of the tree (record PTY, since format 1.3)."""

    index: int  # N of /dev/pts/N
    termios: bytes  # struct termios2 of the slave side (what both sides' TCGETS2 show)
    winsize: list[int]  # rows, cols, xpixel, ypixel
    locked: bool = False  # TIOCGPTLCK: the slave cannot be opened
    packet: bool = False  # TIOCGPKT: master reads carry a status byte
    exclusive: bool = False  # TIOCGEXCL of the slave: no further opens
    to_slave: bytes = b""  # queued for the slave's readers
    to_master: bytes = b""  # the slave's output not yet read from the master
    session: int = 0  # the session (its leader's pid) whose controlling terminal it is; 0: none
    fg_pgrp: int = 0  # that session's foreground process group
    master_path: str = "/dev/ptmx"


class Collect(protocol.Collect):
    def __init__(self):
        self.masters: dict[int, tuple[int, int, str]] = {}  # index -> (pid, fd, path)
        self.slaves: dict[int, list[tuple[OpenFd, model.FdEntry]]] = {}  # index -> slave fds of the tree
        self.dev_ttys: list[tuple[OpenFd, model.FdEntry]] = []

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        from ..kernel import tty

        if not stat.S_ISCHR(fd.st.st_mode):
            return None
        dev = (os.major(fd.st.st_rdev), os.minor(fd.st.st_rdev))
        if dev == tty.PTMX:
            with open(f"/proc/{fd.pid}/fdinfo/{fd.fd}") as f:
                index = next((int(line.split()[1]) for line in f if line.startswith("tty-index:")), -1)
            if index < 0:
                raise Unsupported(f"{fd.where} is a pty master ({fd.link}) without a tty-index; not supported", fd.pid)
            self.masters.setdefault(index, (fd.pid, fd.fd, fd.link))
            return model.FdEntry(fd.fd, model.FdKind.PTY_MASTER, fd.flags, 0, fd.link, index)
        if dev == tty.DEV_TTY:
            entry = model.FdEntry(fd.fd, model.FdKind.DEV_TTY, fd.flags, 0, "/dev/tty")
            self.dev_ttys.append((fd, entry))
            return entry
        if tty.is_pts(fd.st.st_rdev) and fd.link.startswith(PTS_DIR):
            index = tty.pts_index(fd.st.st_rdev)
            entry = model.FdEntry(fd.fd, model.FdKind.PTY_SLAVE, fd.flags, 0, fd.link, index)
            self.slaves.setdefault(index, []).append((fd, entry))
            return entry
        return None

    def collect_tree(self, root: model.Checkpoint, tree_pids: set[int]) -> None:
        from ..kernel import tty

        for index, ends in self.slaves.items():
            if index in self.masters:
                continue
            for fd, entry in ends:  # a terminal of the outside world
                if not fd.shell_job:
                    raise Unsupported(f"{fd.where} is a terminal ({fd.link}); dump with --shell-job", fd.pid)
                entry.kind, entry.file_id = model.FdKind.TTY, -1
        ptys = {}
        for index, (pid, fd, path) in sorted(self.masters.items()):
            slave = self.slaves.get(index, [(None, None)])[0][0]
            ptys[index] = _collect_pty(index, pid, fd, path, slave and (slave.pid, slave.fd))
        _collect_sessions(ptys, root.procs, tree_pids)
        for fd, entry in self.dev_ttys:
            ctty = _stat_tty(fd.pid)[0]
            if ctty == 0:
                raise Unsupported(f"{fd.where} is /dev/tty of a process without a controlling terminal; "
                                  "not supported", fd.pid)
            if not (tty.is_pts(ctty) and tty.pts_index(ctty) in ptys) and not fd.shell_job:
                name = f"/dev/pts/{tty.pts_index(ctty)}" if tty.is_pts(ctty) else \
                    f"terminal {os.major(ctty)}:{os.minor(ctty)}"
                raise Unsupported(f"{fd.where} is /dev/tty ({name}, outside the tree); dump with --shell-job", fd.pid)
        root.ptys = list(ptys.values())


def _stat_tty(pid: int) -> tuple[int, int]:
    """(tty_nr, tpgid) of /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[4]), int(fields[5])  # proc(5) fields 7 and 8


def _collect_pty(index: int, pid: int, fd: int, path: str, slave_at: tuple[int, int] | None) -> Pty:
    from ..kernel import tty

    where = f"pid {pid}: fd {fd} (pty master of /dev/pts/{index})"
    master = tty.copy_fd(pid, fd)
    slave = -1
    try:
        t = tty.get_termios(master)
        pty = Pty(index, bytes(t), tty.get_winsize(master), tty.get_locked(master), tty.get_packet(master),
                  master_path=path)
        if pty.packet and _status_pending(master):
            raise Unsupported(f"{where}: a packet-mode status byte is waiting to be read; not supported", pid)
        if slave_at is not None:
            slave = tty.copy_fd(*slave_at)
        else:  # no process holds the slave: open it for the moment
            if pty.locked:
                tty.set_locked(master, False)
            try:
                slave = tty.open_peer(master, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            finally:
                if pty.locked:
                    tty.set_locked(master, True)
        pty.exclusive = tty.get_exclusive(slave)
        pty.to_master = _drain(master, pty.packet)
        # Packet mode off meanwhile: our termios changes (IXON) would queue status bytes for the
        # master's reader; switching it on again clears them (none was waiting: checked above).
        if pty.packet:
            tty.set_packet(master, False)
        raw = tty.termios2.from_buffer_copy(pty.termios)
        raw.c_lflag &= ~(termios.ICANON | tty.EXTPROC)
        tty.set_termios(master, raw)
        try:
            pty.to_slave = _drain(slave, False)
        finally:
            tty.set_termios(master, t)
            try:
                refill(master, slave, pty)  # a tree left running has them again
            finally:
                if pty.packet:
                    tty.set_packet(master, True)
    except OSError as err:
        raise Unsupported(f"{where}: {err.strerror}", pid) from err
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return pty


def _status_pending(master: int) -> bool:
    import select

    p = select.poll()
    p.register(master, select.POLLPRI)
    return any(ev & select.POLLPRI for _, ev in p.poll(0))


def _drain(fd: int, packet: bool) -> bytes:
    from ..kernel import tty

    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)  # our copy shares the description: its flags are put back
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        return tty.read_all(fd, packet)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def refill(master: int, slave: int, pty: Pty) -> None:
    """Queue pty.to_slave and pty.to_master again, as they were: the bytes
    go through the line discipline once more, so for the moment it does
    nothing to them (output: OPOST off; input: no echo, signals, flow
    control or translation, and in canonical mode the editing characters
    moved to bytes the data does not hold, VEOF to NUL when it holds one:
    an end of file that ended a line is queued as NUL), then pty.termios
    is set. ICANON stays as it is, which keeps the line boundaries."""
    from ..kernel import tty

    saved = tty.termios2.from_buffer_copy(pty.termios)
    quiet = tty.termios2.from_buffer_copy(pty.termios)
    quiet.c_oflag &= ~termios.OPOST
    quiet.c_lflag &= ~(termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL | termios.ISIG
                       | termios.IEXTEN | termios.ECHOCTL | termios.ECHOPRT | termios.ECHOKE)
    quiet.c_iflag &= ~(termios.IXON | termios.IXOFF | termios.ISTRIP | termios.INLCR | termios.IGNCR
                       | termios.ICRNL | termios.IUCLC | termios.PARMRK | termios.BRKINT)
    if saved.c_lflag & termios.ICANON:
        free = [b for b in range(1, 256) if b not in pty.to_slave and b != 10]
        if len(free) < 5:
            raise OSError(22, "the input queued in canonical mode holds every byte value: it cannot be queued again")
        for i, cc in enumerate((termios.VERASE, termios.VKILL, termios.VEOL, termios.VEOL2, termios.VEOF)):
            quiet.c_cc[cc] = free[i]
        if 0 in pty.to_slave:
            quiet.c_cc[termios.VEOF] = 0
    tty.set_termios(master, quiet)
    try:
        for into, frm, data in ((master, slave, pty.to_master), (slave, master, pty.to_slave)):
            view = memoryview(data)
            while view:
                view = view[os.write(frm, view):]
            if data:
                tty.flush_input(into)
    finally:
        tty.set_termios(master, saved)


def _collect_sessions(ptys: dict[int, Pty], procs: list[model.Proc], tree_pids: set[int]) -> None:
    """Each pty's session and foreground group, from every process's tty_nr
    and tpgid; what the restore could not rebuild is refused by name."""
    from ..kernel import tty

    live = {p.pid: p for p in procs if not p.zombie}
    for pid, p in live.items():
        tty_nr, tpgid = _stat_tty(pid)
        if not tty.is_pts(tty_nr) or tty.pts_index(tty_nr) not in ptys:
            if tty_nr and any(q.sid == p.sid and q.pid != pid and _stat_tty(q.pid)[0] != tty_nr
                              for q in live.values()):
                raise Unsupported(f"pid {pid}: its controlling terminal ({tty_nr:#x}) is not its session's; "
                                  "not supported", pid)
            continue
        pty = ptys[tty.pts_index(tty_nr)]
        if p.sid not in live:
            raise Unsupported(f"pid {pid}: its controlling terminal /dev/pts/{pty.index} belongs to session "
                              f"{p.sid}, whose leader is not in the dumped tree; not supported", pid)
        pty.session, pty.fg_pgrp = p.sid, tpgid
    for pty in ptys.values():
        if not pty.session:
            continue
        members = [q for q in live.values() if q.sid == pty.session]
        lost = [q.pid for q in members if _stat_tty(q.pid)[0] == 0]
        if lost:
            raise Unsupported(f"pid {lost[0]}: in session {pty.session}, whose controlling terminal is "
                              f"/dev/pts/{pty.index}, but without it (TIOCNOTTY); not supported", lost[0])
        if not any(q.pgid == pty.fg_pgrp for q in members):
            raise Unsupported(f"pid {pty.session}: the foreground process group {pty.fg_pgrp} of its terminal "
                              f"/dev/pts/{pty.index} has no live process in the dumped tree; not supported",
                              pty.session)


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.PTY_MASTER, model.FdKind.PTY_SLAVE, model.FdKind.DEV_TTY)

    def __init__(self, root, tree_fds):
        super().__init__(root, tree_fds)
        self.ptys = {p.index: p for p in root.checkpoint.ptys}
        self.made: dict[int, tuple[int, int]] = {}  # index -> (master, our slave), restorer fds
        self.master_given: set[int] = set()

    def _pty(self, index: int) -> tuple[int, int]:
        if index not in self.made:
            self.made[index] = self._make(self.ptys[index])
        return self.made[index]

    def _make(self, pty: Pty) -> tuple[int, int]:
        from ..kernel import tty

        what = f"pty /dev/pts/{pty.index}"
        extra: list[int] = []
        try:
            for _ in range(MAX_OPENS):
                fd = protocol.open_path(pty.master_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC, what)
                got = tty.get_ptn(fd)
                if got == pty.index:
                    break
                extra.append(fd)
                if got > pty.index:
                    raise RestoreError(f"{what}: index {pty.index} is taken (the kernel gave {got})")
            else:
                raise RestoreError(f"{what}: index {pty.index} not reached in {MAX_OPENS} opens")
            master = self.own(fd)
            tty.set_locked(master, False)
            slave = self.own(protocol.open_path(f"{PTS_DIR}{pty.index}",
                                                os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC, what))
            tty.set_winsize(master, pty.winsize)
            refill(master, slave, pty)
            if pty.packet:
                tty.set_packet(master, True)
        except OSError as err:
            raise RestoreError(f"{what}: {err.strerror}") from err
        finally:
            for fd in extra:
                os.close(fd)
        return master, slave

    def prepare_vmas(self, ckpt: model.Checkpoint, prepared) -> None:
        """Per process, before its fds: the controlling terminal of the
        session it leads, the foreground group it is the first of, its
        /dev/tty fds (reopened in it once it has its terminal)."""
        from ..kernel import tty

        pid = ckpt.task.pid
        for pty in self.ptys.values():
            if pty.session == pid:
                slave = self._pty(pty.index)[1]
                prepared.in_session.append(lambda fd=slave: tty.set_ctty(fd))
            if pty.session and pty.fg_pgrp != pty.session and pid == self._fg_process(pty):
                master = self._pty(pty.index)[0]
                prepared.in_session.append(lambda fd=master, pgrp=pty.fg_pgrp: _take_foreground(fd, pgrp))
        for entry in ckpt.fds:
            if entry.kind == model.FdKind.DEV_TTY:
                if not self._session_has_pty(pid):  # --shell-job: the restorer's terminal, inherited
                    if ckpt.task.session_leader:
                        raise RestoreError(f"fd {entry.fd} was /dev/tty of the dumping terminal, but pid {pid} leads "
                                           "a session of its own, which has no controlling terminal after the "
                                           "restore (--shell-job gives the restorer's to its session)")
                    _check_own_tty(entry)
                prepared.in_child.append(lambda e=entry: _reopen_dev_tty(e))

    def _session_has_pty(self, pid: int) -> bool:
        sid = next((p.sid for p in self.root.checkpoint.procs if p.pid == pid), pid)
        return any(pty.session == sid for pty in self.ptys.values())

    def _fg_process(self, pty: Pty) -> int:
        """The first live process of the tree in the foreground group."""
        return next(p.pid for p in self.root.checkpoint.procs
                    if p.pgid == pty.fg_pgrp and p.sid == pty.session and not p.zombie)

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        import fcntl

        if entry.kind == model.FdKind.DEV_TTY:  # a stand-in until the process has its terminal
            return self.own(protocol.open_path("/dev/null", os.O_RDONLY | os.O_CLOEXEC, f"fd {entry.fd}"))
        master, _ = self._pty(entry.file_id)
        if entry.kind == model.FdKind.PTY_MASTER:
            if entry.file_id in self.master_given:
                raise RestoreError(f"fd {entry.fd}: a second open of the master of /dev/pts/{entry.file_id}")
            self.master_given.add(entry.file_id)
            fcntl.fcntl(master, fcntl.F_SETFL, int(entry.flags) & (os.O_NONBLOCK | os.O_APPEND))
            return master
        flags = protocol.open_flags(entry) | os.O_NOCTTY
        if entry.flags & model.OpenFlag.O_LARGEFILE:  # opened by path: open() adds O_LARGEFILE
            return self.own(protocol.open_path(entry.path, flags, f"fd {entry.fd}"))
        from ..kernel import tty  # opened from the master (openpty, forkpty): TIOCGPTPEER does not

        try:  # its flags are the file's as given, O_CLOEXEC too (fdinfo would show it): set apart
            fd = self.own(tty.open_peer(master, flags & ~os.O_CLOEXEC))
            os.set_inheritable(fd, False)
            return fd
        except OSError as err:
            raise RestoreError(f"fd {entry.fd}: cannot open {entry.path}: {err.strerror}") from err

    def end_prepare(self) -> None:
        """Every open of every slave is made: the locks and exclusive modes go back on."""
        from ..kernel import tty

        for index, (master, slave) in self.made.items():
            pty = self.ptys[index]
            try:
                if pty.exclusive:
                    tty.set_exclusive(slave)
                if pty.locked:
                    tty.set_locked(master, True)
            except OSError as err:
                raise RestoreError(f"pty /dev/pts/{index}: {err.strerror}") from err


def _take_foreground(master: int, pgrp: int) -> None:
    """In the new process, in its group now: make the group the terminal's
    foreground. From a background group that stops the caller with SIGTTOU,
    unless it blocks it (tty_check_change)."""
    from ..kernel import tty

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        tty.set_fg_pgrp(master, pgrp)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _check_own_tty(entry: model.FdEntry) -> None:
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC))
    except OSError as err:
        raise RestoreError(f"fd {entry.fd} was /dev/tty of the dumping terminal; the restorer has no controlling "
                           f"terminal to give it ({err.strerror}): restore from one, with --shell-job") from err


def _reopen_dev_tty(entry: model.FdEntry) -> None:
    fd = os.open("/dev/tty", protocol.open_flags(entry) | os.O_NOCTTY)
    os.dup2(fd, entry.fd, inheritable=not entry.flags & os.O_CLOEXEC)
    os.close(fd)


def verify(root: model.Checkpoint) -> list[str]:
    """A pty's index is free here (devpts shows every pty in use as /dev/pts/N)."""
    return [f"pty /dev/pts/{p.index}: the index is taken" for p in root.ptys
            if os.path.exists(f"{PTS_DIR}{p.index}")]


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    return [f"fd {e.fd}: path {e.path!r} is not a pty slave" for e in ckpt.fds
            if e.kind == model.FdKind.PTY_SLAVE and e.path != f"{PTS_DIR}{e.file_id}"]


def check_tree(ckpt: model.Checkpoint, root: model.Checkpoint) -> list[str]:
    indexes = {p.index for p in root.ptys}
    problems = [f"fd {e.fd}: unknown pty {e.file_id}" for e in ckpt.fds
                if e.kind in (model.FdKind.PTY_MASTER, model.FdKind.PTY_SLAVE) and e.file_id not in indexes]
    pids = {p.pid for p in root.procs} or {root.task.pid}
    return problems + [f"pty {p.index}: termios of {len(p.termios)} bytes, window {p.winsize}, session {p.session}"
                       for p in root.ptys if len(p.termios) != 44 or len(p.winsize) != 4
                       or not all(0 <= v < 1 << 16 for v in p.winsize) or not 0 <= p.index < 1 << 20
                       or (p.session and p.session not in pids) or p.master_path not in ("/dev/ptmx", "/dev/pts/ptmx")]

"""Terminal ioctls: the layouts and requests of include/uapi/asm-generic/
termbits.h and ioctls.h (x86_64 uses the generic ones), and the calls
procsnap makes with them. Every call raises OSError naming the request."""

from __future__ import annotations

import ctypes
import enum
import fcntl
import os
import select
import struct

from .libc import copy_fd  # noqa: F401 - a pty's fds are copied: opening a master again makes a new pty

NCCS = 19


class termios2(ctypes.Structure):
    """struct termios2 (include/uapi/asm-generic/termbits.h), 44 bytes."""

    _fields_ = [("c_iflag", ctypes.c_uint32), ("c_oflag", ctypes.c_uint32), ("c_cflag", ctypes.c_uint32),
                ("c_lflag", ctypes.c_uint32), ("c_line", ctypes.c_uint8), ("c_cc", ctypes.c_uint8 * NCCS),
                ("c_ispeed", ctypes.c_uint32), ("c_ospeed", ctypes.c_uint32)]


WINSIZE = struct.Struct("<HHHH")  # struct winsize (asm-generic/termios.h): rows, cols, xpixel, ypixel
INT = struct.Struct("<i")


class Ioctl(enum.IntEnum):
    """include/uapi/asm-generic/ioctls.h (_IOR/_IOW sizes: termios2 44, int 4)."""

    TIOCEXCL = 0x540C
    TIOCSCTTY = 0x540E
    TIOCSPGRP = 0x5410
    TIOCGWINSZ = 0x5413
    TIOCSWINSZ = 0x5414
    TIOCINQ = 0x541B  # FIONREAD
    TIOCPKT = 0x5420
    TCGETS2 = 0x802C542A
    TCSETS2 = 0x402C542B
    TIOCGPTN = 0x80045430
    TIOCSPTLCK = 0x40045431
    TIOCGPKT = 0x80045438
    TIOCGPTLCK = 0x80045439
    TIOCGEXCL = 0x80045440
    TIOCGPTPEER = 0x5441


# The c_cc indices and c_iflag/c_oflag/c_lflag bits are the stdlib termios module's (termios.ICANON ...),
# but for this one (asm-generic/termbits.h): the line discipline's work is done elsewhere (a pty's master)
EXTPROC = 0o200000
PTMX = (5, 2)  # /dev/ptmx and each devpts instance's ptmx
DEV_TTY = (5, 0)  # /dev/tty: the opener's controlling terminal
CONSOLE = (5, 1)
PTS_MAJORS = range(136, 144)  # UNIX98_PTY_SLAVE_MAJOR .. + UNIX98_PTY_MAJOR_COUNT


def pts_index(rdev: int) -> int:
    """The pty index of a /dev/pts/N device number (tty_nr in /proc/PID/stat)."""
    return (os.major(rdev) - PTS_MAJORS.start) * 256 + os.minor(rdev)


def is_pts(rdev: int) -> bool:
    return rdev != 0 and os.major(rdev) in PTS_MAJORS


def _ioctl_int(fd: int, req: Ioctl) -> int:
    try:
        return INT.unpack(fcntl.ioctl(fd, req, bytes(INT.size)))[0]
    except OSError as err:
        raise OSError(err.errno, f"ioctl {req.name}: {err.strerror}") from err


def _ioctl_set(fd: int, req: Ioctl, arg) -> None:
    try:
        fcntl.ioctl(fd, req, arg)
    except OSError as err:
        raise OSError(err.errno, f"ioctl {req.name}: {err.strerror}") from err


def get_ptn(fd: int) -> int:
    return _ioctl_int(fd, Ioctl.TIOCGPTN)


def get_locked(fd: int) -> bool:
    return bool(_ioctl_int(fd, Ioctl.TIOCGPTLCK))


def set_locked(fd: int, locked: bool) -> None:
    _ioctl_set(fd, Ioctl.TIOCSPTLCK, INT.pack(int(locked)))


def get_packet(fd: int) -> bool:
    return bool(_ioctl_int(fd, Ioctl.TIOCGPKT))


def set_packet(fd: int, on: bool) -> None:
    _ioctl_set(fd, Ioctl.TIOCPKT, INT.pack(int(on)))


def get_exclusive(fd: int) -> bool:
    return bool(_ioctl_int(fd, Ioctl.TIOCGEXCL))


def set_exclusive(fd: int) -> None:
    _ioctl_set(fd, Ioctl.TIOCEXCL, 0)


def inq(fd: int) -> int:
    return _ioctl_int(fd, Ioctl.TIOCINQ)


def get_termios(fd: int) -> termios2:
    t = termios2()
    try:
        fcntl.ioctl(fd, Ioctl.TCGETS2, t)
    except OSError as err:
        raise OSError(err.errno, f"ioctl TCGETS2: {err.strerror}") from err
    return t


def set_termios(fd: int, t: termios2) -> None:
    _ioctl_set(fd, Ioctl.TCSETS2, bytes(t))


def get_winsize(fd: int) -> list[int]:
    try:
        return list(WINSIZE.unpack(fcntl.ioctl(fd, Ioctl.TIOCGWINSZ, bytes(WINSIZE.size))))
    except OSError as err:
        raise OSError(err.errno, f"ioctl TIOCGWINSZ: {err.strerror}") from err


def set_winsize(fd: int, ws: list[int]) -> None:
    _ioctl_set(fd, Ioctl.TIOCSWINSZ, WINSIZE.pack(*ws))


def set_ctty(fd: int) -> None:
    """TIOCSCTTY: the caller, a session leader without one, takes the tty as its controlling terminal."""
    _ioctl_set(fd, Ioctl.TIOCSCTTY, 0)


def set_fg_pgrp(fd: int, pgrp: int) -> None:
    _ioctl_set(fd, Ioctl.TIOCSPGRP, INT.pack(pgrp))


def open_peer(master: int, flags: int) -> int:
    """TIOCGPTPEER: the slave of `master`, opened without a path."""
    try:
        return fcntl.ioctl(master, Ioctl.TIOCGPTPEER, flags)
    except OSError as err:
        raise OSError(err.errno, f"ioctl TIOCGPTPEER: {err.strerror}") from err


def flush_input(fd: int) -> None:
    """Bytes written to the other side wait in the tty's flip buffer until a
    worker hands them to the line discipline; poll() on an empty side runs
    that work at once (n_tty_poll: tty_buffer_flush_work)."""
    select.select([fd], [], [], 0)


def read_all(fd: int, packet: bool = False) -> bytes:
    """Everything readable at the (non-blocking) `fd` now; a read that finds
    nothing first flushes the flip buffer (n_tty_read), so EAGAIN means all.
    In packet mode each read starts with a TIOCPKT_DATA byte, dropped."""
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return bytes(data)
        except OSError as err:
            if err.errno == 5:  # EIO: the other side is closed and the queue empty
                return bytes(data)
            raise
        if not chunk:
            return bytes(data)
        data += chunk[1:] if packet else chunk

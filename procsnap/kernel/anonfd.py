"""eventfd, signalfd, timerfd and epoll made again, with their state
(the restorer makes them; an epoll's watches are added by the process
that owns the fds, since the kernel keys a watch by fd number)."""

from __future__ import annotations

import ctypes
import fcntl
import os

from .libc import libc, oserror

O_NONBLOCK = os.O_NONBLOCK
O_CLOEXEC = os.O_CLOEXEC
EFD_SEMAPHORE = 1
TFD_IOC_SET_TICKS = 0x40085400  # _IOW('T', 0, __u64) (fs/timerfd.c, CONFIG_CHECKPOINT_RESTORE)
EPOLL_CTL_ADD = 1
NSEC = 1_000_000_000


class itimerspec(ctypes.Structure):
    """struct itimerspec: it_interval, it_value (timespec each)."""

    _fields_ = [("interval_s", ctypes.c_long), ("interval_ns", ctypes.c_long),
                ("value_s", ctypes.c_long), ("value_ns", ctypes.c_long)]


class epoll_event(ctypes.Structure):
    """struct epoll_event, packed on x86_64 (12 bytes)."""

    _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


def _checked(ret: int, call: str) -> int:
    if ret < 0:
        raise oserror(call)
    return ret


def make_eventfd(count: int, semaphore: bool, nonblock: bool) -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblock else 0) | (EFD_SEMAPHORE if semaphore else 0))
    if count:
        os.eventfd_write(fd, count)  # initval is 32 bits; the counter is 64
    return fd


def make_signalfd(mask: int, nonblock: bool) -> int:
    sigset = ctypes.c_uint64(mask)
    return _checked(libc.signalfd(-1, ctypes.byref(sigset), O_CLOEXEC | (O_NONBLOCK if nonblock else 0)),
                    "signalfd")


def make_timerfd(clockid: int, nonblock: bool, value_ns: int, interval_ns: int, ticks: int) -> int:
    """Armed with the time that was left (relative), and its expirations not
    yet read."""
    fd = _checked(libc.timerfd_create(clockid, O_CLOEXEC | (O_NONBLOCK if nonblock else 0)),
                  f"timerfd_create(clock {clockid})")
    try:
        if interval_ns and not value_ns:
            # a periodic timer whose next expiration was already due when its
            # fdinfo was read (the kernel shows a negative time left as 0; it
            # forwards the timer only when it is read): that expiration is
            # counted, the next one an interval later, still periodic
            ticks, value_ns = ticks + 1, interval_ns
        if value_ns:
            spec = itimerspec(interval_ns // NSEC, interval_ns % NSEC, value_ns // NSEC, value_ns % NSEC)
            _checked(libc.timerfd_settime(fd, 0, ctypes.byref(spec), None), "timerfd_settime")
        if ticks:
            fcntl.ioctl(fd, TFD_IOC_SET_TICKS, ctypes.c_uint64(ticks))
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_epoll() -> int:
    return _checked(libc.epoll_create1(O_CLOEXEC), "epoll_create1")


def epoll_add(epfd: int, fd: int, events: int, data: int) -> None:
    ev = epoll_event(events, data)
    _checked(libc.epoll_ctl(epfd, EPOLL_CTL_ADD, fd, ctypes.byref(ev)), f"epoll_ctl(ADD, fd {fd})")

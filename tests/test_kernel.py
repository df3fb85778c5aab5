"""Pure functions of the kernel layer, on fixtures named after their case."""

import os
from pathlib import Path

from procsnap.kernel import proc
from procsnap.kernel.arch import x86_64 as arch


def test_injection_zeroes_unused_argument_registers():
    # A frozen task's r8/r9 hold whatever it had; prctl(PR_SET_MM_MAP) with a
    # stray 5th argument fails with EINVAL (seen on restore, depending on the
    # child's registers at the freeze).
    base = arch.user_regs_struct(r8=0xdead, r9=0xbeef, r10=7, rdx=3)
    regs = arch.prepare_injection(base, gadget=0x1000, nr=arch.NR.prctl, args=(35, 14, 0x2000, 104))
    assert (regs.rdi, regs.rsi, regs.rdx, regs.r10) == (35, 14, 0x2000, 104)
    assert (regs.r8, regs.r9) == (0, 0)
    assert regs.rax == arch.NR.prctl and regs.rip == 0x1000
    assert regs.orig_rax == (1 << 64) - 1


def test_restart_rule_reexecutes_interrupted_syscall():
    regs = arch.user_regs_struct(orig_rax=230, rax=arch.unsigned(-516), rip=0x5002)
    arch.rewind_to_syscall(regs, reexecute_restartblock=True)
    assert (regs.rax, regs.rip, regs.orig_rax) == (230, 0x5000, (1 << 64) - 1)
    regs = arch.user_regs_struct(orig_rax=arch.unsigned(-1), rax=5, rip=0x5002)
    arch.rewind_to_syscall(regs, reexecute_restartblock=True)
    assert (regs.rax, regs.rip) == (5, 0x5002)


def test_maps_path_with_spaces_and_deleted():
    text = ("7f00-7f01 rw-s 00000000 00:05 42                         /dev/shm/a b (deleted)\n"
            "VmFlags: rd wr sh mr mw me ms sd\n")
    (m,) = proc.parse_maps(text)
    assert m.path == "/dev/shm/a b (deleted)" and m.deleted and m.shared
    assert "sh" in m.vmflags


def test_smaps_parsed_in_one_pass_as_line_by_line():
    """parse_maps reads smaps (and maps) with one regex over whole VMAs;
    on our own smaps it gives what the line parser gives, and a line it
    cannot parse still raises, naming the line."""
    text = Path("/proc/self/smaps").read_text()
    fast = proc._parse_whole(text, proc._SMAPS_RE)
    lines = text.splitlines(keepends=True)
    slow = proc.parse_maps("".join(line for line in lines if not line.startswith("VmFlags:")))
    assert fast is not None and len(fast) == len(slow) > 10
    assert [(m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path) for m in fast] == \
        [(m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path) for m in slow]
    assert all(m.vmflags and "rd" in m.vmflags or m.perms[0] == "-" for m in fast)
    assert proc.parse_maps(text) == fast
    maps = Path("/proc/self/maps").read_text()  # maps alike, anonymous lines (no path) among them
    whole = proc._parse_whole(maps, proc._MAPS_LINES_RE)
    assert whole == [proc.parse_maps(line)[0] for line in maps.splitlines(keepends=True)]
    assert any(not m.path for m in whole) and proc.parse_maps(maps) == whole
    later = text.replace("\nRss:", "\nVmNew:        0 kB\nRss:")  # a field a later kernel may add: the line parser
    assert proc._parse_whole(later, proc._SMAPS_RE) is None and proc.parse_maps(later) == fast
    broken = text.replace("\nRss:", "\nrss:", 1)
    try:
        proc.parse_maps(broken)
    except ValueError as err:
        assert "rss:" in str(err)
    else:
        raise AssertionError("a broken smaps line was parsed")


def test_stat_comm_with_parenthesis():
    fields = " ".join(["S"] + ["1"] * 60)
    st = proc.parse_stat(f"123 (a) (b) {fields}")
    assert st.comm == "a) (b" and st.state == "S"


def test_pagemap_classification_private_and_shared():
    def entry(top):
        return bytes(7) + bytes([top])
    present, swapped, file_ = 0x80, 0x40, 0x20
    pm = b"".join(entry(t) for t in (0, present, present, present | file_, swapped, 0))
    assert proc.classify_pages(pm, shared_anon=False) == [(1, 2), (4, 1)]
    assert proc.classify_pages(pm, shared_anon=True) == [(1, 4)]


def test_limits_table_in_rlimit_order():
    text = ("Limit                     Soft Limit           Hard Limit           Units     \n"
            "Max cpu time              unlimited            unlimited            seconds   \n"
            "Max file size             unlimited            unlimited            bytes     \n"
            "Max data size             unlimited            unlimited            bytes     \n"
            "Max stack size            8388608              unlimited            bytes     \n"
            "Max core file size        0                    unlimited            bytes     \n"
            "Max realtime timeout      unlimited            unlimited            us        \n")
    limits = proc.parse_limits(text)
    assert limits[3] == (8388608, proc.RLIM_INFINITY) and limits[4] == (0, proc.RLIM_INFINITY)
    assert len(limits) == 6


def test_periodic_timerfd_due_when_dumped_stays_periodic():
    """A periodic timerfd whose next expiration was due when its fdinfo was
    read shows 0 time left (the kernel forwards it only when read): made
    again, it is still periodic, with that expiration counted (seen under
    load: a restore that disarmed it)."""
    import time as _time

    from procsnap.kernel import anonfd

    CLOCK_MONOTONIC = 1
    fd = anonfd.make_timerfd(CLOCK_MONOTONIC, True, 0, 50_000_000, 3)
    try:
        fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
        assert "it_interval: (0, 50000000)" in fdinfo, fdinfo
        assert int.from_bytes(os.read(fd, 8), "little") == 4  # the 3 not read, and the one due
        _time.sleep(0.12)
        assert int.from_bytes(os.read(fd, 8), "little") >= 1  # and on it goes
    finally:
        os.close(fd)

"""What procsnap refuses, said by name: the kinds of fds and mappings no
kind of objects/ takes, in the words of what they are.

    fd link (readlink /proc/PID/fd/N)      said as
    ---------------------------------      -------
    socket:[N]                             what sockname.describe_socket finds (TCP listening on ...)
    anon_inode:NAME                        ANON_INODES[NAME], else "an anonymous inode NAME"
    NS:[N] (mnt:, net:, ...)               a namespace fd
    anything else                          its file type (stat.filemode) and its path

and mappings (the name /proc/PID/maps shows) in VMA_NAMES. Every kind the
kernel can give is in notes/issue-11-kinds.md with what procsnap does.
"""

from __future__ import annotations

import stat

from ..errors import article
from .protocol import OpenFd

# anon_inode names (the second argument of the kernel's anon_inode_getfd/getfile calls)
ANON_INODES = {
    "[io_uring]": "an io_uring instance (io_uring_setup)",
    "[userfaultfd]": "a userfaultfd",
    "bpf-map": "a BPF map",
    "bpf-prog": "a BPF program",
    "bpf_link": "a BPF link",
    "bpf_iter": "a BPF iterator",
    "btf": "a BPF type-format object (BTF)",
    "bpf-token": "a BPF token",
    "[perf_event]": "a perf event (perf_event_open)",
    "[fscontext]": "a filesystem context (fsopen/fspick)",
    "[landlock-ruleset]": "a Landlock ruleset",
    "[pidfd]": "a pidfd",
    "inotify": "an inotify instance",
    "[fanotify]": "a fanotify group",
    "seccomp notify": "a seccomp user-notification fd",
    "kvm-vm": "a KVM virtual machine",
    "[vfio-device]": "a VFIO device",
    "sync_file": "a sync_file fence",
    "[dmabuf]": "a DMA buffer",
    "iommufd": "an iommufd",
    "ntsync": "an NT synchronisation object (ntsync)",
    "[timerfd]": "a timerfd",
    "[eventfd]": "an eventfd",
    "[signalfd]": "a signalfd",
    "[eventpoll]": "an epoll instance",
}

# Mappings of objects no kind restores, by the name maps shows (a prefix)
VMA_NAMES = {
    "/[aio]": "the ring of an AIO context (io_setup)",
    "anon_inode:[io_uring]": "the rings of an io_uring instance",
    "anon_inode:[perf_event]": "the ring buffer of a perf event",
    "anon_inode:bpf-map": "a BPF map (mmap'able array)",
    "/dmabuf:": "a DMA buffer",
    "anon_inode:[userfaultfd]": "a userfaultfd's area",
}

NAMESPACE_LINKS = ("cgroup:", "ipc:", "mnt:", "net:", "pid:", "time:", "user:", "uts:")


def refused_kind(fd: OpenFd) -> str:
    """What the fd is, with its article, for 'pid P: fd N is ... (LINK); not supported'."""
    if stat.S_ISSOCK(fd.st.st_mode):
        from .sockname import describe_socket  # a dump's

        return describe_socket(fd.pid, fd.fd, fd.st.st_ino)
    if fd.link.startswith("anon_inode:"):
        name = fd.link[len("anon_inode:"):]
        if name.startswith("kvm-vcpu:"):
            return "a KVM virtual CPU"
        if name == "[userfaultfd]" and _wp_async(fd):
            return ("a userfaultfd with asynchronous write-protection (the dirty tracking procsnap pre-dump "
                    "leaves: dump with --prev-images-dir naming the last pre-dump, or pre-dump --untrack)")
        return ANON_INODES.get(name, f"an anonymous inode {name}")
    if fd.link.startswith(NAMESPACE_LINKS):
        return f"a {fd.link.split(':', 1)[0]} namespace fd"
    if ":" in fd.link and not fd.link.startswith("/"):
        return article(fd.link.split(":", 1)[0])
    return article(stat.filemode(fd.st.st_mode))


def _wp_async(fd: OpenFd) -> bool:
    from ..kernel.uffdwp import UffdFeature, uffd_features

    try:
        return bool(uffd_features(fd.pid, fd.fd) & UffdFeature.WP_ASYNC)
    except OSError:
        return False


def vma_name(path: str) -> str | None:
    """What a mapping named `path` in maps is, if it is one VMA_NAMES knows."""
    return next((what for prefix, what in VMA_NAMES.items() if path.startswith(prefix)), None)

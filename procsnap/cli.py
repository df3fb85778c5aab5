"""The command line, in CRIU's verbs and flags; each subcommand calls one
library function and turns errors into one line and an exit code."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .errors import ProcsnapError, RestoreError, plural


def _progress(label: str):
    """progress(phase, done, total) as one line per phase on a terminal
    (phases of 64 MiB or more); silence otherwise."""
    if not sys.stderr.isatty():
        return None
    state = {"line": ""}

    def report(phase: str, done: int, total: int) -> None:
        if total < (64 << 20):
            return
        line = f"{label}: {phase}: {done * 100 // total:3d}% ({done >> 20}/{total >> 20} MiB)"
        if line != state["line"]:
            state["line"] = line
            sys.stderr.write(f"\r{line}" + ("\n" if done >= total else ""))
            sys.stderr.flush()

    return report


def _key(args) -> bytes | None:
    """--encrypt KEYFILE: its key (image/sealing.py says the format)."""
    if not getattr(args, "encrypt", None):
        return None
    from .image.sealing import read_key_file

    return read_key_file(args.encrypt)


def _tls(args):
    """--tls-cert/--tls-key/--tls-ca: TLS on the stream (image/stream.py,
    imported only then: it brings ssl, socket, logging and json)."""
    given = [getattr(args, n, None) for n in ("tls_cert", "tls_key", "tls_ca")]
    if not any(given):
        return None
    from .image.stream import Tls

    return Tls(*given)


def _stream_location(args, parser_error):
    """dump/restore take -D DIR or --stream URL (restore: both, -D keeping the received image)."""
    if args.stream is None and args.images_dir is None:
        parser_error(f"{args.command}: give -D DIR or --stream URL")
    if args.command == "dump" and args.stream is not None and args.images_dir is not None:
        parser_error("dump: give -D DIR or --stream URL, not both")
    if _tls(args) is not None and (args.stream is None or args.stream == "-"):
        parser_error(f"{args.command}: --tls-* go with --stream tcp://HOST:PORT")
    if args.stream not in (None, "-"):
        from .image.stream import StreamError, address

        try:
            address(args.stream)
        except StreamError as err:
            parser_error(f"{args.command}: --stream {err}")


def _migrate_location(args, parser_error):
    from .image.stream import StreamError, address

    try:
        address(args.to)
    except StreamError as err:
        parser_error(f"migrate: --to {err}")
    if args.max_rounds < 0:
        parser_error(f"migrate: --max-rounds {args.max_rounds}: expected 0 or more")
    if not args.to.startswith("tcp://"):
        args.to = f"tcp://{args.to}"


def _listening(url: str):
    """on_listen for a receiving side: where it listens, for a port 0 caller."""
    def report(bound) -> None:
        print(f"procsnap: listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)

    return None if url == "-" else report


def _external(args) -> dict:
    from . import externals

    return externals.parse(args.external)


def cmd_dump(args) -> int:
    from . import dump

    stats = dump(args.tree, args.stream or args.images_dir, leave_running=args.leave_running,
                 shell_job=args.shell_job, progress=_progress("dump"), ext_unix_sk=args.ext_unix_sk,
                 compress=args.compress, key=_key(args), prev_images_dir=args.prev_images_dir, tls=_tls(args),
                 tcp_established=args.tcp_established, tcp_close=args.tcp_close,
                 net_lock="skip" if args.skip_net_lock else args.network_lock or "", external=_external(args))
    if stats.replaced:
        print(f"procsnap: {args.images_dir}: replaced {stats.replaced}", file=sys.stderr)
    return 0


def cmd_pre_dump(args) -> int:
    from .dumper import predump

    if args.untrack:
        fd = predump.untrack_image(args.tree, args.images_dir, _key(args))
        print(f"pid {args.tree}: " + (f"dirty tracking (uffd fd {fd}) taken down" if fd >= 0 else "not tracked"))
        return 0
    stats = predump.pre_dump(args.tree, args.images_dir, prev_images_dir=args.prev_images_dir,
                             method=args.dirty_tracking, shell_job=args.shell_job, key=_key(args),
                             compress=args.compress)
    print(f"pre-dump pass {stats.passes} of pid {args.tree} ({stats.method}): {plural(stats.copied, 'page')} "
          f"copied, {plural(stats.referred, 'page')} referred to, frozen {stats.frozen_s * 1000:.1f} ms")
    return 0


def cmd_restore(args) -> int:
    from . import restore

    options = dict(detach=args.restore_detached, shell_job=args.shell_job, progress=_progress("restore"),
                   allow_other_owner=args.allow_other_owner, allow_setuid=args.allow_setuid,
                   ext_unix_sk=args.ext_unix_sk, key=_key(args),
                   tcp_established=args.tcp_established, tcp_close=args.tcp_close, skip_net_lock=args.skip_net_lock,
                   external=_external(args), root=args.root,
                   inherit_fd=_inherit_fd(args))
    if args.copies != 1 and args.stream is not None:
        raise RestoreError("--copies: not with --stream (receive the image with -D DIR, then restore copies of DIR)")
    if args.lazy_pages:
        options.update(lazy_pages=True, lazy_log=args.lazy_pages_log, lazy_server=lambda server: print(
            f"procsnap: lazy pages served by pid {server}", file=sys.stderr, flush=True))
    if args.stream is not None:
        from .streaming import restore_stream

        pid = restore_stream(args.stream, args.images_dir, _tls(args), _listening(args.stream), **options)
    elif args.copies != 1:
        return _restore_copies(args, options)
    else:
        pid = restore(args.images_dir, **options)
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{pid}\n")
    if args.restore_detached:
        print(pid)
        return 0
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _restore_copies(args, options) -> int:
    """--copies N: every root's pid printed (and in --pidfile), one a line; without -d, waits for all of
    them and exits with the first non-zero status."""
    from . import restore_copies

    pids = restore_copies(args.images_dir, args.copies, **options)
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write("".join(f"{pid}\n" for pid in pids))
    print("\n".join(map(str, pids)), flush=True)
    if args.restore_detached:
        return 0
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    return next((c for c in codes if c), 0)


def _inherit_fd(args) -> dict[str, int] | None:
    from . import inheritfd

    return inheritfd.parse(args.inherit_fd) or None


def cmd_migrate(args) -> int:
    from .migration import migrate

    def round_done(k, r) -> None:
        print(f"pre-copy round {k}: {plural(r.copied, 'page')} copied, {plural(r.referred, 'page')} referred to, "
              f"frozen {r.frozen_s * 1000:.1f} ms, {r.seconds:.2f} s", flush=True)

    stats = migrate(args.tree, args.to, max_rounds=args.max_rounds, tls=_tls(args), shell_job=args.shell_job,
                    dirty_tracking=args.dirty_tracking, tcp_established=args.tcp_established,
                    net_lock="skip" if args.skip_net_lock else args.network_lock or "", on_round=round_done)
    print(f"pid {args.tree} migrated to {args.to} (pid {stats.pid} there): downtime {stats.downtime_s * 1000:.1f} ms "
          f"(frozen here {stats.frozen_s * 1000:.1f} ms, final image {stats.final_bytes >> 20} MiB of pages), "
          f"{plural(len(stats.rounds), 'pre-copy round')}, {stats.total_s:.2f} s in all")
    if stats.net_lock:
        print(f"the source's network lock {stats.net_lock} kept: remove it once the addresses have moved "
              f"(nft delete table {stats.net_lock})" if stats.net_lock.startswith("inet ") else
              f"the source's network lock (iptables rules with the comment {stats.net_lock}) kept: remove them once "
              f"the addresses have moved")
    return 0


def cmd_receive(args) -> int:
    from .streaming import receive

    url = args.listen or args.stream
    got = receive(url, args.images_dir, _tls(args), _key(args), _listening(url))
    print(f"{args.images_dir}: received {got.bytes >> 20} MiB in {got.seconds:.2f} s from {url}"
          + ("; the sender did not say what became of the source" if got.source is None
             else "; the sender failed after it (the source runs on)" if got.source == "aborted"
             else f"; the source was {got.source}"))
    return 0


def cmd_show(args) -> int:
    from . import views

    root, tree = views.load(args.images_dir, _key(args))
    if args.view:
        table = views.view(args.view, tree)
        sys.stdout.write(views.json_lines(table) if args.json else views.render(table))
    elif args.json:
        import json

        json.dump(views.full_json(root, tree), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(views.summary(root, tree))
    return 0


def cmd_diff(args) -> int:
    from . import imagediff

    d = imagediff.diff(args.first, args.second, _key(args))
    if args.json:
        import json

        json.dump(d, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(imagediff.render(d))
    return 0


def cmd_core(args) -> int:
    from .coredump import write_core

    stats = write_core(args.images_dir, args.output, pid=args.pid, key=_key(args))
    print(f"{stats.path}: core of pid {stats.pid}, {plural(stats.threads, 'thread')}, "
          f"{plural(stats.segments, 'segment')}, {stats.memory_bytes >> 10} KiB of memory")
    for change in stats.changed_files:
        print(f"procsnap: warning: {change}; gdb reads the pages the image does not hold from it", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    from . import verify

    problems = verify(args.images_dir, allow_other_owner=args.allow_other_owner, allow_setuid=args.allow_setuid,
                      key=_key(args))
    for p in problems:
        print(f"problem: {p}")
    if problems:
        print(f"procsnap: error: {args.images_dir}: {plural(len(problems), 'problem')}, it cannot be restored: "
              + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"{args.images_dir}: image is valid and restorable here")
    return 0


def cmd_gc(args) -> int:
    from .image.series import gc

    removed = gc(args.directory, args.keep, _key(args))
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"{args.directory}: every image is kept or referred to")
    return 0


def cmd_check(args) -> int:
    from . import check

    if args.images_dir:
        return cmd_verify(args)
    if args.feature:
        return _check_feature(args.feature)
    results = check.check()
    missing = [r for r in results if not r.ok]
    for r in results:
        print(f"{'ok     ' if r.ok else 'MISSING'}  {r.name}: {r.detail}")
    if missing:
        print(f"procsnap: {plural(len(missing), 'required kernel feature')} missing", file=sys.stderr)
        return 1
    print("Looks good.")
    return 0


def _check_feature(name: str) -> int:
    """check --feature NAME: 0 if this kernel allows it, 1 with its reason if not; `list`: the names."""
    from . import features

    if name == "list":
        print("\n".join(features.names()))
        return 0
    try:
        found = features.check_feature(name)
    except OSError as err:
        print(f"procsnap: {name}: not available: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"{name}: {found}")
    return 0


class _Formatter(argparse.HelpFormatter):
    """The terminal's width as shutil.get_terminal_size finds it, without
    importing shutil (with bz2, lzma, fnmatch) on every run: argparse
    makes a formatter for each add_argument."""

    def __init__(self, prog, **kwargs):
        if kwargs.get("width") is None:
            try:
                columns = int(os.environ.get("COLUMNS", 0)) or os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 80
            kwargs["width"] = columns - 2
        super().__init__(prog, **kwargs)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, formatter_class=_Formatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


class _OneVerb:
    """The subparsers of build_parser(verb): only `verb`'s parser is made;
    each other verb's add_parser gets an _Unbuilt, which takes its
    arguments and keeps nothing (argparse makes a formatter and asks
    gettext on every add_argument: every verb's parser cost a run more
    than its dump's own work)."""

    def __init__(self, sub, verb: str):
        self.sub, self.verb, self.built = sub, verb, False

    def add_parser(self, name: str, **kwargs):
        if name != self.verb:
            return _Unbuilt()
        self.built = True
        return self.sub.add_parser(name, **kwargs)


class _Unbuilt:
    def add_argument(self, *args, **kwargs) -> None:
        pass

    def set_defaults(self, **kwargs) -> None:
        pass

    def add_mutually_exclusive_group(self, **kwargs) -> _Unbuilt:
        return self

    add_argument_group = add_mutually_exclusive_group


def _named_verb(argv: list[str]) -> str | None:
    """The verb argv names after the global -v/--verbose, else None."""
    for arg in argv:
        if len(arg) > 2 and "--verbose".startswith(arg) or len(arg) > 1 and arg == "-" + "v" * (len(arg) - 1):
            continue
        return None if arg.startswith("-") else arg
    return None


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `verb`, only that verb's parser (the
    whole one when no verb has that name)."""
    p = _Parser(prog="procsnap", description="Checkpoint and restore live Linux processes.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log each stage to stderr")
    sub = p.add_subparsers(dest="command", required=True)
    if verb is not None:
        sub = _OneVerb(sub, verb)

    d = sub.add_parser("dump", help="checkpoint a process into an image directory")
    d.add_argument("-t", "--tree", type=int, required=True, metavar="PID", help="the process to dump")
    d.add_argument("-D", "--images-dir", metavar="DIR")
    d.add_argument("--stream", metavar="URL", help="send the image to `-` (stdout) or tcp://HOST:PORT "
                   "(a procsnap receive or restore --stream listening there) instead of writing DIR")
    d.add_argument("-R", "--leave-running", action="store_true", help="let the process run on after the dump")
    d.add_argument("-j", "--shell-job", action="store_true", help="allow fds on the controlling terminal")
    d.add_argument("--ext-unix-sk", action="store_true",
                   help="allow unix datagram sockets connected to a named socket outside the tree")
    d.add_argument("--external", action="append", metavar="KIND[KEY]:VALUE",
                   help="what the container shares with the host: mnt[MOUNTPOINT]:NAME, veth[IF]:OUTSIDE")
    d.add_argument("--compress", action="store_true", help="store pages in zstd chunks (procsnap[compress])")
    d.add_argument("--prev-images-dir", metavar="DIR", help="store only the pages not in this image "
                   "(relative to -D, as CRIU's)")
    d.add_argument("--tcp-established", action="store_true", help="dump live TCP connections (TCP_REPAIR)")
    d.add_argument("--tcp-close", action="store_true", help="dump live TCP connections to be restored closed")
    d.add_argument("--skip-net-lock", action="store_true", help="do not lock the network (the caller does)")
    d.add_argument("--network-lock", choices=("nftables", "iptables", "skip"),
                   help="how live TCP connections are locked (default: nftables where nft is found)")
    d.set_defaults(func=cmd_dump)

    pd = sub.add_parser("pre-dump", help="copy a process's memory while it runs, for a later dump "
                        "--prev-images-dir DIR (only the pages written since are copied then)")
    pd.add_argument("-t", "--tree", type=int, required=True, metavar="PID", help="the process to pre-dump")
    pd.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    pd.add_argument("--prev-images-dir", metavar="DIR", help="the previous pass (relative to -D)")
    pd.add_argument("--dirty-tracking", choices=("auto", "uffd-wp", "hashes"), default="auto",
                    help="how the pages written since a pass are found (procsnap check says which this kernel has)")
    pd.add_argument("-j", "--shell-job", action="store_true", help="allow fds on the controlling terminal")
    pd.add_argument("--compress", action="store_true", help="store pages in zstd chunks (procsnap[compress])")
    pd.add_argument("--untrack", action="store_true", help="only take down the dirty tracking the pre-dump "
                    "in DIR left in the process")
    pd.set_defaults(func=cmd_pre_dump)

    r = sub.add_parser("restore", help="restore a process from an image directory")
    r.add_argument("-D", "--images-dir", metavar="DIR", help="with --stream: receive into DIR and keep it")
    r.add_argument("--stream", metavar="URL", help="restore from a stream: `-` (stdin) or tcp://HOST:PORT "
                   "(listen there); held in -D DIR or a temporary directory until restored")
    r.add_argument("-d", "--restore-detached", action="store_true", help="return once it runs; print its pid")
    r.add_argument("--pidfile", metavar="FILE", help="write the restored pid here")
    r.add_argument("--copies", type=int, default=1, metavar="N",
                   help="N independent copies of a container's image, each in new namespaces; prints their pids")
    r.add_argument("-j", "--shell-job", action="store_true", help="attach terminal fds to this terminal")
    r.add_argument("--inherit-fd", action="append", metavar="fd[N]:RESOURCE",
                   help="use our fd N for what the tree held as RESOURCE (pipe:[INO] or a file's path, as "
                   "`procsnap show DIR` lists them), as CRIU's")
    r.add_argument("--ext-unix-sk", action="store_true",
                   help="connect unix sockets dumped with --ext-unix-sk to their outside peer again")
    r.add_argument("--external", action="append", metavar="KIND[KEY]:VALUE",
                   help="what the container shares with the host: mnt[NAME]:PATH, veth[IF]:OUTSIDE")
    r.add_argument("--root", metavar="DIR", help="the container's root file system (it had pivoted into it)")
    r.add_argument("--tcp-established", action="store_true", help="restore live TCP connections")
    r.add_argument("--tcp-close", action="store_true", help="restore live TCP connections closed")
    r.add_argument("--skip-net-lock", action="store_true", help="leave the dump's network lock alone (the caller's)")
    r.add_argument("--lazy-pages", action="store_true", help="run before the private anonymous memory is in: "
                   "a lazy-pages server (it outlives the restore) copies each page in when first touched and "
                   "pushes the rest")
    r.add_argument("--lazy-pages-log", metavar="FILE", help="with --lazy-pages: where the server says what it did")
    r.set_defaults(func=cmd_restore)

    m = sub.add_parser("migrate", help="move a running process to another host, where `procsnap restore --stream "
                       "tcp://HOST:PORT` listens: pre-copy rounds, then the final freeze and stream")
    m.add_argument("-t", "--tree", type=int, required=True, metavar="PID", help="the process to migrate")
    m.add_argument("--to", required=True, metavar="HOST:PORT", help="the destination's restore --stream listener")
    m.add_argument("--max-rounds", type=int, default=8, metavar="N",
                   help="pre-copy rounds at most (default 8; 0: none, the whole memory copied while frozen)")
    m.add_argument("--dirty-tracking", choices=("auto", "uffd-wp", "hashes"), default="auto",
                   help="how the pre-copy rounds find the pages written since the one before")
    m.add_argument("-j", "--shell-job", action="store_true", help="allow fds on the controlling terminal")
    m.add_argument("--tcp-established", action="store_true", help="carry live TCP connections (the destination "
                   "restores with --tcp-established; their addresses must exist there)")
    m.add_argument("--skip-net-lock", action="store_true", help="do not lock the network (the caller does)")
    m.add_argument("--network-lock", choices=("nftables", "iptables", "skip"),
                   help="how live TCP connections are locked (default: nftables where nft is found)")
    m.set_defaults(func=cmd_migrate)

    rc = []
    for name, what in (("receive", "write a streamed image (dump --stream) into DIR"),
                       ("page-server", "the same as receive (CRIU's name)")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("-D", "--images-dir", required=True, metavar="DIR")
        where = sp.add_mutually_exclusive_group(required=True)
        where.add_argument("--listen", metavar="HOST:PORT", help="accept one connection there (port 0: any)")
        where.add_argument("--stream", metavar="URL", help="`-`: read the stream from stdin")
        sp.set_defaults(func=cmd_receive)
        rc.append(sp)
    for sp in [d, r, m] + rc:
        sp.add_argument("--tls-cert", metavar="PEM", help="TLS: this side's certificate (the listener's is needed)")
        sp.add_argument("--tls-key", metavar="PEM", help="TLS: its private key")
        sp.add_argument("--tls-ca", metavar="PEM", help="TLS: the CA that signs the other side's certificate "
                        "(on the listener: require one, mutual authentication)")

    v = sub.add_parser("verify", help="check an image without restoring it; list every problem")
    v.set_defaults(func=cmd_verify)

    s = sub.add_parser("show", help="what an image holds: a summary, a view (ps fds mems rss sockets files), JSON")
    s.set_defaults(func=cmd_show)
    co = sub.add_parser("core", help="write an ELF core file of a process of an image, for gdb")
    co.add_argument("-o", "--output", required=True, metavar="FILE", help="the core file to write")
    co.add_argument("--pid", type=int, metavar="PID", help="which process of the tree (default: the root)")
    co.set_defaults(func=cmd_core)

    for sp in (v, s, co):  # DIR as the other verbs take it (-D) or positionally
        sp.add_argument("images_dir", metavar="DIR", nargs="?")
        sp.add_argument("-D", "--images-dir", dest="images_dir_opt", metavar="DIR", help=argparse.SUPPRESS)
    s.add_argument("view", metavar="VIEW", nargs="?", help="ps, fds, mems, rss, sockets or files")
    s.add_argument("--json", action="store_true", help="every record as JSON; with VIEW, its rows as JSON lines")

    df = sub.add_parser("diff", help="what changed between two images: processes, threads, VMAs, fds, "
                                     "registers, pages (by content)")
    df.add_argument("first", metavar="DIR1")
    df.add_argument("second", metavar="DIR2")
    df.add_argument("--json", action="store_true", help="the differences as JSON")
    df.set_defaults(func=cmd_diff)

    g = sub.add_parser("gc", help="remove the images in DIR that no kept image refers to (a series)")
    g.add_argument("directory", metavar="DIR")
    g.add_argument("--keep", action="append", metavar="NAME", help="an image of DIR to keep (default: the newest)")
    g.set_defaults(func=cmd_gc)

    c = sub.add_parser("check", help="probe the kernel features procsnap needs; -D also validates an image")
    c.add_argument("-D", "--images-dir", metavar="DIR")
    c.add_argument("--feature", metavar="NAME", help="whether this kernel allows one feature (exit 0, else 1 and "
                   "why), by CRIU's name where it has one; `--feature list` names them")
    c.set_defaults(func=cmd_check)
    for sp in (r, v, c):
        sp.add_argument("--allow-other-owner", action="store_true",
                        help="root: restore an image of another user's process (it runs as root)")
        sp.add_argument("--allow-setuid", action="store_true", help="allow a set-uid/set-gid executable")
    for sp in (d, r, s, c, v, g, df, co, pd, *rc):
        sp.add_argument("--encrypt", metavar="KEYFILE", help="encrypt (dump) or open (others) the image with "
                        "the 32-byte key in KEYFILE (procsnap[encrypt])")
    for sp in (d, r, s, c, v, g, df, co, pd, m, *rc):
        sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if verb is not None and not sub.built:
        return build_parser()
    return p


def _views() -> list[str]:
    from .views import VIEWS

    return list(VIEWS)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = build_parser(_named_verb(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(argv)
    if args.command == "show" and len(extra) == 1 and args.view is None and not extra[0].startswith("-"):
        args.view, extra = extra[0], []  # show DIR --encrypt KEY VIEW: argparse gave VIEW nothing
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "show" and args.view is None and args.images_dir_opt and args.images_dir:
        args.view, args.images_dir = args.images_dir, None  # show -D DIR VIEW
    if args.command == "show" and args.view is not None and args.view not in _views():
        parser.error(f"show: unknown view {args.view!r}; the views are {', '.join(_views())}")
    if hasattr(args, "images_dir_opt"):
        given = {d for d in (args.images_dir, args.images_dir_opt) if d is not None}
        if len(given) != 1:
            parser.error(f"{args.command}: give the image directory once, as DIR or -D DIR")
        args.images_dir = given.pop()
    if args.command in ("dump", "restore"):
        _stream_location(args, parser.error)
    if args.command == "migrate":
        _migrate_location(args, parser.error)
    # SIGTERM and SIGHUP unwind like Ctrl-C: a dump in progress puts the
    # target back as it was before procsnap exits.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    from . import log  # not the logging module: it costs as much as argparse to import (log.py)

    log.configure(log.INFO if args.verbose else log.WARNING)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader gone away shows here, not at exit
        return code
    except BrokenPipeError:
        # `procsnap show DIR | head`: stop quietly, as cat does (status as if killed by SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ProcsnapError as err:
        print(f"procsnap: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("procsnap: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if args.verbose:
            raise
        print(f"procsnap: error: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""),
              file=sys.stderr)
        return 1
    except Exception as err:  # a bug: still one line, the traceback with -v
        if args.verbose:
            raise
        print(f"procsnap: internal error: {type(err).__name__}: {err} (run with -v for the traceback)",
              file=sys.stderr)
        return 70

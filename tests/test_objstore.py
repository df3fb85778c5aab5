"""Images in object storage (-D s3://BUCKET/PREFIX), against a real S3
server on loopback: s3rver (an S3 HTTP server with a filesystem store,
installed from npm by the Makefile), started and stopped by the fixture.
boto3 is configured the standard way, through the environment."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import procsnap
from conftest import (CASES_BY_ID, REPO, assert_cli_error, assert_pass, assert_running_untraced, assert_same_snapshot, cli,
                      descendants, dump_kill_to, proc_snapshot, reap_gone, restore, wait_until)
from procsnap.image import objstore

S3RVER = Path(REPO) / ".venv" / "s3rver" / "node_modules" / ".bin" / "s3rver"
BUCKET = "procsnap-test"
KEY = bytes(range(32))


class S3Server:
    """s3rver on 127.0.0.1 with its data in `data`; stop() kills it, start() brings it back on the same port."""

    def __init__(self, data: Path, log: Path):
        self.data, self.log, self.port, self.proc = data, log, 0, None

    def start(self) -> None:
        self.data.mkdir(exist_ok=True)
        out = open(self.log, "w")
        self.proc = subprocess.Popen([str(S3RVER), "-d", str(self.data), "-a", "127.0.0.1", "-p", str(self.port),
                                      "--configure-bucket", BUCKET], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: "listening on" in self.log.read_text() or self.proc.poll() is not None,
                   "s3rver to listen", timeout=30)
        text = self.log.read_text()
        assert "listening on" in text, f"s3rver did not start: {text}"
        self.port = int(text.split("listening on ")[1].split(":")[1].split()[0])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        self.proc = None


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """The server running, and this process's (and the CLI's) boto3 pointed at it."""
    if not S3RVER.exists():
        pytest.fail(f"{S3RVER} missing: `make test` installs it", pytrace=False)
    server = S3Server(tmp_path / "s3data", tmp_path / "s3rver.log")
    server.start()
    config = tmp_path / "aws-config"
    config.write_text("[default]\ns3 =\n    addressing_style = path\n")
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}", "AWS_ACCESS_KEY_ID": "S3RVER",
           "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(config)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    objstore.client.cache_clear()
    server.env = env
    try:
        yield server
    finally:
        server.stop()
        objstore.client.cache_clear()


_dump = dump_kill_to  # the tree's state is taken for restore() to compare


def _objects(prefix):
    client = objstore.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


@pytest.mark.parametrize("case_id", ["memory", "tree-prefork", "ghosts"])
@pytest.mark.parametrize("encoding", ["plain", "both"])
def test_s3_round_trip(procs, s3, case_id, encoding):
    options = {"compress": True, "key": KEY} if encoding == "both" else {}
    t = procs.start_case(CASES_BY_ID[case_id], "pie")
    url = f"s3://{BUCKET}/{case_id}/{encoding}"
    _dump(t, url, **options)
    objects = _objects(f"{case_id}/{encoding}/")
    current = objstore.read(f"{url}/CURRENT").decode().strip()
    assert f"{case_id}/{encoding}/CURRENT" in objects
    assert all(k.startswith(f"{case_id}/{encoding}/{current}/") or k.endswith("/CURRENT") for k in objects), objects
    pages = objects[f"{case_id}/{encoding}/{current}/pages.img"]
    if case_id == "memory" and encoding == "plain":  # more than one part: uploaded in parts as it was made
        assert pages["Size"] > objstore.PART_SIZE
    image = procsnap.open_image(url, key=options.get("key"))
    assert image.codec is not None and image.directory.endswith(current)
    assert procsnap.verify(url, key=options.get("key")) == []
    keyargs = []
    if "key" in options:
        keyfile = Path(procs.workdir) / "key"
        keyfile.write_bytes(KEY)
        keyargs = ["--encrypt", keyfile]
    r = cli("show", url, "--json", *keyargs, env=s3.env)
    assert r.returncode == 0 and '"pid"' in r.stdout, r.stderr
    restore(procs, t, url, key=options.get("key"))
    assert_pass(t)


def test_s3_server_killed_mid_dump(procs, s3, tmp_path):
    """The server dies while a dump uploads: the dump fails with one line,
    the process runs on, and the image already under the prefix is intact
    and restores once the server is back; the next dump removes what the
    failed one left."""
    url = f"s3://{BUCKET}/series"
    first = procs.start_case(CASES_BY_ID["memory"], "pie")
    _dump(first, url)
    old = objstore.read(f"{url}/CURRENT")
    before_keys = set(_objects("series/"))

    second = procs.start_case(CASES_BY_ID["threads"], "pie")  # not memory again: it would rewrite the first's files
    state = proc_snapshot(second.pid)
    env = {**s3.env, "PROCSNAP_FAULT": "mid-page-write:stop"}
    dump = subprocess.Popen([sys.executable, "-m", "procsnap", "dump", "-t", str(second.pid), "-D", url],
                            cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until(lambda: Path(f"/proc/{dump.pid}/stat").read_text().split(")")[1].split()[0] == "T",
                   "the dump to stop mid-way", timeout=60)
        s3.stop()
        os.kill(dump.pid, signal.SIGCONT)
        _, err = dump.communicate(timeout=120)
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait()
    r = subprocess.CompletedProcess(dump.args, dump.returncode, "", err)
    assert_cli_error(r, url.split("/")[2])
    assert_running_untraced(second.pid)
    assert_same_snapshot(state, proc_snapshot(second.pid))

    s3.start()
    objstore.client.cache_clear()
    assert objstore.read(f"{url}/CURRENT") == old
    assert set(_objects("series/")) >= before_keys
    assert procsnap.verify(url) == []
    restore(procs, first, url)
    assert_pass(first)
    # the next dump replaces the image and removes every other generation
    _dump(second, url, compress=True)
    gens = {k.split("/")[1] for k in _objects("series/") if not k.endswith("CURRENT")}
    assert gens == {objstore.read(f"{url}/CURRENT").decode().strip()}, gens
    restore(procs, second, url)
    assert_pass(second)


def test_s3_errors(procs, s3):
    """A prefix without an image, a bucket that does not exist, a server
    that is not there: one line each, non-zero, nothing made."""
    r = cli("restore", "-D", f"s3://{BUCKET}/nothing-here", env=s3.env)
    assert_cli_error(r, "nothing-here", "missing")
    r = cli("verify", f"s3://no-such-bucket/x", env=s3.env)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    t = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")
    r = cli("dump", "-t", t.pid, "-D", f"s3://no-such-bucket/x", env=s3.env)
    assert_cli_error(r, "no-such-bucket")
    assert_running_untraced(t.pid)
    r = cli("dump", "-t", t.pid, "-D", f"s3://{BUCKET}/a", "--prev-images-dir", "../../b", env=s3.env)
    assert_cli_error(r, "'../../b' leads out of the bucket")
    r = cli("dump", "-t", t.pid, "-D", f"s3://{BUCKET}/a", "--prev-images-dir", "/tmp", env=s3.env)
    assert_cli_error(r, "all in object storage or all local")
    r = cli("gc", f"s3://{BUCKET}/nothing-here", env=s3.env)
    assert_cli_error(r, "holds no images")
    assert_running_untraced(t.pid)
    s3.stop()
    r = cli("show", f"s3://{BUCKET}/x", env=s3.env)
    assert_cli_error(r, f"s3://{BUCKET}/x")


def _dump_cli(t, url, *args, env):
    """_dump through the command line."""
    others = descendants(t.pid)
    t.dumped = proc_snapshot(t.pid)
    r = cli("dump", "-t", t.pid, "-D", url, *args, env=env)
    assert r.returncode == 0, r.stderr
    assert t.reap() == -signal.SIGKILL
    reap_gone(others)


def _gens(prefix):
    return {k[len(prefix):].split("/")[0] for k in _objects(prefix) if k[len(prefix):].startswith("gen-")}


def _referred(url, key):
    """Pages the image refers to in its parents, and those it stores itself."""
    image = procsnap.open_image(url, key=key)
    referred = sum(n for refs in image.checkpoint.page_refs for _, n, src, _ in procsnap.image.schema.unpack_page_refs(refs)
                   if refs.sources[src].startswith("parent:"))
    return referred, sum(r.npages for r in image.checkpoint.pages)


def test_s3_series_compressed_encrypted(procs, s3):
    """A periodic checkpoint into one prefix: the second dump (CLI,
    --prev-images-dir . : the prefix's current image) stores what changed,
    compressed and encrypted, refers to the first generation, which stays
    beside it; the child restores whole. A dump without
    --prev-images-dir then removes both old generations."""
    url = f"s3://{BUCKET}/job"
    keyfile = Path(procs.workdir) / "key"
    keyfile.write_bytes(KEY)
    t = procs.start_case(CASES_BY_ID["memory"], "pie")
    r = cli("dump", "-t", t.pid, "-D", url, "-R", "--compress", "--encrypt", keyfile, env=s3.env)
    assert r.returncode == 0, r.stderr
    first = objstore.read(f"{url}/CURRENT").decode().strip()
    _dump_cli(t, url, "--prev-images-dir", ".", "--compress", "--encrypt", keyfile, env=s3.env)
    second = objstore.read(f"{url}/CURRENT").decode().strip()
    assert _gens("job/") == {first, second}
    image = procsnap.open_image(url, key=KEY)
    assert image.codec.compress == "zstd" and image.codec.cipher
    assert f"parent:../{first}" in image.checkpoint.page_refs[0].sources
    referred, stored = _referred(url, KEY)
    assert referred > 4 * stored, (referred, stored)
    assert procsnap.verify(url, key=KEY) == []
    r = cli("gc", url, env=s3.env)  # both generations are needed: nothing goes
    assert r.returncode == 0 and _gens("job/") == {first, second}, (r.stdout, r.stderr)
    restore(procs, t, url, key=KEY)
    assert_pass(t)

    other = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")
    _dump(other, url, compress=True, key=KEY)
    assert _gens("job/") == {objstore.read(f"{url}/CURRENT").decode().strip()}
    assert not [k for k in _objects("job/") if "/REFS/" in k]
    restore(procs, other, url, key=KEY)
    assert_pass(other)


def test_s3_series_across_prefixes_and_gc(procs, s3):
    """-D s3://B/s/2 --prev-images-dir ../1: 2 refers to the generation of 1
    it read; a new dump into 1 keeps that generation (2 needs it) and 2
    restores whole from it. gc --keep 2 removes nothing 2 needs; gc --keep
    1 removes image 2 and then the old generation of 1."""
    t = procs.start_case(CASES_BY_ID["memory"], "pie")
    procsnap.dump(t.pid, f"s3://{BUCKET}/s/1", leave_running=True)
    old = objstore.read(f"s3://{BUCKET}/s/1/CURRENT").decode().strip()
    _dump(t, f"s3://{BUCKET}/s/2", prev_images_dir="../1")
    assert f"parent:../../1/{old}" in procsnap.open_image(f"s3://{BUCKET}/s/2").checkpoint.page_refs[0].sources
    other = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")
    other_state = proc_snapshot(other.pid)
    procsnap.dump(other.pid, f"s3://{BUCKET}/s/1", leave_running=True)  # 1 moves on
    new = objstore.read(f"s3://{BUCKET}/s/1/CURRENT").decode().strip()
    assert _gens("s/1/") == {old, new}
    r = cli("gc", f"s3://{BUCKET}/s", "--keep", "2", env=s3.env)
    assert r.returncode == 0, r.stderr
    # image 1 (now the other process's) is not kept: it goes; the generation 2 refers to stays
    assert _gens("s/1/") == {old} and f"s/1/CURRENT" not in _objects("s/1/"), r.stdout
    assert set(r.stdout.split()) >= {f"s3://{BUCKET}/s/1/{new}", f"s3://{BUCKET}/s/1"}, r.stdout
    restore(procs, t, f"s3://{BUCKET}/s/2")
    assert_pass(t)
    assert_same_snapshot(other_state, proc_snapshot(other.pid))
    _dump(other, f"s3://{BUCKET}/s/3")
    r = cli("gc", f"s3://{BUCKET}/s", "--keep", "1", env=s3.env)
    assert_cli_error(r, "'1'", "2, 3")
    r = cli("gc", f"s3://{BUCKET}/s", env=s3.env)  # the newest, 3, is kept: 2 goes, and the generation it needed
    assert r.returncode == 0, r.stderr
    assert f"s3://{BUCKET}/s/2" in r.stdout.split(), r.stdout
    assert not _objects("s/2/") and not _objects("s/1/") and _gens("s/3/")
    restore(procs, other, f"s3://{BUCKET}/s/3")
    assert_pass(other)

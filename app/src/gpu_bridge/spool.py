"""The NFS spool protocol: how production and GPU workers exchange commands through files on a share.

Both sides import this module: the GPU-side worker (``nfs_worker.py``) and the production-side
transport (``client/nfs.py``). It also holds ``gpu-bridge nfs-init`` and ``gpu-bridge nfs-heartbeat``.

Why it looks like this
======================
The seed polled ``os.path.exists()`` for answer files and waited tens of seconds: an NFS client
caches attributes and directory lookups, *including negative ones*, so "this file does not exist" is
trusted until the parent directory's cached attributes expire (30-60 s with default options).
``sync``/``drop_caches`` do not help. What does:

* **The mount options first** (below): checked on real NFSv4.2, with default options even ``open()``
  trusts a cached "not found" for a name it looked up before (50 of 50 misses, like ``exists()``).
* **open(), never stat()/exists()**, to look for a file: under ``lookupcache=positive`` a name that
  was missing is looked up on the server again on each try (negative results are not cached), and
  close-to-open consistency then gives the complete file; ``stat`` may still answer from the
  attribute cache.
* **Listing a directory** (``os.scandir``) opens it, which revalidates its contents.
* **rename() is the only synchronisation primitive** (Maildir style). No ``flock``/``fcntl``: NFS
  locks need lockd/leases and fail in ways that are worse than not locking at all.

Mount options (both hosts, the small command export only)
---------------------------------------------------------
``COMMAND_MOUNT_OPTIONS = "vers=4.2,hard,lookupcache=positive,acdirmin=0,acdirmax=1,_netdev"``

* ``lookupcache=positive``: the client keeps only *positive* lookups ("name X is inode Y", still
  revalidated against the directory's attributes) and never caches "X does not exist". So the
  production side's repeated ``open(answer)`` is a real LOOKUP each time and succeeds the moment the
  worker's rename lands. (The default ``lookupcache=all`` is what made the seed wait: a cached
  negative entry lives until the directory's attribute cache expires.) ``lookupcache=none`` would also
  work; it costs a LOOKUP even for names already seen, which we do not need because our names are
  never reused.
* ``acdirmin=0,acdirmax=1``: the *directory attribute cache* is how long the client trusts a
  directory's cached mtime/change attribute before asking the server again; while trusted, cached
  listings and dentries of that directory are used without revalidation. Default 30-60 s; here at
  most 1 s, so anything that does rely on cached directory state (e.g. a positive dentry of a file
  that was renamed away) is corrected within a second. We do not use ``noac``: it also disables the
  *file* data/attribute cache and makes every write synchronous.
* ``hard``: on a server outage, I/O blocks and retries instead of failing. ``soft`` can return EIO
  after a write was half-applied (silent corruption), and it can make a retransmitted RENAME report
  an error although it happened (see ``publish``: we handle that case anyway).
* ``vers=4.2``: atomic rename, close-to-open, change attributes. ``_netdev``: mount after the network.
* Apply these to the command export only (not to bulk storage: ``acdirmax=1`` costs GETATTRs). If
  the same export is mounted twice on one host, the first mount's options win unless the second
  uses ``nosharecache``.
* The worker's unit has ``RequiresMountsFor=<root>``, and the worker refuses to run unless the root
  (or an ancestor other than ``/``) is a mount point and carries the sentinel file: it must never
  write into the empty local directory under an unmounted share.

Layout (under ``GPU_BRIDGE_NFS_ROOT``, default ``/mnt/shared``)
---------------------------------------------------------------
::

    .gpu-bridge-share                   sentinel {"format": 1, ...}; written by nfs-init
    gpu_commands/                       02770, nfs-init
      <host_id>/                        one tree per GPU worker, created by that worker at start
        tmp/  .<request id>.<rand>.tmp  producers' temp files (dot names: readers skip them)
        new/  <request id>.json         published commands (rename tmp -> new is the publish)
        cur/  <request id>.json         claimed by the worker (rename new -> cur); removed once answered
        bad/  <time ns>.<name>[.reason.json]  entries the worker refused (not a regular file, a symlink,
                                        a name that is not a request id, too large, too deep, not JSON)
    gpu_status/                         02770, nfs-init
      <host_id>/
        tmp/  .<...>.tmp                the worker's temp files
        answers/<request id>.json       exactly one answer per command
        jobs/<job id>.json              pull progress, replaced atomically (job id = the pull's request id)
        models.json                     installed models + Ollama reachability, refreshed every few seconds
        heartbeat.json                  {"counter": n, ...}, rewritten every heartbeat_interval

Why one directory tree per host rather than name prefixes in one shared inbox: a worker lists only
its own inbox (scan cost is its own backlog, not the fleet's), it can never claim another host's
command by a parsing mistake, one host's traffic does not invalidate the other hosts' cached
directory attributes, and a retired host is one ``rm -r``. ``tmp/`` sits next to ``new/`` under the
same root, hence on the same filesystem, so the publishing rename never crosses a mount. The host id
must be one safe path component (``HOST_ID_RE``); production uses ``GpuHost.name`` (port dropped).

Command (``gpu_commands/<host>/new/<id>.json``)::

    {"v": 1, "id": "<request id>", "op": "ping|list|pull|delete|job|cancel|health",
     "args": {"model": "..."} | {"job_id": "..."} | {}, "host": "<host id>",
     "created_at": <epoch s>, "deadline": <epoch s>, "sender": "<hostname>:<pid>"}

The deadline is absolute wall-clock time: production and GPU hosts must run NTP (any skew eats into
``command_timeout``). An expired command is answered with ``command_expired`` and not executed; the
worker checks the deadline when it claims the command and again when it starts it. A deadline that is
not finite or lies more than ``MAX_DEADLINE_AHEAD`` ahead is refused (``invalid_request``). A command
file must be a regular file named ``<request id>.json``, at most ``MAX_COMMAND_BYTES``, nesting at most
``MAX_JSON_DEPTH`` levels; the worker moves anything else to ``bad/`` (see ``quarantine``).

Answer (``gpu_status/<host>/answers/<id>.json``)::

    {"v": 1, "id": "<request id>", "op": "...", "host": "<host id>", "ok": true, "result": {...},
     "answered_at": <epoch s>, "worker": {"pid": ..., "boot": "...", "attempt": 1}}
    {"v": 1, ..., "ok": false, "error": {"error": "<message>", "code": "<errors.py code>", "status": 404,
     ...extra such as "job"}}

Status files (all replaced atomically by the worker)::

    heartbeat.json  {"v": 1, "host", "node", "pid", "boot": "<random per start>", "counter": n,
                     "interval": s, "state": "running"|"stopped", "pulls": {"running", "queued"},
                     "uptime_seconds", "version", "served", "started_at", "written_at", "poll_interval"}
    models.json     {"v": 1, "host", "boot", "counter": <heartbeat counter when written>,
                     "refresh_interval": s, "refreshed_at", "models": [<GET /api/models entries>],
                     "ollama": {"reachable", "version", "latency_ms", "error"?, "code"?},
                     "gpu": {<GET /api/health "gpu">}}
    jobs/<id>.json  {"v": 1, "host", "boot", "seq": n, "written_at", "job": {<Job object, "id" = request id>}}

Request ids are ``<time ns, 19 digits>-<pid>-<hostname>-<random hex>``: unique without coordination,
and they sort in creation order, which is the order the worker serves them in.

Liveness without comparing clocks: the worker rewrites ``heartbeat.json`` with a counter every
``heartbeat_interval`` (the interval is in the file). A reader that has watched the counter not move
for 3 intervals calls the worker down. A reader that has only just started has no history yet: it
takes the file's mtime (set by the NFS server) as a provisional hint, and otherwise waits for the
counter to move (see ``HeartbeatMonitor``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import secrets
import socket
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import errors
from .config import NfsSettings

COMMAND_MOUNT_OPTIONS = "vers=4.2,hard,lookupcache=positive,acdirmin=0,acdirmax=1,_netdev"

FORMAT_VERSION = 1
PROTOCOL_VERSION = 1
SENTINEL = ".gpu-bridge-share"
COMMANDS_DIR = "gpu_commands"
STATUS_DIR = "gpu_status"
DIR_MODE = 0o2770  # setgid: files inherit the share's group (same GID on every host)
FILE_MODE = 0o660  # before umask; the units run with UMask=0007
MAX_FILE_BYTES = 4 * 1024 * 1024  # a models.json with many models stays far below this
MAX_COMMAND_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32  # commands and progress files nest 3-4 levels; Python's own limit is ~1000 (RecursionError)
MAX_DEADLINE_AHEAD = 3600.0  # seconds: a command whose deadline is further ahead is refused (1e300, +1 year)
CLOCK_SKEW_WARN = 5.0  # seconds of disagreement between two clocks before the worker warns
QUARANTINE_DIR = "bad"
STALE_TEMP_SECONDS = 600.0  # temp files older than this are debris of a crashed writer
DEAD_AFTER_BEATS = 3  # heartbeat counter unchanged for this many intervals: the worker is down
CLOCK_SKEW_ALLOWANCE = 2.0  # seconds, only for the provisional mtime hint of a fresh reader
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
OPS = ("ping", "list", "pull", "delete", "job", "cancel", "health")

HOST_ID_RE = re.compile(r"^[A-Za-z0-9_:][A-Za-z0-9_.:-]{0,127}$")  # ":" first: IPv6 such as ::1
REQUEST_ID_RE = re.compile(r"^[0-9]{19}-[0-9]+-[A-Za-z0-9_.-]{1,64}-[0-9a-f]{12}$")
_HOST_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_HOSTNAME = _HOST_CHARS.sub("_", socket.gethostname())[:64] or "host"


# --- names ---------------------------------------------------------------------------------------
def new_request_id() -> str:
    """Unique across hosts and processes without coordination; sorts by creation time."""
    return f"{time.time_ns():019d}-{os.getpid()}-{_HOSTNAME}-{secrets.token_hex(6)}"


def valid_request_id(value: object) -> bool:
    return isinstance(value, str) and bool(REQUEST_ID_RE.match(value))


def check_host_id(host_id: str) -> str:
    if not isinstance(host_id, str) or not HOST_ID_RE.match(host_id) or host_id in (".", "..") \
            or ".." in host_id:
        raise errors.ConfigError(
            f"NFS host id {host_id!r} is not usable as a directory name on the share "
            "(letters, digits, and _ . : - only; set GPU_BRIDGE_NFS_HOST_ID)")
    return host_id


def _temp_name(hint: str = "") -> str:
    return f".{hint + '.' if hint else ''}{time.time_ns()}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


@dataclass(frozen=True)
class HostPaths:
    """Every path of one host's spool, derived from the share root and the host id."""

    root: str
    host_id: str

    def __post_init__(self):
        check_host_id(self.host_id)

    @property
    def sentinel(self) -> str:
        return os.path.join(self.root, SENTINEL)

    @property
    def commands(self) -> str:
        return os.path.join(self.root, COMMANDS_DIR, self.host_id)

    @property
    def cmd_tmp(self) -> str:
        return os.path.join(self.commands, "tmp")

    @property
    def cmd_new(self) -> str:
        return os.path.join(self.commands, "new")

    @property
    def cmd_cur(self) -> str:
        return os.path.join(self.commands, "cur")

    @property
    def cmd_bad(self) -> str:
        return os.path.join(self.commands, QUARANTINE_DIR)

    @property
    def status(self) -> str:
        return os.path.join(self.root, STATUS_DIR, self.host_id)

    @property
    def status_tmp(self) -> str:
        return os.path.join(self.status, "tmp")

    @property
    def answers(self) -> str:
        return os.path.join(self.status, "answers")

    @property
    def jobs(self) -> str:
        return os.path.join(self.status, "jobs")

    @property
    def models(self) -> str:
        return os.path.join(self.status, "models.json")

    @property
    def heartbeat(self) -> str:
        return os.path.join(self.status, "heartbeat.json")

    def new_path(self, request_id: str) -> str:
        return os.path.join(self.cmd_new, request_id + ".json")

    def cur_path(self, request_id: str) -> str:
        return os.path.join(self.cmd_cur, request_id + ".json")

    def answer_path(self, request_id: str) -> str:
        return os.path.join(self.answers, request_id + ".json")

    def job_path(self, job_id: str) -> str:
        return os.path.join(self.jobs, job_id + ".json")

    def worker_dirs(self) -> tuple[str, ...]:
        return (self.commands, self.cmd_tmp, self.cmd_new, self.cmd_cur, self.cmd_bad,
                self.status, self.status_tmp, self.answers, self.jobs)


# --- the file primitives -------------------------------------------------------------------------
def openable(path: str) -> bool:
    """Does ``path`` exist *now*? Asked with open(), which revalidates on NFS (stat() may not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    os.close(fd)
    return True


def publish(src: str, dst: str) -> None:
    """rename(src, dst): the atomic publish. A failed-looking rename that happened counts as done.

    Over NFS a RENAME whose reply was lost is retransmitted and the retry fails (the source is gone)
    although the first one succeeded: when the source is gone and the target exists, it succeeded.
    """
    try:
        os.rename(src, dst)
    except OSError:
        if not openable(src) and openable(dst):
            return
        _unlink_quiet(src)
        raise


def write_atomic(tmp_dir: str, path: str, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part.

    Temp file: dot name in ``tmp_dir`` (same filesystem as ``path``), ``O_CREAT|O_EXCL``, every
    write checked, ``fsync`` (NFS COMMIT), ``close`` (which reports NFS write-back errors), rename.
    """
    tmp = os.path.join(tmp_dir, _temp_name())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.EIO, f"short write to {tmp}")
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        try:
            os.close(fd)
        finally:
            _unlink_quiet(tmp)
        raise
    try:
        os.close(fd)
    except OSError:
        _unlink_quiet(tmp)
        raise
    publish(tmp, path)


def write_json(tmp_dir: str, path: str, doc: dict) -> None:
    write_atomic(tmp_dir, path, json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())


class UnsafeEntry(errors.ChannelError):
    """A spool name that is not a regular file (a symlink, directory, FIFO, device...): never read."""


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symbolic link"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """``"a regular file"``, ``"a FIFO"``, ...: for messages."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def read_bytes_stat(path: str, limit: int = MAX_FILE_BYTES, *,
                    nofollow: bool = False) -> tuple[bytes, os.stat_result] | None:
    """The file's bytes and its fstat, or None when it does not exist. Opens (never stats) the name.

    Opened with ``O_NONBLOCK`` (a FIFO cannot block the reader) and, with ``nofollow``, ``O_NOFOLLOW``
    (a symlink is refused, not followed); then ``fstat`` on the open descriptor must say regular file
    (UnsafeEntry otherwise) no larger than ``limit`` (ChannelError).
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if nofollow and exc.errno == errno.ELOOP:
            raise UnsafeEntry(f"{path!r} is a symbolic link: refused") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeEntry(f"{path!r} is {file_kind(st.st_mode)}, not a regular file: refused")
        if st.st_size > limit:
            raise errors.ChannelError(f"{path!r} is larger than {limit} bytes")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise errors.ChannelError(f"{path!r} is larger than {limit} bytes")
    return b"".join(chunks), st


def read_bytes(path: str, limit: int = MAX_FILE_BYTES, *, nofollow: bool = False) -> bytes | None:
    """The file's bytes, or None when it does not exist (see ``read_bytes_stat``)."""
    got = read_bytes_stat(path, limit, nofollow=nofollow)
    return None if got is None else got[0]


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def parse_json(data: bytes, name: str, *, max_depth: int | None = MAX_JSON_DEPTH) -> dict:
    """A JSON object from ``data`` (ChannelError when it is not one, nests deeper than ``max_depth``,
    or is too deep for Python's parser)."""
    if max_depth is not None and _max_nesting(data, max_depth) > max_depth:
        raise errors.ChannelError(f"{name} nests deeper than {max_depth} levels")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise errors.ChannelError(f"{name} nests too deep to parse") from None
    except (UnicodeDecodeError, ValueError):
        raise errors.ChannelError(f"{name} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise errors.ChannelError(f"{name} does not hold a JSON object")
    return doc


def _max_nesting(data: bytes, limit: int) -> int:
    depth = best = 0
    for byte in _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS):
        if byte in (0x5B, 0x7B):
            depth += 1
            best = max(best, depth)
            if best > limit:
                break
        else:
            depth -= 1
    return best


def read_json(path: str, limit: int = MAX_FILE_BYTES, *, nofollow: bool = False,
              max_depth: int | None = None) -> dict | None:
    """Parsed JSON object, or None when the file does not exist; ChannelError when it is not JSON
    (UnsafeEntry when the name is not a regular file)."""
    data = read_bytes(path, limit, nofollow=nofollow)
    if data is None:
        return None
    return parse_json(data, repr(path), max_depth=max_depth)


def read_json_with_mtime(path: str) -> tuple[dict, float] | None:
    """Like ``read_json`` plus the file's mtime, taken with fstat on the open file (fresh on NFS)."""
    got = read_bytes_stat(path, MAX_FILE_BYTES)
    if got is None:
        return None
    data, st = got
    return parse_json(data, repr(path), max_depth=None), st.st_mtime


def list_names(directory: str) -> list[str]:
    """Visible entries of ``directory``, sorted (= oldest request first). Dot names are skipped:
    temp files and NFS silly-renames (``.nfsXXXX``). ``os.scandir`` opens the directory, which
    revalidates it on NFS."""
    try:
        with os.scandir(directory) as it:
            return sorted(e.name for e in it if not e.name.startswith("."))
    except FileNotFoundError:
        return []


def claim(src: str, dst: str) -> bool:
    """Take ownership of a command by renaming it into ``cur/``. False: it was already gone.

    One worker serves one host id, so a retransmitted RENAME that reports ENOENT although it
    happened is recognised by the target now existing.
    """
    try:
        os.rename(src, dst)
        return True
    except FileNotFoundError:
        return openable(dst) and not openable(src)


_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def quarantine(paths: HostPaths, src: str, reason: str, *, now: float | None = None) -> str:
    """Move a refused inbox entry (any type: file, directory, FIFO, symlink) into ``bad/`` without
    opening or following it, next to ``<name>.reason.json`` saying why. Returns the new path.

    The new name is ``<time ns>.<name with unsafe characters replaced>``: unique, and printable
    whatever the original name held (the reason file keeps the original as written by ``repr``).
    OSError when the rename fails (e.g. permissions): the caller logs and leaves the entry.
    """
    original = os.path.basename(src)
    safe = _UNSAFE_NAME_CHARS.sub("_", original)[:100].lstrip(".") or "_"
    target = os.path.join(paths.cmd_bad, f"{time.time_ns():019d}.{safe}")
    try:
        os.rename(src, target)
    except OSError:
        if os.path.lexists(src) or not os.path.lexists(target):  # not a retransmitted rename that happened
            raise
    doc = {"v": PROTOCOL_VERSION, "name": repr(original), "from": os.path.basename(os.path.dirname(src)),
           "reason": reason, "quarantined_at": time.time() if now is None else now}
    try:
        write_json(paths.cmd_tmp, target + ".reason.json", doc)
    except OSError:
        pass  # the entry is out of the inbox; the log line says why
    return target


def _unlink_quiet(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return False


def unlink_quiet(path: str) -> bool:
    return _unlink_quiet(path)


def iter_old_entries(directory: str, older_than: float, *, dot_only: bool = False,
                     any_type: bool = False) -> Iterator[str]:
    """Paths in ``directory`` whose mtime is older than ``older_than`` seconds (housekeeping only:
    a slightly stale attribute merely delays a cleanup). Regular files only; with ``any_type``
    everything but directories (symlinks, FIFOs: quarantined entries)."""
    cutoff = time.time() - older_than
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if dot_only and not entry.name.startswith("."):
                    continue
                if entry.name.startswith(".nfs"):  # silly-renamed: the NFS client removes it itself
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                wanted = not stat.S_ISDIR(st.st_mode) if any_type else stat.S_ISREG(st.st_mode)
                if wanted and st.st_mtime < cutoff:
                    yield entry.path
    except FileNotFoundError:
        return


# --- the share -----------------------------------------------------------------------------------
def mount_point_of(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_share(root: str, *, require_mount: bool = True) -> dict:
    """Raise ShareNotReady unless ``root`` is a mounted, prepared share; returns the sentinel."""
    if not os.path.isdir(root):
        raise errors.ShareNotReady(f"NFS share root {root} does not exist or is not a directory "
                                   "(set GPU_BRIDGE_NFS_ROOT, mount the share)")
    if require_mount:
        mount = mount_point_of(root)
        if mount == "/":
            raise errors.ShareNotReady(
                f"NFS share {root} is not mounted (neither it nor a parent other than / is a mount point); "
                "refusing to write into the local directory: mount the share "
                "(or set GPU_BRIDGE_NFS_REQUIRE_MOUNT=false for tests)")
    sentinel = os.path.join(root, SENTINEL)
    try:
        doc = read_json(sentinel, 64 * 1024)
    except errors.ChannelError:
        raise errors.ShareNotReady(f"{sentinel} is corrupt: rerun `gpu-bridge nfs-init`") from None
    except OSError as exc:
        raise errors.ShareNotReady(f"cannot read {sentinel}: {exc.strerror}") from None
    if doc is None:
        raise errors.ShareNotReady(f"NFS share {root} is not prepared (no {SENTINEL}): run `gpu-bridge nfs-init` "
                                   "once, and check that the share is mounted")
    fmt = doc.get("format")
    if fmt != FORMAT_VERSION:
        raise errors.ShareNotReady(f"{sentinel} has format {fmt!r}; this gpu-bridge understands "
                                   f"format {FORMAT_VERSION}: upgrade gpu-bridge on every host")
    return doc


def _parse_owner(owner: str | None) -> tuple[int, int] | None:
    if owner is None:
        return None
    uid_text, sep, gid_text = owner.partition(":")
    try:
        uid = int(uid_text) if uid_text else -1
        gid = int(gid_text) if sep and gid_text else -1
    except ValueError:
        raise errors.ConfigError(f"--owner {owner!r}: expected numeric UID:GID (e.g. 990:990)") from None
    return uid, gid


def _ensure_dir(path: str, mode: int, owner: tuple[int, int] | None) -> bool:
    """mkdir + exact mode (+ owner); True when anything changed."""
    changed = False
    try:
        os.mkdir(path, mode)
        changed = True
    except FileExistsError:
        if not os.path.isdir(path):
            raise errors.ShareNotReady(f"{path} exists and is not a directory") from None
    st = os.stat(path)
    if owner is not None:
        uid, gid = owner
        if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
            os.chown(path, uid, gid)
            changed = True
            st = os.stat(path)
    if stat.S_IMODE(st.st_mode) != mode:  # mkdir's mode is filtered by the umask; chown clears setgid
        os.chmod(path, mode)
        changed = True
    return changed


def init_share(root: str, owner: str | None = None) -> bool:
    """Prepare ``root`` (which must exist: it is the mount point). True when anything changed."""
    uid_gid = _parse_owner(owner)
    if not os.path.isdir(root):
        raise errors.ShareNotReady(f"NFS share root {root} does not exist: mount the share first "
                                   "(or set GPU_BRIDGE_NFS_ROOT)")
    changed = False
    for name in (COMMANDS_DIR, STATUS_DIR):
        changed |= _ensure_dir(os.path.join(root, name), DIR_MODE, uid_gid)
    sentinel = os.path.join(root, SENTINEL)
    try:
        doc = read_json(sentinel, 64 * 1024)
    except errors.ChannelError:
        doc = None
    if doc is not None and doc.get("format") not in (None, FORMAT_VERSION):
        raise errors.ShareNotReady(f"{sentinel} has format {doc.get('format')!r}, newer than this "
                                   f"gpu-bridge's {FORMAT_VERSION}: upgrade gpu-bridge")
    if doc is None or doc.get("format") != FORMAT_VERSION:
        write_json(root, sentinel, {"format": FORMAT_VERSION, "created_at": time.time(),
                                    "created_by": socket.gethostname(),
                                    "layout": f"{COMMANDS_DIR}/<host>/{{tmp,new,cur}}, "
                                              f"{STATUS_DIR}/<host>/{{tmp,answers,jobs}}"})
        os.chmod(sentinel, 0o664)
        changed = True
    if uid_gid is not None:
        st = os.stat(sentinel)
        uid, gid = uid_gid
        if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
            os.chown(sentinel, uid, gid)
            changed = True
    return changed


def prepare_host(paths: HostPaths) -> None:
    """The worker's own directories (the share itself must already be prepared)."""
    for path in paths.worker_dirs():
        _ensure_dir(path, DIR_MODE, None)


# --- commands and answers ------------------------------------------------------------------------
def make_command(host_id: str, op: str, args: dict | None = None, *, timeout: float,
                 request_id: str | None = None, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    return {"v": PROTOCOL_VERSION, "id": request_id or new_request_id(), "op": op, "args": dict(args or {}),
            "host": host_id, "created_at": now, "deadline": now + timeout,
            "sender": f"{socket.gethostname()}:{os.getpid()}"}


def send_command(paths: HostPaths, command: dict) -> str:
    """Publish a command into the host's inbox; returns its request id.

    ShareNotReady when the host's inbox does not exist (no worker ever served that id here).
    """
    rid = command["id"]
    data = json.dumps(command, separators=(",", ":")).encode()
    try:
        write_atomic(paths.cmd_tmp, paths.new_path(rid), data)
    except FileNotFoundError:
        raise errors.ShareNotReady(
            f"{paths.commands} does not exist: no nfs-worker has served host id {paths.host_id!r} on "
            f"share {paths.root} (start gpu-nfs-worker.service there with GPU_BRIDGE_NFS_HOST_ID="
            f"{paths.host_id})") from None
    return rid


def withdraw(paths: HostPaths, request_id: str) -> bool:
    """Take back an unclaimed command. True: it is gone and will never run."""
    return _unlink_quiet(paths.new_path(request_id))


def read_answer(paths: HostPaths, request_id: str) -> dict | None:
    """The answer if it exists, else None. One open() per call: a fresh LOOKUP on NFS."""
    return read_json(paths.answer_path(request_id))


def wait_answer(paths: HostPaths, request_id: str, deadline: float, *, poll_interval: float = 0.05,
                on_poll=None) -> dict | None:
    """Poll open() of the answer until it exists or ``deadline`` (monotonic) passes.

    The first tries come quickly (5 ms, doubling) and settle at ``poll_interval``. ``on_poll()`` is
    called between tries; it may raise to abort.
    """
    delay = min(0.005, poll_interval)
    while True:
        answer = read_answer(paths, request_id)
        if answer is not None:
            return answer
        now = time.monotonic()
        if now >= deadline:
            return None
        if on_poll is not None:
            on_poll()
        time.sleep(max(0.0, min(delay, deadline - now)))
        delay = min(delay * 2, poll_interval)


def make_answer(command: dict, host_id: str, *, result: dict | None = None, error: dict | None = None,
                worker: dict | None = None) -> dict:
    doc = {"v": PROTOCOL_VERSION, "id": command.get("id"), "op": command.get("op"), "host": host_id,
           "ok": error is None, "answered_at": time.time(), "worker": dict(worker or {})}
    if error is None:
        doc["result"] = result if result is not None else {}
    else:
        doc["error"] = error
    return doc


def error_to_dict(exc: errors.GpuBridgeError) -> dict:
    body = exc.to_dict()
    body.pop("host", None)
    body["status"] = exc.status
    if isinstance(exc, errors.RateLimited):
        body["retry_after"] = exc.retry_after
    return body


# --- liveness ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Liveness:
    alive: bool | None  # None: not known yet (a fresh reader with no history and no usable hint)
    age: float | None  # seconds since the counter was last seen to change (or the mtime hint)
    counter: int | None
    doc: dict | None
    reason: str = ""

    def describe(self) -> str:
        if self.doc is None:
            return "it has no heartbeat file (the worker never ran here, or the share is not mounted)"
        if self.doc.get("state") == "stopped":
            return "its worker stopped cleanly (heartbeat says stopped)"
        age = f"{self.age:.0f} s ago" if self.age is not None else "at an unknown time"
        if self.alive:
            return f"its worker heartbeat is alive (last change {age})"
        return f"its worker heartbeat is stale (last change {age})"


class HeartbeatMonitor:
    """Judges a worker alive or down from its heartbeat counter, measured on the reader's own clock.

    Alive: the counter (with the worker's boot id) was seen to change less than 3 intervals ago.
    Down: it has been watched for 3 intervals without a change, or the worker wrote ``stopped``.
    A reader without history uses the heartbeat's mtime (the NFS server's clock) as a provisional
    hint, allowing ``CLOCK_SKEW_ALLOWANCE``; when the hint does not say "fresh", the answer is
    ``None`` until the counter moves or 3 intervals pass (``wait_known``).
    Not thread-safe by itself: ``client.nfs`` guards it with a lock.
    """

    def __init__(self, path: str, *, clock=time.monotonic, wall=time.time):
        self.path = path
        self._clock, self._wall = clock, wall
        self._key: tuple | None = None
        self._first_seen: float | None = None
        self._last_change: float | None = None
        self._doc: dict | None = None
        self._mtime: float | None = None

    def observe(self) -> dict | None:
        try:
            got = read_json_with_mtime(self.path)
        except (errors.ChannelError, OSError):
            got = None  # mid-replace oddities or I/O error: judge by what we knew
        now = self._clock()
        if got is None:
            self._doc = None
            return None
        doc, mtime = got
        key = (doc.get("boot"), doc.get("counter"))
        if self._key is None:
            self._first_seen = now
        elif key != self._key:
            self._last_change = now
        self._key, self._doc, self._mtime = key, doc, mtime
        return doc

    def interval(self) -> float:
        value = (self._doc or {}).get("interval")
        return float(value) if isinstance(value, int | float) and value > 0 else 2.0

    def state(self) -> Liveness:
        doc = self._doc
        if doc is None:
            return Liveness(False, None, None, None, "no heartbeat file")
        counter = doc.get("counter") if isinstance(doc.get("counter"), int) else None
        now = self._clock()
        limit = DEAD_AFTER_BEATS * self.interval()
        if doc.get("state") == "stopped":
            return Liveness(False, None, counter, doc, "stopped")
        if self._last_change is not None:
            age = now - self._last_change
            return Liveness(age < limit, age, counter, doc)
        watched = now - (self._first_seen or now)
        hint = self._wall() - self._mtime if self._mtime is not None else None
        if watched >= limit:
            age = max(watched, hint) if hint is not None else watched
            return Liveness(False, age, counter, doc)
        if hint is not None and -CLOCK_SKEW_ALLOWANCE <= hint < limit + CLOCK_SKEW_ALLOWANCE:
            return Liveness(True, max(hint, 0.0), counter, doc, "provisional (mtime)")
        return Liveness(None, hint, counter, doc)

    def check(self) -> Liveness:
        self.observe()
        return self.state()

    def wait_known(self, *, poll: float = 0.05, budget: float | None = None) -> Liveness:
        """``check()`` until the answer is alive or down (at most 3 intervals)."""
        live = self.check()
        end = self._clock() + (budget if budget is not None else DEAD_AFTER_BEATS * self.interval() + poll)
        while live.alive is None and self._clock() < end:
            time.sleep(poll)
            live = self.check()
        return live


def wait_heartbeat_advance(path: str, timeout: float, *, poll: float = 0.05) -> tuple[bool, dict | None, dict | None]:
    """(advanced, first doc, last doc): did (boot, counter) change within ``timeout`` seconds?"""
    first = _read_quiet(path)
    end = time.monotonic() + timeout
    last = first
    while time.monotonic() < end:
        time.sleep(min(poll, max(0.0, end - time.monotonic())))
        last = _read_quiet(path)
        if last is not None and (first is None or (last.get("boot"), last.get("counter"))
                                 != (first.get("boot"), first.get("counter"))):
            if last.get("state") != "stopped":
                return True, first, last
    return False, first, last


def _read_quiet(path: str) -> dict | None:
    """The heartbeat, or None while it is absent or half-visible; a refused read is not "absent"."""
    try:
        return read_json(path)
    except PermissionError:
        raise
    except (errors.ChannelError, OSError):
        return None


# --- CLI handlers ----------------------------------------------------------------------------------
def cmd_nfs_init(args: argparse.Namespace) -> int:
    """``gpu-bridge nfs-init [--owner UID:GID]``: prints exactly ``created`` or ``unchanged``."""
    root = NfsSettings.from_env().root
    try:
        changed = init_share(root, getattr(args, "owner", None))
    except PermissionError as exc:
        raise errors.ShareNotReady(f"cannot prepare {root}: {exc.strerror} ({exc.filename}); run as root "
                                   "or as the share's owner") from None
    print("created" if changed else "unchanged")
    return 0


def cmd_nfs_heartbeat(args: argparse.Namespace) -> int:
    """``gpu-bridge nfs-heartbeat [--host-id ID] [--timeout S]``: 0 when the counter advances."""
    settings = NfsSettings.from_env()
    host_id = check_host_id(getattr(args, "host_id", None) or settings.host_id)
    timeout = float(getattr(args, "timeout", None) or 10.0)
    paths = HostPaths(settings.root, host_id)
    try:
        advanced, first, last = wait_heartbeat_advance(paths.heartbeat, timeout,
                                                       poll=min(0.1, settings.poll_interval * 2))
    except PermissionError as exc:
        # Typically root on a root_squash NFS share, where root is "nobody".
        raise errors.ShareNotReady(f"cannot read {exc.filename or paths.heartbeat}: {exc.strerror}; run as the "
                                   "service account that owns the share (root is squashed on most NFS exports)"
                                   ) from None
    if advanced:
        assert last is not None  # advanced is only reported with the document that advanced
        print(f"{host_id}: heartbeat advanced ({(first or {}).get('counter')} -> {last.get('counter')})")
        return 0
    if last is None:
        msg = (f"{host_id}: no heartbeat at {paths.heartbeat} within {timeout:g} s "
               "(worker not running, wrong GPU_BRIDGE_NFS_HOST_ID, or share not mounted)")
    elif last.get("state") == "stopped":
        msg = f"{host_id}: the worker has stopped (heartbeat counter {last.get('counter')}, state stopped)"
    else:
        msg = (f"{host_id}: heartbeat counter stuck at {last.get('counter')} for {timeout:g} s "
               f"(worker pid {last.get('pid')} on {last.get('node')} is hung or stopped)")
    print(f"gpu-bridge: error: {msg}", file=sys.stderr)
    return 1

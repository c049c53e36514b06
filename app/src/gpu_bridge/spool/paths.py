"""Where everything lives on the share: the directory layout, host ids, request ids, temp names.

Pure naming: nothing here touches the filesystem, so both sides (and the tests) can compute every
path of any host without a share. The rules for *using* those paths are in ``files`` (how to read
and write them safely over NFS) and ``protocol`` (what the documents in them say).

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

Request ids are ``<time ns, 19 digits>-<pid>-<hostname>-<random hex>``: unique without coordination,
and they sort in creation order, which is the order the worker serves them in.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from dataclasses import dataclass

from .. import errors

SENTINEL = ".gpu-bridge-share"
COMMANDS_DIR = "gpu_commands"
STATUS_DIR = "gpu_status"
QUARANTINE_DIR = "bad"

HOST_ID_RE = re.compile(r"^[A-Za-z0-9_:][A-Za-z0-9_.:-]{0,127}$")  # ":" first: IPv6 such as ::1
REQUEST_ID_RE = re.compile(r"^[0-9]{19}-[0-9]+-[A-Za-z0-9_.-]{1,64}-[0-9a-f]{12}$")
_HOST_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_HOSTNAME = _HOST_CHARS.sub("_", socket.gethostname())[:64] or "host"


def new_request_id() -> str:
    """Unique across hosts and processes without coordination; sorts by creation time."""
    return f"{time.time_ns():019d}-{os.getpid()}-{_HOSTNAME}-{secrets.token_hex(6)}"


def valid_request_id(value: object) -> bool:
    return isinstance(value, str) and bool(REQUEST_ID_RE.match(value))


def check_host_id(host_id: object) -> str:
    """``host_id`` when it is one safe path component, else ConfigError naming the variable to fix.

    Typed ``object``: the id comes from the environment or the command line, and a wrong type must
    get the same clear error as a wrong value.
    """
    if not isinstance(host_id, str) or not HOST_ID_RE.match(host_id) or host_id in (".", "..") \
            or ".." in host_id:
        raise errors.ConfigError(
            f"NFS host id {host_id!r} is not usable as a directory name on the share "
            "(letters, digits, and _ . : - only; set GPU_BRIDGE_NFS_HOST_ID)")
    return host_id


def temp_name(hint: str = "") -> str:
    """A dot name (readers skip it) that no other writer on any host can pick at the same time."""
    return f".{hint + '.' if hint else ''}{time.time_ns()}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


@dataclass(frozen=True)
class HostPaths:
    """Every path of one host's spool, derived from the share root and the host id."""

    root: str
    host_id: str

    def __post_init__(self) -> None:
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

"""The NFS spool protocol: how production and GPU workers exchange commands through files on a share.

Both sides import this package: the GPU-side worker (``nfs_worker.py``) and the production-side
transport (``client/nfs.py``); callers use the names re-exported here (``spool.send_command``,
``spool.HostPaths``...). It also holds ``gpu-bridge nfs-init`` and ``gpu-bridge nfs-heartbeat``.

In short: a producer writes a command to a temp file and renames it into the host's ``new/``; the
worker renames it into ``cur/`` (the claim), runs it, and renames an answer into ``answers/``; the
producer polls that name with ``open()``. rename() is the only synchronisation, ``open()`` (never
``stat()``/``exists()``) the only lookup, and the command export is mounted with
``lookupcache=positive,acdirmin=0,acdirmax=1`` so that neither trusts a cached "does not exist" or
a stale directory attribute cache. The details, each next to the code that relies on them:

================  ===================================================================================
``paths``         the layout on the share, host ids, request ids, temp names (``HostPaths``)
``files``         why open() and rename(); atomic writes; reads that refuse symlinks, FIFOs, huge or
                  deeply nested files; listings and cleanup
``protocol``      protocol version, operations, limits, command / answer / status document formats
``exchange``      publishing and withdrawing commands, waiting for answers, quarantining refused entries
``liveness``      judging a worker alive from its heartbeat counter without comparing clocks
``share``         the mount options and why; checking and preparing the share (``nfs-init``)
``cli``           the ``nfs-init`` and ``nfs-heartbeat`` sub-commands
================  ===================================================================================
"""

from __future__ import annotations

from .cli import cmd_nfs_heartbeat, cmd_nfs_init
from .exchange import quarantine, read_answer, send_command, wait_answer, withdraw
from .files import (
    FILE_MODE,
    MAX_FILE_BYTES,
    MAX_JSON_DEPTH,
    STALE_TEMP_SECONDS,
    JsonObject,
    UnsafeEntry,
    claim,
    file_kind,
    iter_old_entries,
    list_names,
    openable,
    parse_json,
    publish,
    read_bytes,
    read_bytes_stat,
    read_json,
    read_json_with_mtime,
    unlink_quiet,
    write_atomic,
    write_json,
)
from .liveness import (
    CLOCK_SKEW_ALLOWANCE,
    DEAD_AFTER_BEATS,
    HeartbeatMonitor,
    Liveness,
    wait_heartbeat_advance,
)
from .paths import (
    COMMANDS_DIR,
    HOST_ID_RE,
    QUARANTINE_DIR,
    REQUEST_ID_RE,
    SENTINEL,
    STATUS_DIR,
    HostPaths,
    check_host_id,
    new_request_id,
    temp_name,
    valid_request_id,
)
from .protocol import (
    CLOCK_SKEW_WARN,
    MAX_COMMAND_BYTES,
    MAX_DEADLINE_AHEAD,
    OPS,
    PROTOCOL_VERSION,
    TERMINAL_STATES,
    Answer,
    Command,
    error_to_dict,
    make_answer,
    make_command,
)
from .share import (
    COMMAND_MOUNT_OPTIONS,
    DIR_MODE,
    FORMAT_VERSION,
    check_share,
    init_share,
    mount_point_of,
    prepare_host,
)

__all__ = [
    "CLOCK_SKEW_ALLOWANCE", "CLOCK_SKEW_WARN", "COMMANDS_DIR", "COMMAND_MOUNT_OPTIONS", "DEAD_AFTER_BEATS",
    "DIR_MODE", "FILE_MODE", "FORMAT_VERSION", "HOST_ID_RE", "MAX_COMMAND_BYTES", "MAX_DEADLINE_AHEAD",
    "MAX_FILE_BYTES", "MAX_JSON_DEPTH", "OPS", "PROTOCOL_VERSION", "QUARANTINE_DIR", "REQUEST_ID_RE",
    "SENTINEL", "STALE_TEMP_SECONDS", "STATUS_DIR", "TERMINAL_STATES",
    "Answer", "Command", "HeartbeatMonitor", "HostPaths", "JsonObject", "Liveness", "UnsafeEntry",
    "check_host_id", "check_share", "claim", "cmd_nfs_heartbeat", "cmd_nfs_init", "error_to_dict", "file_kind",
    "init_share", "iter_old_entries", "list_names", "make_answer", "make_command", "mount_point_of",
    "new_request_id", "openable", "parse_json", "prepare_host", "publish", "quarantine", "read_answer",
    "read_bytes", "read_bytes_stat", "read_json", "read_json_with_mtime", "send_command", "temp_name",
    "unlink_quiet", "valid_request_id", "wait_answer", "wait_heartbeat_advance", "withdraw", "write_atomic",
    "write_json",
]

"""The share itself: how to mount it, how ``nfs-init`` prepares it, and the checks before anyone writes.

A worker must never write into the empty local directory under an unmounted share, and the two sides
must agree on the layout: ``check_share`` refuses a root that is not mounted or carries no sentinel of
a known format; ``init_share`` (``gpu-bridge nfs-init``) writes that sentinel and the two top-level
directories; ``prepare_host`` makes one worker's own tree.

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
  an error although it happened (see ``files.publish``: we handle that case anyway).
* ``vers=4.2``: atomic rename, close-to-open, change attributes. ``_netdev``: mount after the network.
* Apply these to the command export only (not to bulk storage: ``acdirmax=1`` costs GETATTRs). If
  the same export is mounted twice on one host, the first mount's options win unless the second
  uses ``nosharecache``.
* The worker's unit has ``RequiresMountsFor=<root>``, and the worker refuses to run unless the root
  (or an ancestor other than ``/``) is a mount point and carries the sentinel file.
"""

from __future__ import annotations

import os
import socket
import stat
import time

from .. import errors
from .files import JsonObject, read_json, write_json
from .paths import COMMANDS_DIR, SENTINEL, STATUS_DIR, HostPaths

COMMAND_MOUNT_OPTIONS = "vers=4.2,hard,lookupcache=positive,acdirmin=0,acdirmax=1,_netdev"

FORMAT_VERSION = 1
DIR_MODE = 0o2770  # setgid: files inherit the share's group (same GID on every host)
_SENTINEL_MAX_BYTES = 64 * 1024


def mount_point_of(path: str) -> str:
    """The mount point ``path`` lives on (``/`` when no other ancestor is one)."""
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_share(root: str, *, require_mount: bool = True) -> JsonObject:
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
        doc = read_json(sentinel, _SENTINEL_MAX_BYTES)
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
    """``--owner UID:GID`` (either part may be empty: -1, "leave as is", as for os.chown)."""
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
        doc = read_json(sentinel, _SENTINEL_MAX_BYTES)
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

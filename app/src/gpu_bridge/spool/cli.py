"""``gpu-bridge nfs-init`` and ``gpu-bridge nfs-heartbeat``: the share's two operator commands.

They run on either host without the GPU server or the backend (``gpu_bridge.cli`` imports this
lazily), print one line, and turn a permission problem into a line that says what to run instead.
"""

from __future__ import annotations

import argparse
import math
import sys

from .. import errors
from ..config import NfsSettings
from .liveness import wait_heartbeat_advance
from .paths import HostPaths, check_host_id
from .share import init_share


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
    if not (math.isfinite(timeout) and timeout > 0):  # nan would not wait at all, inf forever
        raise errors.ConfigError(f"--timeout {timeout:g}: expected a positive number of seconds (e.g. 10)")
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

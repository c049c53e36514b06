"""The free-space rule of new pulls, shared by the HTTP server and the NFS worker (through GpuService)."""

from __future__ import annotations

import logging
import os
import shutil

from .errors import InsufficientStorage

log = logging.getLogger("gpu_bridge.jobs")


def check_free_space(directory: str | None, min_free_bytes: int, where: str = "") -> None:
    """Refuse a new pull (InsufficientStorage, 507) when Ollama's models directory has less than
    ``min_free_bytes`` free (GPU_BRIDGE_MIN_FREE_GB); shared by the HTTP server and the NFS worker.

    A directory that does not exist yet is measured at its nearest existing parent: Ollama creates
    it on its first pull. An unreadable file system only logs: the check protects, it must not block.
    """
    if not directory or min_free_bytes <= 0:
        return
    path = os.path.abspath(directory)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        free = shutil.disk_usage(path).free
    except OSError as exc:
        log.warning("cannot check free space in %s: %s", directory, exc)
        return
    if free < min_free_bytes:
        gib = 1024**3
        raise InsufficientStorage(f"only {free / gib:.1f} GiB free in {directory}{where}; a pull needs at least "
                                  f"{min_free_bytes / gib:.1f} GiB (GPU_BRIDGE_MIN_FREE_GB): delete models first")


__all__ = ["check_free_space"]

"""Reading and writing spool files safely over NFS: atomic writes, refusing reads, listings, cleanup.

Every byte that crosses the share goes through here, so the NFS caching rules live in one place.

Why it looks like this
======================
The seed polled ``os.path.exists()`` for answer files and waited tens of seconds: an NFS client
caches attributes and directory lookups, *including negative ones*, so "this file does not exist" is
trusted until the parent directory's cached attributes expire (30-60 s with default options).
``sync``/``drop_caches`` do not help. What does:

* **The mount options first** (``share.COMMAND_MOUNT_OPTIONS``): checked on real NFSv4.2, with
  default options even ``open()`` trusts a cached "not found" for a name it looked up before (50 of
  50 misses, like ``exists()``).
* **open(), never stat()/exists()**, to look for a file: under ``lookupcache=positive`` a name that
  was missing is looked up on the server again on each try (negative results are not cached), and
  close-to-open consistency then gives the complete file; ``stat`` may still answer from the
  attribute cache.
* **Listing a directory** (``os.scandir``) opens it, which revalidates its contents.
* **rename() is the only synchronisation primitive** (Maildir style). No ``flock``/``fcntl``: NFS
  locks need lockd/leases and fail in ways that are worse than not locking at all.

Anyone who can write to the share is untrusted: reads refuse what is not a regular file (a FIFO
would block, a symlink could point anywhere), what is larger than a limit, and JSON nested deeper
than a limit (Python's parser would raise RecursionError).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from collections.abc import Iterator, Mapping
from typing import Any

from .. import errors
from .paths import temp_name

# A JSON object read from the share. Its values are Any because the writer is untrusted and the
# shapes vary by file: every reader checks the fields it uses (isinstance, .get with defaults).
JsonObject = dict[str, Any]

FILE_MODE = 0o660  # before umask; the units run with UMask=0007
MAX_FILE_BYTES = 4 * 1024 * 1024  # a models.json with many models stays far below this
MAX_JSON_DEPTH = 32  # commands and progress files nest 3-4 levels; Python's own limit is ~1000 (RecursionError)
STALE_TEMP_SECONDS = 600.0  # temp files older than this are debris of a crashed writer (iter_old_entries)


class UnsafeEntry(errors.ChannelError):
    """A spool name that is not a regular file (a symlink, directory, FIFO, device...): never read."""


# --- writing ---------------------------------------------------------------------------------------
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
        unlink_quiet(src)
        raise


def write_atomic(tmp_dir: str, path: str, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part.

    Temp file: dot name in ``tmp_dir`` (same filesystem as ``path``), ``O_CREAT|O_EXCL``, every
    write checked, ``fsync`` (NFS COMMIT), ``close`` (which reports NFS write-back errors), rename.
    """
    tmp = os.path.join(tmp_dir, temp_name())
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
            unlink_quiet(tmp)
        raise
    try:
        os.close(fd)
    except OSError:
        unlink_quiet(tmp)
        raise
    publish(tmp, path)


def write_json(tmp_dir: str, path: str, doc: Mapping[str, object]) -> None:
    """``write_atomic`` of ``doc`` as compact JSON with sorted keys (stable bytes for equal documents)."""
    write_atomic(tmp_dir, path, json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())


# --- reading ---------------------------------------------------------------------------------------
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
        chunks: list[bytes] = []
        size = 0
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


def parse_json(data: bytes, name: str, *, max_depth: int | None = MAX_JSON_DEPTH) -> JsonObject:
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
    """How deep ``data``'s brackets nest (outside strings), counted without parsing; stops past ``limit``."""
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
              max_depth: int | None = None) -> JsonObject | None:
    """Parsed JSON object, or None when the file does not exist; ChannelError when it is not JSON
    (UnsafeEntry when the name is not a regular file)."""
    data = read_bytes(path, limit, nofollow=nofollow)
    if data is None:
        return None
    return parse_json(data, repr(path), max_depth=max_depth)


def read_json_with_mtime(path: str) -> tuple[JsonObject, float] | None:
    """Like ``read_json`` plus the file's mtime, taken with fstat on the open file (fresh on NFS)."""
    got = read_bytes_stat(path, MAX_FILE_BYTES)
    if got is None:
        return None
    data, st = got
    return parse_json(data, repr(path), max_depth=None), st.st_mtime


# --- directories -----------------------------------------------------------------------------------
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


def unlink_quiet(path: str) -> bool:
    """Remove ``path``; True when this call removed it. Any failure is False: callers only tidy up."""
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


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

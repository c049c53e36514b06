"""The spool protocol's building blocks, in one process: atomic writes, publish, claim, share checks,
liveness judgement, error mapping, and the nfs-init / nfs-heartbeat commands."""

from __future__ import annotations

import argparse
import ast
import errno
import importlib
import inspect
import json
import os
import stat
import subprocess
import sys
import threading

import pytest
from nfs_helpers import transport

from gpu_bridge import spool
from gpu_bridge.errors import (
    ChannelError,
    ConfigError,
    GpuHostError,
    GpuHostTimeout,
    GpuHostUnreachable,
    InvalidModelName,
    ModelNotFound,
    QueueFull,
    ShareNotReady,
)

SPOOL_MODULES = ("paths", "files", "protocol", "exchange", "liveness", "share", "cli")


def run_cli(root, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_BRIDGE_")}
    env["GPU_BRIDGE_NFS_ROOT"] = str(root)
    return subprocess.run([sys.executable, "-m", "gpu_bridge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


# --- files -----------------------------------------------------------------------------------------
def test_write_atomic_leaves_only_the_final_file(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    target = tmp_path / "answer.json"
    spool.write_json(str(tmp), str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp) == []
    spool.write_json(str(tmp), str(target), {"a": 2})  # replace
    assert json.loads(target.read_text()) == {"a": 2}


def test_temp_names_are_dot_names_in_the_tmp_dir(tmp_path, monkeypatch):
    seen = []
    real_rename = os.rename

    def spy(src, dst):
        seen.append(src)
        real_rename(src, dst)

    monkeypatch.setattr(spool.files.os, "rename", spy)
    spool.write_atomic(str(tmp_path), str(tmp_path / "x"), b"data")
    assert os.path.dirname(seen[0]) == str(tmp_path)
    assert os.path.basename(seen[0]).startswith(".")


def test_publish_treats_a_rename_that_happened_as_success(tmp_path, monkeypatch):
    """NFS: a retransmitted RENAME fails with ENOENT although the first one succeeded."""
    real_rename = os.rename

    def rename_then_fail(src, dst):
        real_rename(src, dst)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", src)

    monkeypatch.setattr(spool.files.os, "rename", rename_then_fail)
    spool.write_atomic(str(tmp_path), str(tmp_path / "final"), b"hello")
    assert (tmp_path / "final").read_bytes() == b"hello"


def test_publish_reports_a_real_failure_and_cleans_up(tmp_path, monkeypatch):
    def fail(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", dst)

    monkeypatch.setattr(spool.files.os, "rename", fail)
    with pytest.raises(PermissionError):
        spool.write_atomic(str(tmp_path), str(tmp_path / "final"), b"hello")
    assert os.listdir(tmp_path) == []  # the temp file is gone too


def test_write_atomic_checks_short_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(spool.files.os, "write", lambda fd, data: 0)
    with pytest.raises(OSError, match="short write"):
        spool.write_atomic(str(tmp_path), str(tmp_path / "final"), b"hello")
    assert os.listdir(tmp_path) == []


def test_claim_is_won_once(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "cur").mkdir()
    src, dst = tmp_path / "new" / "c.json", tmp_path / "cur" / "c.json"
    src.write_text("{}")
    assert spool.claim(str(src), str(dst)) is True
    assert spool.claim(str(src), str(dst)) is False or not src.exists()
    assert dst.exists() and not src.exists()


def test_list_names_skips_dot_names_and_sorts(tmp_path):
    for name in ("b.json", ".tmp123", "a.json", ".nfs0001"):
        (tmp_path / name).write_text("x")
    assert spool.list_names(str(tmp_path)) == ["a.json", "b.json"]
    assert spool.list_names(str(tmp_path / "missing")) == []


def test_read_json(tmp_path):
    assert spool.read_json(str(tmp_path / "missing.json")) is None
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ChannelError):
        spool.read_json(str(tmp_path / "bad.json"))


def test_request_ids_are_unique_sortable_and_valid():
    ids = [spool.new_request_id() for _ in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids)
    assert all(spool.valid_request_id(i) for i in ids)


@pytest.mark.parametrize("bad", ["", "..", "../etc", "a/b", ".hidden", "x" * 200])
def test_host_ids_must_be_one_safe_path_component(bad):
    with pytest.raises(ConfigError):
        spool.HostPaths("/mnt/shared", bad)


def test_mount_options_constant_documents_the_cache_settings():
    assert spool.COMMAND_MOUNT_OPTIONS == "vers=4.2,hard,lookupcache=positive,acdirmin=0,acdirmax=1,_netdev"
    assert "lookupcache=positive" in spool.share.__doc__ and "directory attribute cache" in spool.share.__doc__


# --- the share ------------------------------------------------------------------------------------
def test_init_share_is_idempotent(tmp_path):
    assert spool.init_share(str(tmp_path)) is True
    assert spool.init_share(str(tmp_path)) is False
    for name in (spool.COMMANDS_DIR, spool.STATUS_DIR):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o2770
    assert json.loads((tmp_path / spool.SENTINEL).read_text())["format"] == spool.FORMAT_VERSION
    os.chmod(tmp_path / spool.COMMANDS_DIR, 0o700)  # drift is repaired and reported
    assert spool.init_share(str(tmp_path)) is True
    assert spool.init_share(str(tmp_path)) is False


def test_init_share_refuses_a_newer_format_and_a_missing_root(tmp_path):
    (tmp_path / spool.SENTINEL).write_text(json.dumps({"format": 99}))
    with pytest.raises(ShareNotReady, match="upgrade"):
        spool.init_share(str(tmp_path))
    with pytest.raises(ShareNotReady, match="does not exist"):
        spool.init_share(str(tmp_path / "nope"))


def test_nfs_init_cli_prints_created_then_unchanged(tmp_path):
    first = run_cli(tmp_path, "nfs-init")
    second = run_cli(tmp_path, "nfs-init")
    assert (first.returncode, first.stdout) == (0, "created\n")
    assert (second.returncode, second.stdout) == (0, "unchanged\n")
    bad = run_cli(tmp_path, "nfs-init", "--owner", "root:wheel")
    assert bad.returncode == 1 and bad.stderr.startswith("gpu-bridge: error: --owner")


def test_nfs_init_cli_owner(tmp_path):
    uid, gid = os.getuid(), os.getgid()
    assert run_cli(tmp_path, "nfs-init", "--owner", f"{uid}:{gid}").stdout == "created\n"
    assert run_cli(tmp_path, "nfs-init", "--owner", f"{uid}:{gid}").stdout == "unchanged\n"


def test_check_share_refusals(tmp_path, monkeypatch):
    with pytest.raises(ShareNotReady, match="does not exist"):
        spool.check_share(str(tmp_path / "missing"), require_mount=False)
    with pytest.raises(ShareNotReady, match="nfs-init"):
        spool.check_share(str(tmp_path), require_mount=False)
    spool.init_share(str(tmp_path))
    assert spool.check_share(str(tmp_path), require_mount=False)["format"] == 1
    # Not mounted: only "/" is a mount point above the root.
    monkeypatch.setattr(spool.share.os.path, "ismount", lambda p: p == "/")
    with pytest.raises(ShareNotReady, match="not mounted"):
        spool.check_share(str(tmp_path), require_mount=True)
    # Mounted at an ancestor (e.g. /mnt/shared mounted, root below it).
    parent = os.path.realpath(tmp_path)
    monkeypatch.setattr(spool.share.os.path, "ismount", lambda p: p in ("/", parent))
    assert spool.check_share(str(tmp_path), require_mount=True)


# --- liveness -------------------------------------------------------------------------------------
class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def write_beat(path, counter, *, boot="b1", interval=1.0, state="running", mtime=None):
    path.write_text(json.dumps({"counter": counter, "boot": boot, "interval": interval, "state": state}))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_heartbeat_alive_while_counter_moves_dead_after_three_intervals(tmp_path):
    hb = tmp_path / "heartbeat.json"
    mono, wall = Clock(), Clock(5000.0)
    write_beat(hb, 1, mtime=5000.0)
    m = spool.HeartbeatMonitor(str(hb), clock=mono, wall=wall)
    assert m.check().alive is True  # fresh reader: mtime hint says just written
    mono.t += 0.5
    write_beat(hb, 2)
    assert m.check().alive is True
    mono.t += 2.9
    assert m.check().alive is True
    mono.t += 0.2  # 3.1 s without a change at interval 1 s
    live = m.check()
    assert live.alive is False
    assert "stale (last change 3 s ago)" in live.describe()


def test_fresh_reader_with_an_old_heartbeat_waits_then_calls_it_dead(tmp_path):
    hb = tmp_path / "heartbeat.json"
    mono, wall = Clock(), Clock(5000.0)
    write_beat(hb, 7, mtime=5000.0 - 600)  # written 10 minutes ago (or the clocks disagree)
    m = spool.HeartbeatMonitor(str(hb), clock=mono, wall=wall)
    assert m.check().alive is None
    mono.t += 3.1
    live = m.check()
    assert live.alive is False and live.age >= 600


def test_fresh_reader_with_skewed_clock_learns_from_the_counter(tmp_path):
    hb = tmp_path / "heartbeat.json"
    mono, wall = Clock(), Clock(5000.0)
    write_beat(hb, 7, mtime=5000.0 + 3600)  # server clock an hour ahead
    m = spool.HeartbeatMonitor(str(hb), clock=mono, wall=wall)
    assert m.check().alive is None
    mono.t += 1.0
    write_beat(hb, 8, mtime=5000.0 + 3601)
    assert m.check().alive is True


def test_restart_with_the_same_counter_still_counts_as_a_change(tmp_path):
    hb = tmp_path / "heartbeat.json"
    mono = Clock()
    write_beat(hb, 5, boot="a")
    m = spool.HeartbeatMonitor(str(hb), clock=mono)
    m.check()
    mono.t += 2.5
    write_beat(hb, 5, boot="b")
    mono.t += 1.0
    assert m.check().alive is True


def test_stopped_and_missing_heartbeats_are_down(tmp_path):
    hb = tmp_path / "heartbeat.json"
    m = spool.HeartbeatMonitor(str(hb))
    live = m.check()
    assert live.alive is False and "no heartbeat file" in live.describe()
    write_beat(hb, 3, state="stopped")
    live = m.check()
    assert live.alive is False and "stopped" in live.describe()


def test_nfs_heartbeat_cli_without_a_worker(share):
    r = run_cli(share, "nfs-heartbeat", "--host-id", "gpu-01", "--timeout", "0.3")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "gpu-01: no heartbeat" in r.stderr


def test_nfs_heartbeat_cli_says_when_it_may_not_read_the_share(share, monkeypatch, capsys):
    """Root on a root_squash export is "nobody": say so, instead of "no heartbeat" after the timeout."""
    from gpu_bridge import cli

    def refused(path, *_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setenv("GPU_BRIDGE_NFS_ROOT", str(share))
    monkeypatch.setattr(spool.liveness, "read_json", refused)
    assert cli.main(["nfs-heartbeat", "--host-id", "gpu-01", "--timeout", "30"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Permission denied" in err and "service account" in err and "heartbeat.json" in err


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_nfs_heartbeat_refuses_a_timeout_that_is_not_a_positive_number(share, monkeypatch, timeout):
    monkeypatch.setenv("GPU_BRIDGE_NFS_ROOT", str(share))
    with pytest.raises(ConfigError, match="--timeout .*positive number of seconds"):
        spool.cmd_nfs_heartbeat(argparse.Namespace(host_id="gpu-01", timeout=timeout))


# --- the package: every caller writes spool.X -----------------------------------------------------------
def test_every_public_name_of_the_spool_modules_is_reexported_as_spool_x():
    """nfs_worker, client/nfs.py, the CLI table ("gpu_bridge.spool:cmd_nfs_init"), bench and the tests
    all reach the protocol through the package: a name added to a module must be reachable there too."""
    checked = 0
    for module in (importlib.import_module(f"gpu_bridge.spool.{name}") for name in SPOOL_MODULES):
        assert module.__doc__ and len(module.__doc__) > 100, f"{module.__name__} says what it holds and why"
        for name in _defined_names(inspect.getsource(module)):
            if not name.startswith("_"):
                assert getattr(spool, name, None) is getattr(module, name), f"spool.{name} ({module.__name__})"
                assert name in spool.__all__, name
                checked += 1
    assert checked > 50 and set(spool.__all__) <= set(vars(spool)), "every name in __all__ exists"


def _defined_names(source: str) -> list[str]:
    """Top-level functions, classes and assignments of a module's source (not what it imports)."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                elts = target.elts if isinstance(target, ast.Tuple) else [target]
                names += [t.id for t in elts if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return names


@pytest.mark.parametrize("name", SPOOL_MODULES)
def test_spool_modules_stay_small(name):
    path = os.path.join(os.path.dirname(spool.__file__), f"{name}.py")
    with open(path, encoding="utf-8") as fh:
        assert sum(1 for _ in fh) <= 400, f"spool/{name}.py has grown past ~400 lines: split it along a seam"


# --- production side without a worker ----------------------------------------------------------------
def test_transport_on_an_unprepared_share(tmp_path):
    t = transport(tmp_path, "gpu-01")
    with pytest.raises(GpuHostUnreachable) as exc:
        t.list_models()
    assert exc.value.code == "nfs_share_not_ready" and exc.value.host == "gpu-01:8001"
    assert "nfs-init" in exc.value.message


def test_transport_for_a_host_that_never_ran_a_worker(share):
    t = transport(share, "gpu-09")
    with pytest.raises(GpuHostUnreachable, match="no heartbeat file"):
        t.list_models()
    with pytest.raises(GpuHostUnreachable, match="no heartbeat file"):
        t.ping()
    with pytest.raises(InvalidModelName):
        t.start_pull("bad name!")


def test_worker_errors_map_like_the_http_transport(share):
    t = transport(share, "gpu-01")
    e = t._error({"error": "model 'x' not found", "code": "model_not_found", "status": 404})
    assert isinstance(e, ModelNotFound) and e.host == "gpu-01:8001"
    e = t._error({"error": "down", "code": "ollama_unavailable", "status": 503})
    assert type(e) is GpuHostError and (e.code, e.status) == ("ollama_unavailable", 503)
    e = t._error({"error": "late", "code": "command_expired", "status": 504})
    assert isinstance(e, GpuHostTimeout) and e.code == "command_expired"
    e = t._error({"error": "full", "code": "queue_full", "status": 429, "retry_after": 10})
    assert isinstance(e, QueueFull) and e.retry_after == 10
    e = t._error({"error": "?", "code": "something_new", "status": 500})
    assert isinstance(e, GpuHostError) and e.code == "something_new"


def test_a_live_worker_that_does_not_answer_times_out_with_a_clear_message(share):
    """A heartbeat that keeps moving (a worker stuck on something else): GpuHostTimeout, command withdrawn."""
    paths = spool.HostPaths(str(share), "gpu-01")
    spool.prepare_host(paths)
    stop = threading.Event()

    spool.write_json(paths.status_tmp, paths.heartbeat, {"counter": 0, "boot": "x", "interval": 0.1})

    def beat():
        counter = 0
        while not stop.wait(0.05):
            counter += 1
            spool.write_json(paths.status_tmp, paths.heartbeat, {"counter": counter, "boot": "x", "interval": 0.1})

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        t = transport(share, "gpu-01")
        with pytest.raises(GpuHostTimeout) as exc:
            t.ping(timeout=0.5)
    finally:
        stop.set()
        beater.join()
    msg = exc.value.message
    assert msg.startswith("no answer from gpu-01 within 0.5 s to 'ping' (the command was withdrawn and will not run)")
    assert "heartbeat is alive" in msg and exc.value.host == "gpu-01:8001"
    assert spool.list_names(paths.cmd_new) == []

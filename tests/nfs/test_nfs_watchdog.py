"""systemd's watchdog, fed by the heartbeat (issue 14: "a systemd watchdog fed by the heartbeat restarts a
stuck worker"). A fake ``$NOTIFY_SOCKET`` (a unix datagram socket in a temp directory) receives what the
worker sends: READY=1 once it serves, WATCHDOG=1 after every heartbeat that reached the share, and
nothing while a heartbeat write blocks or fails; STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from nfs_helpers import WorkerProcess

from gpu_bridge import nfs_worker, spool
from gpu_bridge.config import GpuServerSettings, NfsSettings
from gpu_bridge.nfs_worker import NfsWorker
from gpu_bridge.sdnotify import Notifier, watchdog_seconds
from support.procs import wait_until

HOST = "gpu-wd"
BEAT = 0.1  # heartbeat interval of these tests (s)


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: every datagram, with the time it arrived."""

    def __init__(self, directory):
        self.path = os.path.join(str(directory), "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self, since: float = 0.0) -> list[str]:
        return [line for at, text in list(self.messages) if at >= since for line in text.splitlines()]

    def watchdogs(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for at, text in list(self.messages) if since <= at < until and "WATCHDOG=1" in text.splitlines())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    fake = FakeSystemd(tmp_path)
    yield fake
    fake.close()


def test_notifier_without_socket_does_nothing():
    assert Notifier.from_env({}).enabled is False
    assert Notifier.from_env({}).watchdog() is False


def test_notifier_reaches_a_socket_and_survives_a_missing_one(systemd, tmp_path):
    assert Notifier(systemd.path).ready("serving x") is True
    wait_until(lambda: "READY=1" in systemd.lines() and "STATUS=serving x" in systemd.lines(), 5, what="READY")
    gone = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert gone.watchdog() is False  # logged once, never raised
    assert gone.watchdog() is False


def test_watchdog_seconds_reads_systemds_variables():
    assert watchdog_seconds({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 60.0
    assert watchdog_seconds({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None  # meant for another pid
    assert watchdog_seconds({}) is None


def _worker(share, module_emulator, systemd) -> tuple[NfsWorker, threading.Thread]:
    nfs = NfsSettings(root=str(share), host_id=HOST, poll_interval=0.005, heartbeat_interval=BEAT,
                      require_mount=False, models_refresh_interval=1.0)
    worker = NfsWorker(nfs, GpuServerSettings(ollama_url=module_emulator.url, min_free_bytes=0),
                       notifier=Notifier(systemd.path))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


@pytest.mark.parametrize("fault", ["blocks", "fails"])
def test_no_watchdog_ping_while_the_heartbeat_write_blocks_or_fails(share, module_emulator, systemd, monkeypatch,
                                                                    fault):
    real_write = spool.write_json
    release = threading.Event()
    faulty = threading.Event()

    def write_json(tmp_dir, path, doc):
        if faulty.is_set() and path.endswith("heartbeat.json"):
            if fault == "blocks":
                release.wait(30)  # a hung NFS server: the write does not return
            else:
                raise OSError(28, "No space left on device")
        return real_write(tmp_dir, path, doc)

    monkeypatch.setattr(nfs_worker.spool, "write_json", write_json)
    worker, thread = _worker(share, module_emulator, systemd)
    try:
        wait_until(lambda: systemd.watchdogs() >= 5, 10, what="WATCHDOG=1 pings")
        lines = systemd.lines()
        assert lines.index("READY=1") < lines.index("WATCHDOG=1")  # ready first, with the first heartbeat
        faulty.set()
        time.sleep(3 * BEAT)  # a heartbeat already under way may still land
        quiet_from = time.monotonic()
        time.sleep(12 * BEAT)
        assert systemd.watchdogs(since=quiet_from) == 0, f"pings while the heartbeat {fault}"
        # The heartbeat file stops advancing too: that is what the pings stood for.
        counter = spool.read_json(worker.paths.heartbeat)["counter"]
        time.sleep(3 * BEAT)
        assert spool.read_json(worker.paths.heartbeat)["counter"] == counter
        # Once the share answers again, the pings resume (no restart was needed this time).
        faulty.clear()
        release.set()
        resumed = time.monotonic()
        wait_until(lambda: systemd.watchdogs(since=resumed) >= 3, 10, what="WATCHDOG=1 again")
    finally:
        faulty.clear()
        release.set()
        worker.stop()
        thread.join(15)
    assert "STOPPING=1" in systemd.lines()


def test_worker_process_notifies_ready_watchdog_and_stopping(share, module_emulator, systemd):
    """The real `gpu-bridge nfs-worker` as systemd runs it: $NOTIFY_SOCKET in its environment."""
    worker = WorkerProcess(share, HOST, module_emulator.url, GPU_BRIDGE_NFS_HEARTBEAT_INTERVAL=str(BEAT),
                           NOTIFY_SOCKET=systemd.path)
    worker.start()
    try:
        wait_until(lambda: systemd.watchdogs() >= 5, 10, what="WATCHDOG=1 from the process")
        assert systemd.lines()[0] == "READY=1"
        # A stopped process (SIGSTOP: as stuck as it gets) sends nothing: systemd's WatchdogSec= fires.
        worker.signal(signal.SIGSTOP)
        time.sleep(2 * BEAT)
        frozen = time.monotonic()
        time.sleep(10 * BEAT)
        assert systemd.watchdogs(since=frozen) == 0
        worker.signal(signal.SIGCONT)
    finally:
        assert worker.stop() == 0
    assert systemd.lines()[-1] == "STOPPING=1"


def test_the_role_renders_a_notify_unit_with_a_watchdog_well_above_the_heartbeat():
    """gpu-nfs-worker.service.j2 as the role renders it: Type=notify (the worker sends READY=1),
    NotifyAccess=main, WatchdogSec= from gpu_http_server_nfs_watchdog_sec (default 60 s, >= 3 heartbeats)."""
    from pathlib import Path

    import jinja2
    import yaml

    from gpu_bridge.config import NfsSettings

    role = Path(__file__).resolve().parents[2] / "roles" / "gpu_http_server"
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    # A systemd unit, not HTML: nothing to escape.
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)  # noqa: S701
    env.filters["comment"] = lambda text: "\n".join(f"# {line}" for line in str(text).splitlines())
    template = env.from_string((role / "templates" / "gpu-nfs-worker.service.j2").read_text())
    variables = {"ansible_managed": "Ansible managed", "__gpu_http_server_nfs_root": "/mnt/shared",
                 "__gpu_http_server_user": "gpu-bridge", "__gpu_http_server_group": "gpu-bridge",
                 "__gpu_http_server_env_file": "/etc/gpu-bridge/gpu-server.env",
                 "__gpu_http_server_venv_dir": "/opt/gpu-bridge/venv", "gpu_http_server_gpu_access": False}
    unit = template.render(**variables, gpu_http_server_nfs_watchdog_sec=defaults["gpu_http_server_nfs_watchdog_sec"])
    lines = set(unit.splitlines())
    assert {"Type=notify", "NotifyAccess=main", "WatchdogSec=60", "Restart=on-failure"} <= lines
    assert "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" in lines  # the notify socket is AF_UNIX
    assert defaults["gpu_http_server_nfs_watchdog_sec"] >= 3 * NfsSettings().heartbeat_interval
    assert "WatchdogSec=0" in template.render(**variables, gpu_http_server_nfs_watchdog_sec=0).splitlines()

"""The worker refuses to run on an unmounted share, and the channel recovers once it is back."""

import pytest
from molecule_support import CONFIG_DIR, SHARE_ROOT, VENV, WORKER_UNIT, listing, poll, run_as_service_account

testinfra_hosts = ["gpu_servers"]

ENV_FILE = f"{CONFIG_DIR}/gpu-server.env"


def mounted(host) -> bool:
    return host.run("findmnt --kernel --mountpoint %s", SHARE_ROOT).rc == 0


def heartbeat_ok(prod, name: str) -> bool:
    # As the service account: root is "nobody" on the root_squash share.
    return run_as_service_account(prod, "%s/bin/gpu-bridge nfs-heartbeat --host-id %s --timeout 6", VENV, name).rc == 0


@pytest.fixture
def restore(host):
    """Whatever a test did: share mounted and worker running afterwards."""
    yield
    if not mounted(host):
        host.run("mount %s", SHARE_ROOT)
    host.run("systemctl reset-failed %s; systemctl start %s", WORKER_UNIT, WORKER_UNIT)


def test_worker_refuses_an_unmounted_share(host, restore):
    name = host.backend.host
    host.check_output("systemctl stop %s", WORKER_UNIT)
    host.check_output("umount %s", SHARE_ROOT)
    assert not mounted(host)
    # The worker as its unit runs it (user, environment), but without the unit's
    # RequiresMountsFor=, which would mount the share first: the app's own guard must refuse.
    r = host.run(
        "timeout 60 systemd-run --quiet --wait --pipe --collect -p User=gpu-bridge -p Group=gpu-bridge "
        "-p EnvironmentFile=%s %s/bin/gpu-bridge nfs-worker",
        ENV_FILE,
        VENV,
    )
    print(f"\n{name}: unmounted share -> nfs-worker rc={r.rc}: {(r.stderr or r.stdout).strip()}")
    assert r.rc not in (0, 124), "the worker ran on the unmounted share"
    assert "not mounted" in r.stderr + r.stdout
    assert host.check_output("ls -A %s", SHARE_ROOT) == "", "the worker wrote into the local directory"

    # Back: starting the unit mounts the share first (RequiresMountsFor=) and the worker serves again.
    host.check_output("systemctl start %s", WORKER_UNIT)
    assert mounted(host)
    assert host.service(WORKER_UNIT).is_running


def test_worker_stops_when_the_share_goes_away_and_recovers(host, prod, restore):
    """The share vanishes under a running worker: it stops instead of writing locally; systemd
    restarts it (Restart=on-failure), which mounts the share again (RequiresMountsFor=)."""
    name = host.backend.host
    pid_before = host.check_output("systemctl show -p MainPID --value %s", WORKER_UNIT)
    host.check_output("umount -l %s", SHARE_ROOT)
    poll(
        lambda: host.check_output("systemctl show -p MainPID --value %s", WORKER_UNIT),
        lambda pid: pid != pid_before,
        60,
        f"{WORKER_UNIT} on {name} to stop after the share was unmounted",
        interval=1,
    )
    poll(lambda: mounted(host) and host.service(WORKER_UNIT).is_running, bool, 90,
         f"{WORKER_UNIT} back on {name} with the share mounted", interval=2)  # fmt: skip
    log = host.check_output("journalctl -u %s --since -3min --no-pager -o cat", WORKER_UNIT).splitlines()
    app = [line for line in log if "gpu_bridge" in line or "error" in line.lower()]
    print(f"\n{name}: worker log around the unmount:\n  " + "\n  ".join(app[-5:]))
    poll(lambda: heartbeat_ok(prod, name), bool, 60, f"{name}'s heartbeat through prod's share", interval=2)
    assert listing(prod)["models"]

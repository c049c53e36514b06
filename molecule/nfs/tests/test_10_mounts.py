"""The shares are really NFS-mounted (kernel mount table), with the options the roles set."""

import json

from molecule_support import SHARE_ROOT, fstab_entry, setting

testinfra_hosts = ["gpu_servers", "prod_backends"]

# How the kernel reports the channel's options (vers=4.2,hard,lookupcache=positive,acdirmin=0,
# acdirmax=1): lookupcache=positive shows as lookupcache=pos.
CHANNEL_KERNEL_OPTS = {"vers=4.2", "hard", "lookupcache=pos", "acdirmin=0", "acdirmax=1"}


def kernel_mount(host, path: str) -> dict:
    r = host.run("findmnt --kernel --json --output SOURCE,TARGET,FSTYPE,OPTIONS --mountpoint %s", path)
    assert r.rc == 0, f"{path} is not mounted on {host.backend.host}"
    (entry,) = json.loads(r.stdout)["filesystems"]
    return entry


def test_command_share_is_nfs_with_the_channel_options(host):
    mp = host.mount_point(SHARE_ROOT)
    assert mp.exists
    assert mp.filesystem == "nfs4"
    assert mp.device == setting(host, "gpu_bridge_common_command_share_src")
    m = kernel_mount(host, SHARE_ROOT)
    opts = set(m["options"].split(","))
    print(f"\n{host.backend.host}: {m['source']} on {m['target']} type {m['fstype']} ({m['options']})")
    assert not CHANNEL_KERNEL_OPTS - opts, f"missing {CHANNEL_KERNEL_OPTS - opts}: {m}"
    assert "soft" not in opts


def test_command_share_fstab_entry(host):
    entry = fstab_entry(host, SHARE_ROOT)
    assert entry is not None
    assert entry["fstype"] == "nfs"
    assert entry["options"] == setting(host, "gpu_bridge_common_command_share_opts")
    assert "_netdev" in entry["options"].split(",")


def test_storage_share_keeps_normal_caching(host):
    """The channel's options are for the small command share only, not for PDFs and results."""
    path = setting(host, "gpu_bridge_common_storage_share_path")
    m = kernel_mount(host, path)
    assert m["fstype"] == "nfs4"
    assert m["source"] == setting(host, "gpu_bridge_common_storage_share_src")
    opts = set(m["options"].split(","))
    assert "lookupcache=pos" not in opts and "acdirmax=1" not in opts, m


def test_share_is_prepared(host):
    for name in (".gpu-bridge-share", "gpu_commands", "gpu_status"):
        assert host.file(f"{SHARE_ROOT}/{name}").exists, name

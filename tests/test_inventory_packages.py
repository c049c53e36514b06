"""The lab's package list for the GPU hosts holds every Debian package the roles install there.

molecule/nfs builds its VM image (no network) from ``gpu_bridge_common_packages`` as the inventory
gives it per host; a package a role installs that is missing from that list would need a mirror."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _load(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text()) or {}


def test_lab_gpu_hosts_list_every_package_their_roles_install():
    common = _load("roles/gpu_bridge_common/defaults/main.yml")["gpu_bridge_common_packages"]
    proxy = _load("roles/gpu_http_server/defaults/main.yml")["gpu_http_server_packages"]
    lab = _load("inventory/lab/group_vars/gpu_servers/gpu_bridge_common.yml")["gpu_bridge_common_packages"]
    missing = sorted((set(common) | set(proxy)) - set(lab))
    assert not missing, f"inventory/lab/group_vars/gpu_servers/gpu_bridge_common.yml lacks {missing}"

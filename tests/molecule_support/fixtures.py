"""pytest fixtures shared by the molecule scenarios (imported by molecule/*/tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import testinfra
from testinfra.utils.ansible_runner import AnsibleRunner


@pytest.fixture(scope="session")
def ansible_runner(request) -> AnsibleRunner:
    inventory = request.config.option.ansible_inventory
    assert inventory, "run through molecule (it passes --ansible-inventory)"
    return AnsibleRunner(inventory)


def _hosts(request, runner: AnsibleRunner, group: str) -> dict:
    inventory = request.config.option.ansible_inventory
    names = sorted(runner.get_hosts(group))
    assert names, f"no hosts in group {group}"
    return {n: testinfra.get_host(f"ansible://{n}", ansible_inventory=inventory) for n in names}


@pytest.fixture(scope="session")
def gpus(request, ansible_runner) -> dict:
    """{inventory name: testinfra host} of the GPU servers."""
    return _hosts(request, ansible_runner, "gpu_servers")


@pytest.fixture(scope="session")
def prod(request, ansible_runner):
    """The (first) production backend host."""
    return next(iter(_hosts(request, ansible_runner, "prod_backends").values()))


@pytest.fixture(scope="session")
def phase() -> str:
    """Which step of a multi-step scenario was applied last: the side-effect playbook of the
    rollback scenario writes it to the ephemeral directory; "converge" when none did."""
    marker = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent")) / "phase"
    return marker.read_text().strip() if marker.exists() else "converge"

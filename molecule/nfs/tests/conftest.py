"""Puts tests/ on sys.path (for tests/molecule_support, tests/realnfs) and loads the fixtures."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))

from molecule_support.fixtures import ansible_runner, gpus, prod  # noqa: E402, F401


@pytest.fixture(scope="session")
def vms(ansible_runner) -> dict:  # noqa: F811
    """{inventory name: (address, private key)} of every VM, for direct SSH (tests/realnfs)."""
    out = {}
    for name in ansible_runner.get_hosts("all"):
        v = ansible_runner.get_variables(name)
        out[name] = (v["ansible_host"], v.get("ansible_private_key_file") or v.get("ansible_ssh_private_key_file"))
    return out


@pytest.fixture(scope="session")
def nfs_server(request, ansible_runner):  # noqa: F811
    import testinfra

    name = sorted(ansible_runner.get_hosts("nfs_servers"))[0]
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=request.config.option.ansible_inventory)


def pytest_sessionfinish(session, exitstatus):
    """Marks the end of verify in the scenario's timings (molecule/nfs/timing.yml, destroy.yml)."""
    import os
    import time

    timings = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent")) / "timings"
    if timings.exists():
        with timings.open("a") as f:
            f.write(f"verify {time.time():.3f}\n")

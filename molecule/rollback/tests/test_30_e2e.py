"""List, pull and delete through the backend, in both phases: over NFS while the GPU HTTP servers
are stopped (test_channel checks that they are), and over HTTP again after the restore."""

from molecule_support import INSTALLED_MODEL, VENV, list_pull_delete

testinfra_hosts = ["prod_backends"]


def test_cli_models_list(host):
    assert INSTALLED_MODEL in host.check_output("%s/bin/gpu-bridge models list", VENV)


def test_list_pull_delete(host, gpus):
    list_pull_delete(host, gpus)

"""Every host: the app's venv, PEP 668, the service account, config modes, the share's fstab entry."""

from molecule_support import (
    CONFIG_DIR,
    CREDENTIALS_DIR,
    SHARE_ROOT,
    VENV,
    fstab_entry,
    locked_pins,
    normalize,
    setting,
    venv_packages,
)

testinfra_hosts = ["gpu_servers", "prod_backends"]  # not db-01: the backends' database host (test_60_ha.py)
SYSTEM_PYTHON = "/usr/bin/python3"
# Packages a venv brings of its own (ensurepip), and the app itself: everything else is locked.
VENV_OWN = {"pip", "setuptools", "wheel", "gpu-bridge"}


def test_pep668_marker_kept(host):
    marker = host.file("/usr/lib/python3.11/EXTERNALLY-MANAGED")
    assert marker.is_file, "EXTERNALLY-MANAGED was removed: PEP 668 protection is gone"


def test_system_python_uses_apt_typing_extensions(host):
    """The original deployment's conflict: a pip-installed typing_extensions in
    /usr/local/lib/python3.11/dist-packages shadowing apt's and breaking apt's Python programs."""
    path = host.check_output("%s -c %s", SYSTEM_PYTHON, "import typing_extensions; print(typing_extensions.__file__)")
    assert path == "/usr/lib/python3/dist-packages/typing_extensions.py"
    assert host.run("dpkg --verify python3-typing-extensions").stdout == ""


def test_system_site_packages_untouched(host):
    local = host.file("/usr/local/lib/python3.11/dist-packages")
    if local.exists:
        assert local.listdir() == [], "something was pip-installed into the system Python"


def test_venv_is_isolated(host):
    cfg = host.file(f"{VENV}/pyvenv.cfg")
    assert cfg.is_file
    assert "include-system-site-packages = false" in cfg.content_string
    assert host.file(f"{VENV}/bin/python").linked_to.startswith("/usr/bin/python3")


def test_venv_holds_exactly_the_locked_versions(host):
    locked = locked_pins()
    installed = venv_packages(host)
    wrong = {n: (v, installed.get(n)) for n, v in locked.items() if installed.get(n) != v}
    assert not wrong, f"locked vs installed: {wrong}"
    extra = set(installed) - set(locked) - VENV_OWN
    assert not extra, f"not in app/requirements.lock: {sorted(extra)}"
    assert "gpu-bridge" in installed


def test_venv_has_the_locked_typing_extensions(host):
    locked = locked_pins()[normalize("typing_extensions")]
    code = "import importlib.metadata as m, typing_extensions as t; print(t.__file__); print(m.version(t.__name__))"
    out = host.check_output("%s/bin/python -c %s", VENV, code).splitlines()
    assert out[0].startswith(f"{VENV}/lib/python3.11/site-packages/"), out
    assert out[1] == locked


def test_pip_check(host):
    r = host.run("%s/bin/python -m pip check --disable-pip-version-check", VENV)
    assert r.rc == 0, r.stdout + r.stderr


def test_console_script(host):
    assert host.run("%s/bin/gpu-bridge --help", VENV).rc == 0


def test_service_account(host):
    name = setting(host, "gpu_bridge_common_user")
    user = host.user(name)
    assert user.exists
    assert user.uid == int(setting(host, "gpu_bridge_common_uid"))
    assert user.gid == int(setting(host, "gpu_bridge_common_gid"))
    assert user.group == setting(host, "gpu_bridge_common_group")
    assert user.shell == "/usr/sbin/nologin"
    assert user.groups == [user.group], "the service account needs no other group"


def test_config_and_credentials_dirs(host):
    group = setting(host, "gpu_bridge_common_group")
    conf = host.file(CONFIG_DIR)
    assert (conf.user, conf.group, conf.mode) == ("root", group, 0o750)
    creds = host.file(CREDENTIALS_DIR)
    assert (creds.user, creds.group, creds.mode) == ("root", "root", 0o700)
    for f in creds.listdir():
        secret = host.file(f"{CREDENTIALS_DIR}/{f}")
        assert (secret.user, secret.group, secret.mode) == ("root", "root", 0o600), f


def test_venv_is_root_owned(host):
    # The service account must not be able to change the code it runs.
    assert host.file(VENV).is_directory
    assert host.run("find %s ! -user root -print -quit", VENV).stdout == ""
    assert host.run("find %s -perm -o+w ! -type l -print -quit", VENV).stdout == ""


def test_share_fstab_entry(host):
    """Containers cannot mount NFS: the role writes fstab only (state present) and the share is a
    Docker volume. The options must be the ones that work on real NFS (shared/notes/machine.md)."""
    entry = fstab_entry(host, SHARE_ROOT)
    assert entry, f"no fstab entry for {SHARE_ROOT}"
    assert entry["source"] == setting(host, "gpu_bridge_common_command_share_src")
    assert entry["fstype"] in ("nfs", "nfs4")
    opts = entry["options"].split(",")
    assert opts == setting(host, "gpu_bridge_common_command_share_opts").split(","), opts
    assert "hard" in opts and "_netdev" in opts
    # default lookup caching hides new files from the other host for seconds
    assert any(o in opts for o in ("lookupcache=none", "lookupcache=positive")), opts


def test_share_is_a_mount_point(host):
    # The stand-in for the NFS mount: what the worker's require_mount check and nfs-init look at.
    assert host.mount_point(SHARE_ROOT).exists

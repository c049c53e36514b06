"""scripts/umlvm's probe: which user-mode Linux runs the real-NFS VMs, decided by booting.

Each test puts fake UML kernels in place of the real ones (UMLVM_SYSTEM_UML, UMLVM_UNSTABLE_UML):
one that boots the probe image the way a working UML does (it reads the image and prints what the
probe's /init prints), one that dies the way Debian 12's UML dies on hosts with AVX-512/AMX, one
that hangs without a word. The probe itself is real: it builds its busybox image, starts the
"kernel", reads the console, kills what is left and records its choice.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UMLVM = REPO / "scripts" / "umlvm"

# A working UML: checks that it was handed the probe's image and init, then prints what the
# probe's /init prints in a real guest.
BOOTS = """#!/bin/bash
echo "$0 $*" >>"{calls}"
img=""; init=""
for a in "$@"; do
    case $a in ubd0r=*) img=${{a#ubd0r=}} ;; init=*) init=${{a#init=}} ;; esac
done
[[ -f $img && $init == /init ]] || {{ echo "fake: no probe image or init ($img, $init)"; exit 1; }}
echo "Linux version 9.9.9-fake"
echo "Run /init as init process"
echo "UMLVM-PROBE: booted, kernel 9.9.9-fake, 1 CPU"
echo "reboot: System halted"
"""

# Debian 12's UML on a newer host: dies starting init, then hangs after the panic (UML does not
# exit by itself then, which is why the probe must kill it).
CRASHES = """#!/bin/bash
echo "$0 $*" >>"{calls}"
echo $$ >"{pidfile}"
echo "Linux version 6.1.176 (fake)"
echo "Run /init as init process"
echo "userspace - ptrace set fp regs failed, errno = 14"
echo "Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b"
exec sleep 600
"""

HANGS = """#!/bin/bash
echo "$0 $*" >>"{calls}"
echo $$ >"{pidfile}"
exec sleep 600
"""


def _fake(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"fake-{name}"
    path.write_text(body.format(calls=tmp_path / f"calls-{name}", pidfile=tmp_path / f"pid-{name}"))
    path.chmod(0o755)
    return path


def _calls(tmp_path: Path, name: str) -> int:
    path = tmp_path / f"calls-{name}"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _probe(tmp_path: Path, runtime: str = "auto", **fakes: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "UMLVM_CACHE": str(tmp_path / "cache"),
        "UMLVM_RUNTIME": runtime,
        "UMLVM_PROBE_TIMEOUT": "3",
        "UMLVM_SYSTEM_UML": str(fakes.get("system", tmp_path / "no-such-uml")),
    }
    if "unstable" in fakes:
        env["UMLVM_UNSTABLE_UML"] = str(fakes["unstable"])
        env["UMLVM_UNSTABLE_MODULES"] = str(tmp_path)
    return subprocess.run([str(UMLVM), "probe"], env=env, capture_output=True, text=True, timeout=60)


def _recorded(tmp_path: Path) -> str:
    return (tmp_path / "cache" / "runtime.env").read_text()


def _assert_gone(pidfile: Path) -> None:
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"the probe left the fake kernel (pid {pid}) running")


@pytest.fixture(autouse=True)
def _needs_probe_tools():
    # scripts/setup-dev installs busybox-static; mkfs.ext4 is in every Debian base system.
    for tool in ("busybox", "mkfs.ext4"):
        if subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True).returncode:
            pytest.fail(f"{tool} is missing: run scripts/setup-dev (it installs busybox-static)")


def test_a_booting_system_uml_is_chosen_and_unstable_is_never_built(tmp_path):
    system = _fake(tmp_path, "system", BOOTS)
    unstable = _fake(tmp_path, "unstable", BOOTS)
    r = _probe(tmp_path, system=system, unstable=unstable)
    assert r.returncode == 0, r.stderr
    assert "probe: the system UML" in r.stderr and "boots (kernel 9.9.9-fake, 1 CPU" in r.stderr
    assert _calls(tmp_path, "system") == 1
    assert _calls(tmp_path, "unstable") == 0
    assert "RT_NAME=system" in _recorded(tmp_path)


def test_a_system_uml_that_panics_falls_back_to_unstable_and_says_why(tmp_path):
    system = _fake(tmp_path, "system", CRASHES)
    unstable = _fake(tmp_path, "unstable", BOOTS)
    r = _probe(tmp_path, system=system, unstable=unstable)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "probe:" in line]
    assert len(lines) == 2, r.stderr
    assert "system UML" in lines[0]
    assert "does not boot: userspace - ptrace set fp regs failed, errno = 14" in lines[0]
    assert "unstable UML" in lines[1] and "boots" in lines[1]
    assert "RT_NAME=unstable" in _recorded(tmp_path)
    _assert_gone(tmp_path / "pid-system")  # the panicked kernel was killed, not left hanging


def test_when_no_uml_boots_the_probe_fails_with_each_reason_on_one_line(tmp_path):
    system = _fake(tmp_path, "system", CRASHES)
    unstable = _fake(tmp_path, "unstable", HANGS)
    r = _probe(tmp_path, system=system, unstable=unstable)
    assert r.returncode == 3, r.stderr
    verdict = r.stderr.strip().splitlines()[-1]
    assert "no user-mode Linux boots on this host" in verdict
    assert "ptrace set fp regs failed" in verdict
    assert "no sign of life within 3 s" in verdict
    assert not (tmp_path / "cache" / "runtime.env").exists()
    _assert_gone(tmp_path / "pid-system")
    _assert_gone(tmp_path / "pid-unstable")


def test_a_missing_system_uml_is_reported_as_not_available(tmp_path):
    unstable = _fake(tmp_path, "unstable", BOOTS)
    r = _probe(tmp_path, unstable=unstable)
    assert r.returncode == 0, r.stderr
    assert "system UML: not available:" in r.stderr and "no-such-uml is missing" in r.stderr
    assert "RT_NAME=unstable" in _recorded(tmp_path)


def test_an_explicit_runtime_is_the_only_one_tried(tmp_path):
    system = _fake(tmp_path, "system", BOOTS)
    unstable = _fake(tmp_path, "unstable", CRASHES)
    r = _probe(tmp_path, runtime="unstable", system=system, unstable=unstable)
    assert r.returncode == 3, r.stderr
    assert _calls(tmp_path, "system") == 0
    assert "unstable" in r.stderr and "ptrace set fp regs failed" in r.stderr


def test_an_unknown_runtime_is_refused_with_the_choices(tmp_path):
    r = _probe(tmp_path, runtime="qemu")
    assert r.returncode == 3
    assert "unknown runtime 'qemu' (UMLVM_RUNTIME: auto, system or unstable)" in r.stderr

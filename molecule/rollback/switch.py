#!/usr/bin/env python3
"""Runs a channel-switch playbook as an operator would (``ansible-playbook -i INVENTORY PLAYBOOK``), cut
off from every package index, and records how long it took.

    switch.py RESULTS_JSON PLAYBOOK -i INVENTORY [-i INVENTORY ...]

The cut: this process runs in a network namespace of its own with loopback only (``unshare --net``:
no route to any index, iptables-free), and every way pip or an HTTP library finds an index or a proxy
(PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, HTTP(S)_PROXY) points at a listener on loopback
that counts the connections it gets. The hosts are reached through Docker's unix socket, which no
namespace cuts. A switch that tried to download anything shows up as index_attempts > 0 (or fails).

Appends {"playbook", "seconds" (wall time of ansible-playbook), "rc", "ok", "changed", "failed",
"index_attempts", "tasks": ["role : task" that ran]} to the list under the playbook's name in RESULTS_JSON,
keeps the full output next to it (<playbook>-<n>.log), and prints that record as JSON.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

RECAP = re.compile(r"^\S+\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
TASK = re.compile(r"^TASK \[([\w.-]+ : [^\]]+)\]", re.M)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def isolate() -> None:
    """Re-run this script in a new network namespace with only loopback up (once)."""
    if os.environ.get("SWITCH_ISOLATED") == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    env = {**os.environ, "SWITCH_ISOLATED": "1"}
    os.execvpe("unshare", ["unshare", "--net", sys.executable, *sys.argv], env)  # noqa: S606 - fixed argv


class Trap:
    """A TCP listener on loopback standing for the package index and the proxy: counts connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.count = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.count += 1
            conn.close()


def main() -> int:
    results_path, playbook, *inventory_args = sys.argv[1:]
    isolate()
    trap = Trap()
    url = f"http://127.0.0.1:{trap.port}"
    env = {**os.environ, "PIP_INDEX_URL": f"{url}/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
           "PIP_NO_INPUT": "1", "NO_PROXY": "", "no_proxy": "",
           **{k: url for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")},
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"}
    env.pop("SWITCH_ISOLATED", None)
    results = Path(results_path)
    runs = json.loads(results.read_text()) if results.exists() else {}
    name = Path(playbook).name
    log = results.with_name(f"{Path(playbook).stem}-{len(runs.get(name, [])) + 1}.log")

    start = time.monotonic()
    ansible_playbook = str(Path(sys.executable).parent / "ansible-playbook")
    done = subprocess.run([ansible_playbook, *inventory_args, playbook], env=env, capture_output=True,
                          text=True, check=False)
    seconds = round(time.monotonic() - start, 1)
    output = ANSI.sub("", done.stdout + done.stderr)
    log.write_text(output)

    recap = [tuple(int(n) for n in m) for m in RECAP.findall(output)]
    tasks = sorted(set(TASK.findall(output)))  # "role : task name" of every role task that ran
    record = {"playbook": name, "seconds": seconds, "rc": done.returncode,
              "ok": sum(r[0] for r in recap), "changed": sum(r[1] for r in recap),
              "failed": sum(r[2] + r[3] for r in recap), "index_attempts": trap.count, "tasks": tasks,
              "log": str(log)}
    runs.setdefault(name, []).append(record)
    results.write_text(json.dumps(runs, indent=1))
    print(json.dumps(record))
    if done.returncode != 0:
        print(output[-6000:], file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())

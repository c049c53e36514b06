"""Why the command share's mount options and the open()-based protocol matter, on real NFS.

The seed's bug, reproduced: client B waits for an answer file by checking for its existence.
B looks up a name that does not exist yet (the kernel caches "not found"), A creates the file,
B checks again at once. With default mount options B keeps seeing "missing" (the negative lookup
is trusted until the directory's cached attributes expire: acdirmin=30 s by default). With the
channel's options (lookupcache=positive,acdirmin=0,acdirmax=1) and the open()-based wait of our
protocol, B sees the file at once.

Runs on two NFS clients and one server reachable by SSH as root (scripts/umlvm VMs): each client
gets one agent process (python3 over one SSH connection, commands on stdin), so a round takes a
few milliseconds and "at once" means at once. Every mount uses `nosharecache`, so two mounts of
the same export on one client really get their own options (the effective options are read back
from /proc/self/mountinfo and returned).

Standalone: python3 tests/realnfs/nfs_race.py --umlvm [--rounds 50]  (VMs nfs-01, gpu-01, prod-01)
Library:    run_matrix(...) -> list of Result (used by molecule/nfs/tests/test_nfs_semantics.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DEFAULT_OPTS = "vers=4.2"
OUR_OPTS = "vers=4.2,hard,lookupcache=positive,acdirmin=0,acdirmax=1"
EXPORT = "/srv/nfs/race"

# Runs on the clients: one JSON command per stdin line, one JSON answer per stdout line.
AGENT = r"""
import json, os, subprocess, sys
def mount(src, path, opts):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["umount", "-f", path], capture_output=True)
    r = subprocess.run(["mount", "-t", "nfs", "-o", opts, src, path], capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr.strip()}
    r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "--mountpoint", path],
                       capture_output=True, text=True)
    return {"findmnt": r.stdout.strip()}
BODY = b'{"ok": true}\n'
def publish(path):
    # the channel's writer: tmp name, O_EXCL, fsync, close, rename (the rename publishes)
    d, n = os.path.split(path)
    tmp = os.path.join(d, "." + n + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, BODY); os.fsync(fd); os.close(fd)
    os.rename(tmp, path)
    return {}
def opens(path):
    try:
        with open(path, "rb") as f:
            return {"seen": f.read() == BODY}
    except FileNotFoundError:
        return {"seen": False}
def listdir(path):
    d, n = os.path.split(path)
    return {"seen": n in os.listdir(d)}
ops = {
    "mount": lambda a: mount(a["src"], a["path"], a["opts"]),
    "umount": lambda a: {"rc": subprocess.run(["umount", "-f", a["path"]], capture_output=True).returncode},
    "mkdir": lambda a: (os.makedirs(a["path"], exist_ok=True), {})[1],
    "publish": lambda a: publish(a["path"]),
    "exists": lambda a: {"seen": os.path.exists(a["path"])},
    "open": lambda a: opens(a["path"]),
    "listdir": lambda a: listdir(a["path"]),
}
for line in sys.stdin:
    req = json.loads(line)
    try:
        ans = ops[req["op"]](req)
    except Exception as e:
        ans = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(ans) + "\n"); sys.stdout.flush()
"""


class Agent:
    """python3 on a VM over one SSH connection."""

    def __init__(self, address: str, key: str, user: str = "root"):
        self.address = address
        cmd = [
            "ssh", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", f"{user}@{address}",
            "python3 -u -c " + shlex.quote(AGENT),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def __call__(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent on {self.address} died (op {op})")
        ans = json.loads(line)
        if "error" in ans:
            raise RuntimeError(f"{self.address}: {op} {args}: {ans['error']}")
        return ans

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()


def ssh(address: str, key: str, command: str) -> str:
    return subprocess.run(
        ["ssh", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"root@{address}", command],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def ensure_export(server: str, key: str, clients: str, export: str = EXPORT) -> None:
    """Export a scratch directory (world-writable: root on the clients is squashed)."""
    ssh(
        server,
        key,
        f"set -e; mkdir -p {export}; chmod 1777 {export};"
        " systemctl is-active -q nfs-server || systemctl start nfs-server;"
        f" exportfs -o rw,sync,no_subtree_check {clients}:{export}",
    )


@dataclasses.dataclass
class Result:
    options: str  # "default" or "our"
    method: str  # how the reader waits: "exists" (the seed), "open" (our protocol), "listdir"
    rounds: int
    missed: int
    findmnt_writer: str
    findmnt_reader: str

    def line(self) -> str:
        return f"{self.options} options + {self.method}(): missed {self.missed}/{self.rounds}"


def run_case(writer: Agent, reader: Agent, base: str, options: str, method: str, rounds: int) -> int:
    """Rounds of: reader checks (not there yet), writer creates, reader checks again at once."""
    d = f"{base}/{options}-{method}-{uuid.uuid4().hex[:8]}"
    writer("mkdir", path=d)
    reader("exists", path=d)  # the reader knows the directory, as a polling client does
    missed = 0
    for i in range(rounds):
        name = f"{d}/answer-{i}.json"
        if reader(method, path=name)["seen"]:
            raise RuntimeError(f"{name} seen before it was created")
        writer("publish", path=name)
        if not reader(method, path=name)["seen"]:
            missed += 1
    return missed


def run_matrix(server: str, writer_addr: str, reader_addr: str, key: str, rounds: int = 50,
               export: str = EXPORT, methods=("exists", "open", "listdir")) -> list[Result]:  # fmt: skip
    src = f"{server}:{export}"
    writer, reader = Agent(writer_addr, key), Agent(reader_addr, key)
    results = []
    try:
        for options, opts in (("default", DEFAULT_OPTS), ("our", OUR_OPTS)):
            path = f"/mnt/race-{options}"
            fm = [a("mount", src=src, path=path, opts=f"{opts},nosharecache")["findmnt"] for a in (writer, reader)]
            for method in methods:
                missed = run_case(writer, reader, path, options, method, rounds)
                results.append(Result(options, method, rounds, missed, *fm))
        for a in (writer, reader):
            for options in ("default", "our"):
                a("umount", path=f"/mnt/race-{options}")
    finally:
        writer.close()
        reader.close()
    return results


def verdict(results: list[Result]) -> list[str]:
    by = {(r.options, r.method): r for r in results}
    seed, ours = by["default", "exists"], by["our", "open"]
    return [f"{seed.line()}; {ours.line()}"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--umlvm", action="store_true", help="use scripts/umlvm's nfs-01, gpu-01 (writer), prod-01 (reader)")
    p.add_argument("--server")
    p.add_argument("--writer")
    p.add_argument("--reader")
    p.add_argument("--key")
    p.add_argument("--clients", default="10.213.77.0/24", help="who may mount the scratch export")
    p.add_argument("--rounds", type=int, default=50)
    a = p.parse_args()
    if a.umlvm:
        umlvm = str(REPO / "scripts" / "umlvm")
        ip = lambda n: subprocess.run([umlvm, "ip", n], check=True, capture_output=True, text=True).stdout.strip()  # noqa: E731
        a.server, a.writer, a.reader = a.server or ip("nfs-01"), a.writer or ip("gpu-01"), a.reader or ip("prod-01")
        a.key = a.key or subprocess.run([umlvm, "key"], check=True, capture_output=True, text=True).stdout.strip()
        a.clients = a.clients if a.clients != "10.213.77.0/24" else a.server.rsplit(".", 1)[0] + ".0/24"
    if not (a.server and a.writer and a.reader and a.key):
        p.error("give --umlvm, or --server, --writer, --reader and --key")
    t0 = time.monotonic()
    ensure_export(a.server, a.key, a.clients)
    results = run_matrix(a.server, a.writer, a.reader, a.key, a.rounds)
    for r in results:
        print(r.line())
    print("\n".join(verdict(results)))
    print(f"mounts: default: {results[0].findmnt_reader}\n        our:     {results[-1].findmnt_reader}")
    print(f"({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print the SHA-256 of the app's source tree (paths and contents), on the controller.

The app wheel is cached under this fingerprint: a run, every host and every serial batch reuse the
wheel built once for these sources, and a run on unchanged sources builds nothing (no package index
needed). The files left out are those the build's copy leaves out (tasks/controller.yml).
"""

import hashlib
import os
import sys

SKIPPED = ("build", "dist", "__pycache__")


def skipped(name: str) -> bool:
    return name in SKIPPED or name.startswith(".") or name.endswith(".egg-info")


def fingerprint(root: str) -> str:
    digest = hashlib.sha256()
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not skipped(d))
        for name in sorted(f for f in files if not skipped(f)):
            path = os.path.join(directory, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as fh:
                digest.update(hashlib.sha256(fh.read()).digest())
    return digest.hexdigest()


if __name__ == "__main__":
    print(fingerprint(sys.argv[1]))

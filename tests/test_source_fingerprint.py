"""roles/gpu_bridge_common/files/source_fingerprint.py: the key of the controller's app wheel cache (issue 15).
It must change with every file the wheel build copies, and only with those."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "source_fingerprint", ROOT / "roles" / "gpu_bridge_common" / "files" / "source_fingerprint.py")
assert _spec and _spec.loader
fp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fp)


def _tree(root: Path) -> Path:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / "src" / "pkg" / "mod.py").write_text("A = 1\n")
    return root


def test_a_changed_added_or_renamed_source_changes_it(tmp_path):
    root = _tree(tmp_path)
    before = fp.fingerprint(str(root))
    assert fp.fingerprint(str(root)) == before  # stable
    (root / "src" / "pkg" / "mod.py").write_text("A = 2\n")
    changed = fp.fingerprint(str(root))
    assert changed != before
    (root / "src" / "pkg" / "new.py").write_text("")
    added = fp.fingerprint(str(root))
    assert added != changed
    (root / "src" / "pkg" / "new.py").rename(root / "src" / "pkg" / "other.py")
    assert fp.fingerprint(str(root)) != added


def test_what_the_build_leaves_out_does_not_change_it(tmp_path):
    root = _tree(tmp_path)
    before = fp.fingerprint(str(root))
    for junk in ("build/lib/pkg/mod.py", "dist/x.whl", "src/x.egg-info/PKG-INFO", "src/pkg/__pycache__/mod.pyc",
                 ".git/HEAD", "src/pkg/.mod.py.swp"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_text("junk")
    assert fp.fingerprint(str(root)) == before

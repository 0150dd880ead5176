"""The tracked tree is self-contained: a fresh clone on any machine works the same.

Nothing tracked may point outside the repository (a symlink to a directory of the
machine it was made on dangles everywhere else), and no tracked file outside the tests
may name a machine's home or scratch directory.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# An absolute path into a home, scratch or workspace directory (not, say, "a/tmp/b").
MACHINE_PATH = re.compile(rb"(?<![\w.~-])/(?:tmp|work|root|home|Users)/")


def _tracked() -> list[tuple[str, str]]:
    """``(mode, path)`` of every tracked file; skipped outside a git checkout."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode()
    entries = []
    for entry in filter(None, listing.split("\0")):
        info, path = entry.split("\t", 1)
        entries.append((info.split()[0], path))
    return entries


def test_no_tracked_symlink_leaves_the_tree() -> None:
    leaving = []
    for mode, path in _tracked():
        if mode != "120000":
            continue
        target = os.readlink(ROOT / path)
        inside = (ROOT / path).parent.joinpath(target).resolve().is_relative_to(ROOT)
        if os.path.isabs(target) or not inside:
            leaving.append(f"{path} -> {target}")
    assert not leaving, f"tracked symlinks pointing outside the repository: {leaving}"


def test_no_machine_paths_in_tracked_files() -> None:
    found = []
    for mode, path in _tracked():
        if mode == "120000" or path.startswith("tests/") or not (ROOT / path).is_file():
            continue
        for number, line in enumerate((ROOT / path).read_bytes().splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{path}:{number}: {line.strip()[:120].decode(errors='replace')}")
    assert not found, "tracked files name a machine's directories:\n" + "\n".join(found)

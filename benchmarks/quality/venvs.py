"""One virtual environment per peer, created on first use with pinned versions.

Each peer brings its own framework (TensorFlow, PyTorch, implicit's native code), and their
pins conflict, so none of them is installed into the project's environment. Environments
live in ``benchmarks/quality/.venvs/NAME`` (git-ignored). A stamp file holds the
requirements an environment was made with; a changed pin makes it again.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"

# torch is pinned to the CPU build this machine has on local disk: an unpinned torch
# would pull a multi-GB CUDA build.
REQUIREMENTS: dict[str, list[str]] = {
    "data": ["pyarrow==26.0.1"],
    "implicit": ["implicit==0.7.3"],
    "tfrs": ["tensorflow-cpu==2.21.0", "tf-keras==2.21.0", "tensorflow-recommenders==0.7.7"],
    "recbole": ["torch==2.13.0", "recbole==1.2.1", "numpy==1.26.4"],  # numpy 2 breaks recbole
}


def python(name: str | None) -> str:
    """The interpreter for environment ``name`` (made if missing); ``None`` is this one."""
    if name is None:
        return sys.executable
    path = VENVS / name
    exe = path / "bin" / "python"
    stamp = path / "requirements.txt"
    wanted = "\n".join(REQUIREMENTS[name]) + "\n"
    if exe.exists() and stamp.exists() and stamp.read_text() == wanted:
        return str(exe)
    print(f"[venvs] creating {path.relative_to(HERE)}: {' '.join(REQUIREMENTS[name])}",
          file=sys.stderr, flush=True)
    venv.create(path, with_pip=True, clear=exe.exists())
    subprocess.run([str(exe), "-m", "pip", "install", "-q", *REQUIREMENTS[name]], check=True)
    stamp.write_text(wanted)
    return str(exe)


def freeze(name: str | None) -> list[str]:
    """``pip freeze`` of an environment, recorded with the results."""
    out = subprocess.run([python(name), "-m", "pip", "freeze"], capture_output=True, text=True)
    return out.stdout.split()


if __name__ == "__main__":
    for env in sys.argv[1:] or list(REQUIREMENTS):
        print(env, python(env))

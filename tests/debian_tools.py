"""Programs the tests run that pip does not ship (Prometheus and promtool), taken
from Debian's packages into the repository's `.tools/` where they are not on PATH.

The packages are unpacked, not installed: no service starts, nothing outside the
checkout changes. `python tests/debian_tools.py` fetches them all (make test does).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / ".tools"
PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus"}


def tool(name: str) -> Path:
    """The program `name`: on PATH, already unpacked, or unpacked now."""
    found = shutil.which(name)
    if found:
        return Path(found)
    path = ROOT / "usr" / "bin" / name
    if not path.exists():
        _unpack(PACKAGES[name])
    if not path.exists():
        raise FileNotFoundError(f"Debian package {PACKAGES[name]!r} did not provide {path}")
    return path


def _unpack(package: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True).returncode != 0:
            # No package lists yet on a fresh machine.
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(ROOT)], check=True)


if __name__ == "__main__":
    for name in PACKAGES:
        print(f"{name}: {tool(name)}")
    sys.exit(0)

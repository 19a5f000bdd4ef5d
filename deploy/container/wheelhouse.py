"""The wheelhouse the image is built from (`make image`): every file checked against a hash.

    python deploy/container/wheelhouse.py OUT_DIR

- Every package of deploy/requirements.lock is downloaded with its hashes checked (pip
  --require-hashes), as wheels for the image's interpreter (CPython 3.11 on Debian bookworm, glibc
  2.36, this machine's architecture), whatever Python runs this script.
- A package the index has only as source (sdnotify) is built here into a pure-Python wheel from
  that hash-checked source; consumerd's own wheel is built from a copy of this tree. Both are
  pinned by the hash of the wheel built, as deploy/debian/rules pins consumerd's own.
- OUT_DIR/requirements.txt names each file with its hashes: the image installs with
  `pip install --no-index --require-hashes -r requirements.txt`, resolving nothing on the day.

The downloads are kept while the lock file stays the same; consumerd's wheel is built every time.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "deploy" / "requirements.lock"
PYTHON_VERSION = "3.11"  # bookworm's python3
GLIBC_MINOR = 36  # bookworm's glibc 2.36: manylinux_2_17 .. manylinux_2_36 wheels run on it
SOURCE_SUFFIXES = (".tar.gz", ".zip")
IMAGE_DIR = "/wheels"  # where the Containerfile puts this directory
_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s*\\\s*--hash=sha256:[0-9a-f]{64})+)", re.M)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lock_entries(text: str) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, allowed hashes), for every pinned entry of a pip-compile lock file."""
    entries = {m[1]: (m[2], set(re.findall(r"sha256:([0-9a-f]{64})", m[3]))) for m in _ENTRY.finditer(text)}
    if not entries:
        raise SystemExit(f"wheelhouse: no pinned entries with hashes in {LOCK}")
    return entries


def target_platforms() -> list[str]:
    arch = platform.machine()
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 16, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch in ("x86_64", "i686"):
        tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def download(deps: Path) -> None:
    """The lock's files for the image's interpreter, hashes checked; pure-Python wheels from sources."""
    shutil.rmtree(deps, ignore_errors=True)
    deps.mkdir(parents=True)
    target = ["--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", f"cp{PYTHON_VERSION.replace('.', '')}"]
    for tag in target_platforms():
        target += ["--platform", tag]
    # --no-deps: the lock is complete, and it lets pip take a source archive where no wheel exists.
    pip("download", "--quiet", "--no-deps", "--require-hashes", "--dest", str(deps), *target, "-r", str(LOCK))
    for source in [p for p in deps.iterdir() if p.name.endswith(SOURCE_SUFFIXES)]:
        pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(deps), str(source))


def requirement_lines(deps: Path, entries: dict[str, tuple[str, set[str]]]) -> list[str]:
    """One line per lock entry: `name==version --hash...`, or a wheel built here with its own hash."""
    by_hash = {sha256(p): p for p in deps.iterdir() if p.is_file()}
    wheels = [p for p in deps.iterdir() if p.suffix == ".whl"]
    lines = []
    for name, (version, hashes) in sorted(entries.items()):
        found = [by_hash[h] for h in hashes if h in by_hash]
        if not found:
            raise SystemExit(f"wheelhouse: no file for {name}=={version} matches the lock's hashes")
        if found[0].suffix == ".whl":
            lines.append(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in sorted(hashes)))
            continue
        # Built here from the checked source: it must run on any interpreter, not just this one.
        prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
        built = [w for w in wheels if w.name.lower().startswith(prefix)]
        if len(built) != 1 or not built[0].name.endswith("-none-any.whl"):
            raise SystemExit(f"wheelhouse: {name}=={version} has no wheel; its source did not build into one pure-Python wheel")
        lines.append(pin(built[0]))
        found[0].unlink()  # the image installs the wheel; the source archive is not needed there
    return lines


def pin(wheel: Path) -> str:
    return f"{IMAGE_DIR}/{wheel.parent.name}/{wheel.name} --hash=sha256:{sha256(wheel)}"


def own_wheel(app: Path) -> Path:
    """consumerd's wheel, built from a copy: the checkout may be read-only, and a build writes in it."""
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="consumerd-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(REPO / "consumerd", src / "consumerd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Fixed timestamps: the same source makes the same wheel, so podman reuses its cached layers.
        os.environ.setdefault("SOURCE_DATE_EPOCH", "315532800")
        pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(app), str(src))
    (wheel,) = app.glob("consumerd-*.whl")
    return wheel


def main(out: Path) -> int:
    text = LOCK.read_text()
    entries = lock_entries(text)
    deps, stamp = out / "deps", out / "deps.sha256"
    key = hashlib.sha256((text + " ".join(target_platforms())).encode()).hexdigest()
    if not (stamp.exists() and stamp.read_text().strip() == key and (out / "deps.txt").exists()):
        download(deps)
        (out / "deps.txt").write_text("\n".join(requirement_lines(deps, entries)) + "\n")
        stamp.write_text(key + "\n")
    wheel = own_wheel(out / "app")
    (out / "requirements.txt").write_text((out / "deps.txt").read_text() + pin(wheel) + "\n")
    count = sum(1 for p in deps.iterdir() if p.suffix == ".whl")
    print(f"wheelhouse: {count} locked wheels + {wheel.name} in {os.path.relpath(out, REPO)}, every hash pinned")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sys.exit(main(Path(sys.argv[1]).resolve()))

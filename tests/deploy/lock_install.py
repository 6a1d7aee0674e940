#!/usr/bin/python3
"""Installs the exact packages of a package-lock.json (lockfile version 2 or 3) into
node_modules/, like `npm ci` for a lockfile whose packages have no install scripts.

usage: lock_install.py DIR        (DIR holds package-lock.json; DIR/node_modules is replaced)

Every "node_modules/..." entry is downloaded from its "resolved" URL (or, when the lockfile leaves it
out, the registry's standard URL for its name and version), checked against its "integrity"
(Subresource Integrity, sha512/sha384/sha256), and unpacked at its path. An entry with an
install script or without an integrity is refused: this is not a general
npm, only what the deployment checks need without Debian's npm package and its ~390
dependencies (nodejs alone runs the validators).
"""
import base64
import hashlib
import io
import json
import shutil
import sys
import tarfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

ATTEMPTS = 3
REGISTRY = "https://registry.npmjs.org"


def fail(msg):
    sys.exit(f"lock_install: {msg}")


def fetch(url):
    last = None
    for _ in range(ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return r.read()
        except OSError as e:
            last = e
    fail(f"cannot download {url}: {last}")


def check_integrity(name, data, integrity):
    for item in integrity.split():
        algo, _, want = item.partition("-")
        if algo in ("sha512", "sha384", "sha256"):
            got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
            if got == want:
                return
            fail(f"{name}: {algo} of the download does not match the lockfile")
    fail(f"{name}: no supported hash in integrity {integrity!r}")


def tarball_url(path, meta):
    """The lockfile's resolved URL, else the registry's: <name>/-/<unscoped name>-<version>.tgz."""
    if "resolved" in meta:
        return meta["resolved"]
    name = path.rsplit("node_modules/", 1)[1]
    return f"{REGISTRY}/{name}/-/{name.rsplit('/', 1)[-1]}-{meta['version']}.tgz"


def unpack(name, data, dest):
    """Unpacks the tarball's single top-level folder (npm's "package/") into dest."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            parts = PurePosixPath(m.name).parts
            if len(parts) < 2 or not (m.isfile() or m.isdir()):
                continue
            rel = PurePosixPath(*parts[1:])
            if rel.is_absolute() or ".." in rel.parts:
                fail(f"{name}: unsafe path {m.name!r} in its tarball")
            target = dest / rel
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            target.chmod(0o755 if m.mode & 0o111 else 0o644)


def main():
    if len(sys.argv) != 2:
        fail("usage: lock_install.py DIR")
    root = Path(sys.argv[1])
    lock = json.loads((root / "package-lock.json").read_text())
    if lock.get("lockfileVersion") not in (2, 3):
        fail(f"lockfileVersion {lock.get('lockfileVersion')!r}: only 2 and 3 are read")
    entries = []
    for path, meta in lock["packages"].items():
        if not path:
            continue  # the project itself
        if not path.startswith("node_modules/") or ".." in PurePosixPath(path).parts:
            fail(f"unexpected package path {path!r}")
        if meta.get("hasInstallScript"):
            fail(f"{path} has an install script: use npm ci")
        if "integrity" not in meta or "version" not in meta:
            fail(f"{path} has no version or integrity")
        entries.append((path, meta))

    with ThreadPoolExecutor(max_workers=8) as pool:
        blobs = list(pool.map(lambda e: fetch(tarball_url(*e)), entries))
    staging = root / "node_modules.new"
    shutil.rmtree(staging, ignore_errors=True)
    for (path, meta), data in zip(entries, blobs):
        check_integrity(path, data, meta["integrity"])
        unpack(path, data, staging / PurePosixPath(path).relative_to("node_modules"))
    shutil.rmtree(root / "node_modules", ignore_errors=True)
    staging.rename(root / "node_modules")
    print(f"lock_install: {len(entries)} packages into {root / 'node_modules'}")


if __name__ == "__main__":
    main()

"""File primitives shared by the run directory, the exporters and eval: atomic writes, content hashes, hard-linked folders.

A killed run must never leave a half-written file that looks complete: every file is written
under a temporary name in the same folder and renamed (``os.replace`` is atomic on POSIX), and
every stage folder is built under ``.tmp-*`` and renamed once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0o666 minus the process umask: the mode of a file created with a plain ``open(path, "w")``."""
    return 0o666 & ~_umask()


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and rename it."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, streamed (no more than 1 MiB in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(root: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every regular file under ``root`` (sorted, symlinks followed).

    Args:
        root: a folder.
        skip: relative paths to leave out (e.g. the stage record itself).
    """
    root = Path(root)
    skip = set(skip)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel in skip or p.is_dir() or any(part.startswith(".tmp") for part in p.relative_to(root).parts):
            continue
        out[rel] = sha256_file(p)
    return out


def tree_hash(files: dict[str, str]) -> str:
    """One hash for a ``{relative path: sha256}`` mapping."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def canonical_hash(obj: Any) -> str:
    """SHA-256 of an object as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def link_tree(src: Path, dst: Path, skip: Iterable[str] = ()) -> None:
    """Mirror ``src`` into ``dst`` with hard links (no data copied); copy when linking is impossible.

    Hard links keep ``final/`` and stage folders free of second copies of large weights. Across
    file systems (EXDEV) or where links are not allowed, files are copied.
    """
    src, dst = Path(src), Path(dst)
    skip = set(skip)
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if rel.as_posix() in skip or rel.parts[0] in skip or any(part.startswith(".tmp") for part in rel.parts):
            continue
        target = dst / rel
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        real = p.resolve()
        try:
            os.link(real, target)
        except OSError:
            shutil.copy2(real, target)


def make_tmp_dir(parent: Path, name: str) -> Path:
    """A fresh ``parent/.tmp-<name>-XXXX`` folder for building something atomically.

    ``mkdtemp`` creates it 0700; it gets the mode a plain ``mkdir`` would give (0777 minus the
    umask), so the folder it becomes once renamed is readable like every other output.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def publish_dir(tmp: Path, final: Path) -> Path:
    """Rename a completed temporary folder into place, replacing an older one atomically enough.

    The old folder (if any) is renamed aside first and removed after the new one is in place,
    so at every moment either the complete old or the complete new folder exists.
    """
    final = Path(final)
    if final.exists() or final.is_symlink():
        aside = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def dir_size_mb(path: Path) -> float:
    """Size on disk of the files under ``path`` in MB (10^6 bytes), hard links counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in Path(path).rglob("*"):
        if p.is_file():
            st = p.stat()
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_size
    return total / 1e6

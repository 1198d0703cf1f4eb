"""File helpers with the registry's guarantees: atomic replacement, fsync, sha256.

Stdlib only. Training uses :func:`write_atomic` too, so a crash never leaves half a
checkpoint, metrics file or manifest behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """Make a rename/creation in ``path`` durable (best effort: not every fs supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _iter_source(src: Path | bytes) -> Iterator[bytes]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        yield bytes(src)
        return
    with open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def copy_hashed(src: Path | bytes, dst: Path) -> dict[str, Any]:
    """Copy ``src`` to a new file ``dst`` (fsynced), hashing exactly the bytes written."""
    h = hashlib.sha256()
    size = 0
    with open(dst, "xb") as out:
        for chunk in _iter_source(src):
            out.write(chunk)
            h.update(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return {"sha256": h.hexdigest(), "size": size}


def tmp_name(label: str = "") -> str:
    """A unique temporary name; registry readers skip names with this prefix."""
    return f"{TMP_PREFIX}{secrets.token_hex(8)}{'-' + label if label else ''}"


def write_atomic(path: Path, data: bytes | str, durable: bool = True) -> None:
    """Write via a temp file in the same folder + os.replace: readers never see half a file.

    ``durable`` also fsyncs file and folder, so the new content survives a power cut;
    per-epoch training files skip it (a lost epoch is cheap, fsyncing 100 MB is not).
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(tmp_name(path.name))
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def write_json_atomic(path: Path, obj: Any, durable: bool = True) -> None:
    write_atomic(path, dump_json(obj), durable)


def remove_tree_or_file(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_tmp(folder: Path, max_age: float) -> list[str]:
    """Remove temp leftovers older than ``max_age`` seconds; returns their names.

    Young ones may belong to a writer that is still copying.
    """
    removed = []
    now = time.time()
    for p in folder.glob(TMP_PREFIX + "*"):
        try:
            if now - p.lstat().st_mtime > max_age:
                remove_tree_or_file(p)
                removed.append(p.name)
        except OSError:
            pass
    return removed

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

try:  # POSIX; without it an owner's liveness cannot be probed and only age counts
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TMP_PREFIX = ".tmp-"
CHUNK = 1 << 20
# A publisher's temp folder ``.tmp-X`` comes with ``.tmp-X.owner``, a file the publisher
# holds locked (flock) for as long as it lives: the kernel drops the lock when the process
# dies, however it dies, so debris is told from work in progress without guessing from age.
OWNER_SUFFIX = ".owner"
# A temp entry without an owner is debris once it is this old: registry writers create
# their temp files under the model lock, so a minute is generous.
UNOWNED_GRACE_SECONDS = 60.0


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


def check_file(path: Path, sha256: str, size: int) -> str | None:
    """What is wrong with the file at ``path`` against its recorded size and sha256."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_file():
        return "missing"
    found_size = path.stat().st_size
    if found_size != size:
        return f"size mismatch (expected {size} bytes, found {found_size})"
    digest = sha256_file(path)
    if digest != sha256:
        return f"sha256 mismatch (expected {sha256[:12]}..., found {digest[:12]}...)"
    return None


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


class OwnedTmpDir:
    """A temp folder ``.tmp-X`` whose owner holds ``.tmp-X.owner`` locked until :meth:`release`.

    The lock file lives beside the folder, so renaming the folder into place moves only
    what was published; it is locked under a third name and renamed, so a cleaner never
    finds it before it is held.
    """

    def __init__(self, parent: Path, label: str = "") -> None:
        name = tmp_name(label)
        self.path = parent / name
        self.lock = parent / (name + OWNER_SUFFIX)
        pending = parent / (name + OWNER_SUFFIX + ".new")
        self._fd: int | None = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(pending, self.lock)
            self.path.mkdir()
        except BaseException:
            pending.unlink(missing_ok=True)
            self.release()
            raise

    def release(self) -> None:
        """Remove the lock file, then drop the lock (the folder is the caller's business)."""
        if self._fd is not None:
            self.lock.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _owner_alive(lock: Path) -> bool:
    """Whether a live process holds ``lock`` (a probe that never waits)."""
    if fcntl is None:  # pragma: no cover - no flock: trust age only
        return time.time() - lock.stat().st_mtime < 3600
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's lock at once
    return False


def tmp_entries(folder: Path, others_writing: bool = True) -> list[tuple[Path, bool]]:
    """Every temp entry of ``folder`` and whether it is live.

    An entry with an owner file is live while its owner holds the lock. An unowned entry
    (a derived file being copied, a journal being replaced) is written only under the
    registry lock of ``folder``: with ``others_writing`` False (the caller holds that lock,
    or found it free) it is debris at once; otherwise it counts as live while young. A
    folder comes before its ``.owner`` file.
    """
    entries = sorted(folder.glob(TMP_PREFIX + "*"))
    owners = {
        p.name.removesuffix(OWNER_SUFFIX): p for p in entries if p.name.endswith(OWNER_SUFFIX)
    }
    probed: dict[Path, bool] = {}
    out = []
    now = time.time()
    for p in entries:
        lock = owners.get(p.name.removesuffix(OWNER_SUFFIX))
        try:
            if lock is not None:
                if lock not in probed:
                    probed[lock] = _owner_alive(lock)
                alive = probed[lock]
            elif p.name.endswith(OWNER_SUFFIX + ".new"):
                # an owner file being created (outside any registry lock): locked by its
                # creator a moment after it appears, so a young one may still be on its way
                young = now - p.lstat().st_mtime < UNOWNED_GRACE_SECONDS
                alive = young or _owner_alive(p)
            else:
                alive = others_writing and now - p.lstat().st_mtime < UNOWNED_GRACE_SECONDS
        except FileNotFoundError:
            continue  # its owner finished meanwhile
        except OSError:
            alive = True  # cannot tell: keep it
        out.append((p, alive))
    return out


def remove_dead_tmp(folder: Path, others_writing: bool = True) -> list[str]:
    """Remove the temp entries of dead writers (see :func:`tmp_entries`); their names."""
    removed = []
    for p, alive in tmp_entries(folder, others_writing):
        if not alive:
            try:
                remove_tree_or_file(p)
            except OSError:
                continue  # e.g. a read-only registry: harmless, verify keeps reporting it
            removed.append(p.name)
    return removed

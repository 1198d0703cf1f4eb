"""A registry in a local folder (the default): POSIX renames, fsync, a file lock.

A publish copies into an owned temp folder and renames it into place (the commit point);
every other writer holds ``<model>/.lock`` (filelock); alias writes too, and their
compare-and-swap token is the sha256 of aliases.json. Stdlib and filelock only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

from registry.errors import ConflictError, IntegrityError
from registry.files import (
    OWNER_SUFFIX,
    OwnedTmpDir,
    check_file,
    copy_hashed,
    fsync_dir,
    remove_dead_tmp,
    sha256_bytes,
    tmp_entries,
    tmp_name,
    write_atomic,
)
from registry.manifest import MANIFEST_DIGEST_FILE, MANIFEST_FILE, FileEntry
from registry.storage import ABSENT, Debris, Staging, Storage

LOCK_NAME = ".lock"
LOCK_TIMEOUT_SECONDS = 120.0


def _is_version(name: str) -> bool:
    return name.isascii() and name.isdigit() and len(name) <= 18


class LocalStaging(Staging):
    """An owned temp folder in the model's folder, renamed into place by :meth:`commit`."""

    def __init__(self, model_dir: Path) -> None:
        model_dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = model_dir
        self.owned = OwnedTmpDir(model_dir, "publish")
        self.path = self.owned.path

    def add(self, filename: str, src: Path | bytes) -> FileEntry:
        return FileEntry.from_dict(copy_hashed(src, self.path / filename))

    def drop(self, filename: str) -> None:
        (self.path / filename).unlink(missing_ok=True)

    def commit(self, model: str, version: str, manifest: bytes, digest: bytes) -> None:
        for filename, data in ((MANIFEST_FILE, manifest), (MANIFEST_DIGEST_FILE, digest)):
            with open(self.path / filename, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(self.path)
        os.rename(self.path, self.model_dir / version)  # the commit point: atomic on POSIX
        fsync_dir(self.model_dir)

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)  # nothing left after a commit
        self.owned.release()


class LocalStorage(Storage):
    alias_writes_locked = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    # -- reading

    def list_names(self, key: str = "") -> list[str]:
        folder = self._path(key)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir())

    def model_exists(self, model: str) -> bool:
        return self._path(model).is_dir()

    def version_numbers(self, model: str) -> list[int]:
        model_dir = self._path(model)
        if not model_dir.is_dir():
            return []
        # Only renamed-into-place folders count: they hold a manifest by construction.
        return sorted(
            int(p.name)
            for p in model_dir.iterdir()
            if _is_version(p.name) and p.is_dir() and (p / MANIFEST_FILE).is_file()
        )

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def read_state(self, key: str) -> tuple[bytes | None, str]:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None, ABSENT
        return data, sha256_bytes(data)

    def read_state_if_changed(self, key: str, token: str) -> tuple[bytes | None, str] | None:
        state = self.read_state(key)  # a local read of a small file costs what a stat does
        return None if state[1] == token else state

    def check(self, key: str, entry: FileEntry) -> str | None:
        return check_file(self._path(key), entry.sha256, entry.size)

    def local_file(self, key: str, entry: FileEntry, filename: str) -> Path:
        # checked in place: the name is the stored file's own
        problem = self.check(key, entry)
        if problem:
            raise IntegrityError(problem)
        return self._path(key)

    def version_files(self, model: str, version: str) -> list[str]:
        return self.list_names(f"{model}/{version}")

    def version_path(self, model: str, version: str) -> Path:
        return self.root / model / version

    # -- writing

    @contextmanager
    def lock(self, model: str, create: bool) -> Iterator[None]:
        model_dir = self._path(model)
        if create:
            model_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(model_dir / LOCK_NAME), timeout=LOCK_TIMEOUT_SECONDS)
        try:
            lock.acquire()
        except filelock.Timeout as e:
            raise ConflictError(f"registry lock for {model!r} is busy; try again") from e
        try:
            yield
        finally:
            lock.release()

    def _lock_is_free(self, model: str) -> bool:
        """Whether no writer holds ``model``'s lock now (a probe that never waits)."""
        path = self._path(model) / LOCK_NAME
        if not path.exists():
            return True  # every writer creates it before locking: none has started
        lock = filelock.FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except (filelock.Timeout, OSError):
            return False  # busy, or cannot tell (read-only): assume a writer
        lock.release()
        return True

    def write(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), data)

    def write_state(self, key: str, data: bytes, expected: str) -> str:
        # Alias writers hold the model's lock here, so nothing moves between check and write.
        if self.read_state(key)[1] != expected:
            raise ConflictError(f"{key} was changed by another writer")
        write_atomic(self._path(key), data)
        return sha256_bytes(data)

    def append_line(self, key: str, line: str) -> None:
        try:
            with open(self._path(key), "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            pass

    def copy(self, key: str, new_key: str) -> None:
        write_atomic(self._path(new_key), self.read(key))

    def replace_file(self, key: str, src: Path | bytes) -> FileEntry:
        path = self._path(key)
        tmp = path.with_name(tmp_name(path.name))
        try:
            entry = FileEntry.from_dict(copy_hashed(src, tmp))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
        return entry

    def stage(self, model: str) -> LocalStaging:
        return LocalStaging(self._path(model))

    def remove_version(self, model: str, version: str, still_unused: Callable[[], bool]) -> bool:
        model_dir = self._path(model)
        # Rename first so the version vanishes atomically even if rmtree is interrupted.
        doomed = model_dir / tmp_name(f"deleted-{version}")
        os.rename(model_dir / version, doomed)
        fsync_dir(model_dir)
        if not still_unused():
            os.rename(doomed, model_dir / version)
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _folders(self, model: str) -> list[Path]:
        model_dir = self._path(model)
        return [model_dir] + [model_dir / str(n) for n in self.version_numbers(model)]

    def remove_debris(self, model: str) -> list[str]:
        # The caller holds the lock: an unowned temp entry cannot be anyone's work.
        return [
            (folder / name).relative_to(self.root).as_posix()
            for folder in self._folders(model)
            for name in remove_dead_tmp(folder, others_writing=False)
        ]

    def debris(self, model: str) -> list[Debris]:
        others_writing = not self._lock_is_free(model)
        found = []
        for folder in self._folders(model):
            entries = tmp_entries(folder, others_writing)
            folders_named = {p.name for p, _ in entries}
            for p, alive in entries:
                if p.name.removesuffix(OWNER_SUFFIX) in folders_named - {p.name}:
                    continue  # the lock file of a folder listed already
                where = p.relative_to(self.root).as_posix()
                found.append(Debris(where, alive, "folder" if p.is_dir() else "file"))
        return found

    @contextmanager
    def scratch(self, model: str) -> Iterator[Path]:
        model_dir = self._path(model)
        model_dir.mkdir(parents=True, exist_ok=True)
        owned = OwnedTmpDir(model_dir, "scratch")
        try:
            yield owned.path
        finally:
            shutil.rmtree(owned.path, ignore_errors=True)
            owned.release()

"""File-based model registry: immutable, checksummed versions plus movable aliases.

Layout::

    <root>/<name>/<version>/manifest.json      typed manifest (registry.manifest) with the
                                               sha256/size of every published file
    <root>/<name>/<version>/<published files>  never modified after publication
    <root>/<name>/<version>/exports.json       derived files (model.ts, model.onnx), rebuildable
    <root>/<name>/aliases.json                 {"aliases": {...}, "history": {...}}
    <root>/<name>/deleted.json                 versions removed by `delete` (never reused)

Standard library and ``filelock`` only, so training, the service and the CLI import it
without pulling in torch or FastAPI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import filelock

from registry.errors import (
    ConflictError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
)
from registry.files import (
    TMP_PREFIX,
    copy_hashed,
    dump_json,
    fsync_dir,
    remove_stale_tmp,
    sha256_file,
    tmp_name,
    write_atomic,
)
from registry.manifest import (
    EXPORTS_FILE,
    MANIFEST_FILE,
    FileEntry,
    Manifest,
    VersionSpec,
)

# Used with fullmatch(): a "$" anchor would let a trailing newline through.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION_RE = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() accepts "²"
ALIASES = "aliases.json"
DELETED = "deleted.json"
LOCK_NAME = ".lock"
DEFAULT_ALIAS = "production"
STALE_TMP_SECONDS = 3600.0
LOCK_TIMEOUT_SECONDS = 120.0
_RESERVED_FILES = frozenset({MANIFEST_FILE, EXPORTS_FILE})


@dataclass(frozen=True)
class ModelVersion:
    """One published version. ``manifest`` raises IntegrityError if it could not be read."""

    name: str
    version: str
    path: Path
    # Excluded from eq/hash: the identity is name+version+path.
    _manifest: Manifest | None = field(compare=False, repr=False)
    problem: str | None = field(default=None, compare=False, repr=False)

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise IntegrityError(self.problem or f"{MANIFEST_FILE} of {self.ref} is unreadable")
        return self._manifest

    def file(self, filename: str) -> Path:
        """Path of a file in this version's folder (name validated, content not checked)."""
        validate_name(filename, "file name")
        return self.path / filename


# ---------------------------------------------------------------------------- helpers


def _valid_name(value: object) -> bool:
    # One rule for model, alias and file names: a plain name can never escape its folder.
    return isinstance(value, str) and bool(_NAME_RE.fullmatch(value)) and ".." not in value


def is_version(value: object) -> bool:
    return isinstance(value, str) and bool(_VERSION_RE.fullmatch(value))


def validate_name(value: object, what: str = "name") -> str:
    if not _valid_name(value):
        raise InvalidNameError(
            f"invalid {what} {value!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..'"
        )
    return str(value)


def _check_alias(alias: object) -> str:
    validate_name(alias, "alias name")
    # A numeric alias would be indistinguishable from a version in "name@3".
    if is_version(alias):
        raise InvalidNameError(f"invalid alias name {alias!r}: must not be a number")
    return str(alias)


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path.name} of {path.parent.name} is unreadable: {e}") from e


def _code_revision() -> str:
    """``git rev-parse HEAD`` (+ "-dirty") of the current directory, or "unknown"."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        rev = head.stdout.strip()
        if head.returncode != 0 or not rev:
            return "unknown"
        status = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=30
        )
        dirty = status.returncode == 0 and bool(status.stdout.strip())
        return rev + ("-dirty" if dirty else "")
    except Exception:  # provenance is best effort: never block a publish on git
        return "unknown"


def check_entry(folder: Path, filename: str, entry: object) -> str | None:
    """Return a problem (naming the file) or None if the file matches its entry."""
    if isinstance(entry, dict):
        try:
            entry = FileEntry.from_dict(entry)
        except ValueError:
            return f"{filename}: malformed checksum entry"
    if not isinstance(entry, FileEntry):
        return f"{filename}: malformed checksum entry"
    path = folder / filename
    if path.is_symlink():
        return f"{filename}: is a symbolic link"
    if not path.is_file():
        return f"{filename}: missing"
    size = path.stat().st_size
    if size != entry.size:
        return f"{filename}: size mismatch (expected {entry.size} bytes, found {size})"
    digest = sha256_file(path)
    if digest != entry.sha256:
        return (
            f"{filename}: sha256 mismatch (expected {entry.sha256[:12]}..., found {digest[:12]}...)"
        )
    return None


def split_ref(ref: str) -> tuple[str, str | None]:
    """``name[@version|@alias]`` -> (name, rest or None)."""
    name, sep, rest = ref.partition("@")
    if sep and not rest:
        raise InvalidNameError(f"invalid reference {ref!r}: nothing after '@'")
    return validate_name(name, "model name"), (rest if sep else None)


# ---------------------------------------------------------------------------- registry


class Registry:
    """A model registry rooted at ``root`` (created lazily on first publish)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # -- paths and locking

    def _model_dir(self, name: str) -> Path:
        return self.root / validate_name(name, "model name")

    @contextmanager
    def _locked(self, name: str, create: bool = False) -> Iterator[Path]:
        model_dir = self._model_dir(name)
        if create:
            model_dir.mkdir(parents=True, exist_ok=True)
        elif not model_dir.is_dir():  # don't leave an empty folder behind for a typo
            raise NotFoundError(self._unknown_model_message(name))
        lock = filelock.FileLock(str(model_dir / LOCK_NAME), timeout=LOCK_TIMEOUT_SECONDS)
        try:
            lock.acquire()
        except filelock.Timeout as e:
            raise ConflictError(f"registry lock for {name!r} is busy; try again") from e
        try:
            yield model_dir
        finally:
            lock.release()

    def _version_numbers(self, name: str) -> list[int]:
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            return []
        # Only renamed-into-place folders count: they hold a manifest by construction.
        return sorted(
            int(p.name)
            for p in model_dir.iterdir()
            if is_version(p.name) and p.is_dir() and (p / MANIFEST_FILE).is_file()
        )

    def _deleted(self, name: str) -> list[str]:
        path = self._model_dir(name) / DELETED
        if not path.is_file():
            return []
        data = read_json(path)
        if not isinstance(data, dict):
            raise IntegrityError(f"{DELETED} of {name!r} is not a JSON object")
        return [str(v) for v in data.get("deleted", [])]

    def _load(self, name: str, version: str, strict: bool = True) -> ModelVersion:
        path = self._model_dir(name) / version
        try:
            manifest = Manifest.from_dict(
                read_json(path / MANIFEST_FILE), f"{MANIFEST_FILE} of {name}@{version}"
            )
        except IntegrityError as e:
            if strict:
                raise
            # listings stay usable; verify() reports the problem
            return ModelVersion(name, version, path, None, str(e))
        return ModelVersion(name, version, path, manifest)

    # -- listing

    def names(self) -> list[str]:
        """Model names with at least one version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if _valid_name(p.name) and p.is_dir() and self._version_numbers(p.name)
        )

    def versions(self, name: str) -> list[ModelVersion]:
        """All versions of ``name``, oldest first; NotFoundError if it has none."""
        numbers = self._version_numbers(name)
        if not numbers:
            raise NotFoundError(self._unknown_model_message(name))
        return [self._load(name, str(n), strict=False) for n in numbers]

    def aliases(self, name: str) -> dict[str, str]:
        """Current alias -> version mapping of ``name`` ({} if none)."""
        return self._read_aliases(name)[0]

    def alias_history(self, name: str) -> dict[str, list[str]]:
        """Every target each alias has had, oldest first; the last item is current."""
        return self._read_aliases(name)[1]

    def aliases_of(self, mv: ModelVersion) -> list[str]:
        """The aliases that point at ``mv`` now, sorted."""
        return sorted(a for a, v in self.aliases(mv.name).items() if v == mv.version)

    def _read_aliases(self, name: str) -> tuple[dict[str, str], dict[str, list[str]]]:
        path = self._model_dir(name) / ALIASES
        if not path.is_file():
            return {}, {}
        data = read_json(path)
        if not isinstance(data, dict):
            raise IntegrityError(f"{ALIASES} of {name!r} is not a JSON object")
        if "aliases" not in data:  # tolerate the flat {"production": "3"} form
            data = {"aliases": data, "history": {}}
        try:
            current = {str(k): str(v) for k, v in dict(data.get("aliases") or {}).items()}
            history = {
                str(k): [str(x) for x in v] for k, v in dict(data.get("history") or {}).items()
            }
        except (TypeError, ValueError) as e:
            raise IntegrityError(f"{ALIASES} of {name!r} has an unexpected shape: {e}") from e
        for alias, target in current.items():
            if not history.get(alias) or history[alias][-1] != target:
                history.setdefault(alias, []).append(target)
        return current, history

    def _write_aliases(
        self, name: str, current: dict[str, str], history: dict[str, list[str]]
    ) -> None:
        path = self._model_dir(name) / ALIASES
        write_atomic(path, dump_json({"aliases": current, "history": history}))

    # -- resolution

    def _unknown_model_message(self, name: str) -> str:
        known = self.names()
        return f"model {name!r} not found; models: {', '.join(known) or '(none)'}"

    def _resolve_version(self, name: str, version_or_alias: str | None) -> str:
        numbers = self._version_numbers(name)
        if not numbers:
            raise NotFoundError(self._unknown_model_message(name))
        existing = [str(n) for n in numbers]
        current = self.aliases(name)
        if version_or_alias is None:  # bare name: production if promoted, else the latest
            version_or_alias = DEFAULT_ALIAS if DEFAULT_ALIAS in current else existing[-1]
        if is_version(version_or_alias):
            version = str(int(version_or_alias))  # "03" -> "3"
            if version not in existing:
                raise NotFoundError(
                    f"version {version_or_alias} of {name!r} not found; "
                    f"versions: {', '.join(existing)}"
                )
            return version
        if version_or_alias not in current:
            listed = ", ".join(f"{a} -> {v}" for a, v in sorted(current.items())) or "(none)"
            raise NotFoundError(
                f"alias {version_or_alias!r} of {name!r} not found; aliases: {listed}; "
                f"versions: {', '.join(existing)}"
            )
        target = current[version_or_alias]
        if target not in existing:
            raise NotFoundError(
                f"alias {version_or_alias!r} of {name!r} points to version {target}, "
                f"which does not exist; versions: {', '.join(existing)}"
            )
        return target

    def resolve(self, name: str, version_or_alias: str) -> ModelVersion:
        """The version ``name@version_or_alias`` (a version number or an alias)."""
        validate_name(name, "model name")
        if not version_or_alias:
            raise InvalidNameError("empty version or alias")
        return self._load(name, self._resolve_version(name, version_or_alias))

    def get(self, ref: str) -> ModelVersion:
        """Resolve ``name``, ``name@3`` or ``name@alias`` (bare name: production, else latest)."""
        name, rest = split_ref(ref)
        return self._load(name, self._resolve_version(name, rest))

    # -- publication

    def publish(
        self,
        name: str,
        files: Mapping[str, Path | bytes],
        spec: VersionSpec,
        parent: str | None = None,
    ) -> ModelVersion:
        """Publish ``files`` (path or bytes per file name) as the next version of ``name``.

        The manifest is ``spec`` plus what the registry adds: name, version, created,
        code_revision, parent and the sha256/size of every file.
        """
        # Validate everything before touching the disk: a refused publish leaves no trace.
        model_dir = self._model_dir(name)
        for filename, src in files.items():
            validate_name(filename, "file name")
            if filename in _RESERVED_FILES:
                raise InvalidNameError(f"file name {filename!r} is reserved by the registry")
            if not isinstance(src, (bytes, bytearray, memoryview)) and not Path(src).is_file():
                raise NotFoundError(f"source file for {filename!r} not found: {src}")
        if parent is not None and not isinstance(parent, str):
            raise TypeError("parent must be a string or None")
        if not isinstance(spec, VersionSpec):
            raise TypeError("spec must be a registry.manifest.VersionSpec")
        revision = _code_revision()

        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / tmp_name()
        tmp.mkdir()
        try:
            # The slow part (copy + hash) runs outside the lock so publishes overlap.
            checksums = {
                fn: FileEntry.from_dict(copy_hashed(src, tmp / fn)) for fn, src in files.items()
            }
            with self._locked(name, create=True):
                remove_stale_tmp(model_dir, STALE_TMP_SECONDS)
                used = self._version_numbers(name) + [
                    int(v) for v in self._deleted(name) if is_version(v)
                ]
                # History may name versions whose folders are gone; never reuse a number.
                for targets in self.alias_history(name).values():
                    used += [int(v) for v in targets if is_version(v)]
                version = str(max(used, default=0) + 1)
                manifest = Manifest.build(
                    spec,
                    name=name,
                    version=version,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    code_revision=revision,
                    parent=parent,
                    files=checksums,
                )
                with open(tmp / MANIFEST_FILE, "xb") as f:
                    f.write(dump_json(manifest.to_dict()))
                    f.flush()
                    os.fsync(f.fileno())
                fsync_dir(tmp)
                final = model_dir / version
                os.rename(tmp, final)  # the commit point: atomic on POSIX
                fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ModelVersion(name, version, final, manifest)

    # -- aliases

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at an existing ``version`` (recorded in the alias history)."""
        _check_alias(alias)
        if not is_version(str(version)):
            raise InvalidNameError(f"version must be a number, got {version!r}")
        with self._locked(name):
            target = self._resolve_version(name, str(version))
            current, history = self._read_aliases(name)
            if current.get(alias) == target:
                return  # re-promoting the current target must not add a rollback step
            current[alias] = target
            history.setdefault(alias, []).append(target)
            self._write_aliases(name, current, history)

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> str:
        """Point ``alias`` back to its previous target; returns that version."""
        _check_alias(alias)
        with self._locked(name):
            current, history = self._read_aliases(name)
            if alias not in current:
                raise NotFoundError(f"alias {alias!r} of {name!r} is not set")
            targets = history.get(alias, [])
            if len(targets) < 2:
                raise ConflictError(
                    f"alias {alias!r} of {name!r} has no previous target to roll back to"
                )
            previous = targets[-2]
            if previous not in [str(n) for n in self._version_numbers(name)]:
                raise ConflictError(
                    f"previous target of {alias!r} ({name}@{previous}) no longer exists"
                )
            history[alias] = targets[:-1]
            current[alias] = previous
            self._write_aliases(name, current, history)
            return previous

    # -- integrity

    def verify(self, ref_or_version: str | ModelVersion) -> list[str]:
        """Problems found in one version (empty list = OK); re-reads everything from disk."""
        if isinstance(ref_or_version, ModelVersion):
            name, version = ref_or_version.name, ref_or_version.version
        else:
            name, rest = split_ref(ref_or_version)
            version = self._resolve_version(name, rest)
        return self._verify_dir(name, version)

    def verify_all(self) -> dict[str, list[str]]:
        """``{"name@version": problems}`` for every version of every model."""
        return {
            f"{name}@{n}": self._verify_dir(name, str(n))
            for name in self.names()
            for n in self._version_numbers(name)
        }

    def _verify_dir(self, name: str, version: str) -> list[str]:
        folder = self._model_dir(name) / version
        problems: list[str] = []
        try:
            manifest = Manifest.from_dict(read_json(folder / MANIFEST_FILE))
        except IntegrityError as e:
            return [f"{MANIFEST_FILE}: unreadable or invalid ({e})"]
        if manifest.name != name or manifest.version != version:
            problems.append(f"{MANIFEST_FILE}: says {manifest.ref}, but lives in {name}/{version}")
        expected = {MANIFEST_FILE} | set(manifest.files)
        for filename, entry in manifest.files.items():
            problem = check_entry(folder, filename, entry)
            if problem:
                problems.append(problem)
        if (folder / EXPORTS_FILE).exists():
            expected.add(EXPORTS_FILE)
            try:
                derived = read_json(folder / EXPORTS_FILE)
                if not isinstance(derived, dict) or not isinstance(derived.get("files", {}), dict):
                    raise IntegrityError("not an object with a files table")
                for filename, entry in derived.get("files", {}).items():
                    expected.add(filename)
                    problem = check_entry(folder, filename, entry)
                    if problem:
                        problems.append(problem)
            except IntegrityError as e:
                problems.append(f"{EXPORTS_FILE}: unreadable ({e})")
        for p in sorted(folder.iterdir()):
            # Temp files are half-written derived files of a crashed writer: never served.
            if p.name not in expected and not p.name.startswith(TMP_PREFIX):
                problems.append(f"{p.name}: unexpected file (not in manifest or exports)")
        return problems

    def open_verified(self, mv: ModelVersion, filename: str) -> Path:
        """Path of ``filename`` after checking its size and sha256; IntegrityError otherwise."""
        validate_name(filename, "file name")
        entry: object = mv.manifest.files.get(filename)
        if entry is None:
            entry = self.derived(mv).get("files", {}).get(filename)
        if entry is None:
            raise NotFoundError(f"{filename} is not part of {mv.ref}")
        problem = check_entry(mv.path, filename, entry)
        if problem:
            raise IntegrityError(f"{mv.ref}: {problem}")
        return mv.path / filename

    # -- derived files

    def derived(self, mv: ModelVersion) -> dict:
        """Contents of exports.json ({} if nothing has been derived yet)."""
        path = self._model_dir(mv.name) / mv.version / EXPORTS_FILE
        if not path.is_file():
            return {}
        data = read_json(path)
        if not isinstance(data, dict):
            raise IntegrityError(f"{EXPORTS_FILE} of {mv.ref} is not a JSON object")
        return data

    def add_derived(self, mv: ModelVersion, files: Mapping[str, Path | bytes], info: dict) -> None:
        """Add or replace derived files and record them in exports.json.

        Entries and info from earlier calls are kept unless overwritten, so exports can be
        rebuilt one at a time.
        """
        for filename in files:
            validate_name(filename, "file name")
            if filename in _RESERVED_FILES or filename in mv.manifest.files:
                raise InvalidNameError(
                    f"{filename!r} is a published or reserved file of {mv.ref}; "
                    "derived files cannot replace it"
                )
        json.dumps(info)
        with self._locked(mv.name):
            folder = self._model_dir(mv.name) / self._resolve_version(mv.name, mv.version)
            remove_stale_tmp(folder, STALE_TMP_SECONDS)
            exports = self.derived(mv)
            recorded = dict(exports.get("files", {}))
            for filename, src in files.items():
                tmp = folder / tmp_name(filename)
                try:
                    recorded[filename] = copy_hashed(src, tmp)
                    os.replace(tmp, folder / filename)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
            fsync_dir(folder)
            write_atomic(folder / EXPORTS_FILE, dump_json({**exports, **info, "files": recorded}))

    # -- deletion

    def delete(self, name: str, version: str) -> None:
        """Remove an unaliased version; its number is never reused."""
        if not is_version(str(version)):
            raise InvalidNameError(f"delete takes a version number, got {version!r}")
        with self._locked(name) as model_dir:
            version = self._resolve_version(name, str(version))
            pointing = sorted(a for a, v in self.aliases(name).items() if v == version)
            if pointing:
                raise ConflictError(
                    f"{name}@{version} is the target of alias(es) {', '.join(pointing)}; "
                    "promote another version first"
                )
            deleted = self._deleted(name)
            write_atomic(model_dir / DELETED, dump_json({"deleted": [*deleted, version]}))
            # Rename first so the version vanishes atomically even if rmtree is interrupted.
            doomed = model_dir / tmp_name(f"deleted-{version}")
            os.rename(model_dir / version, doomed)
            fsync_dir(model_dir)
            shutil.rmtree(doomed, ignore_errors=True)

"""File-based model registry: immutable, checksummed versions plus movable aliases.

Layout (see docs in ARCHITECTURE.md, "The registry")::

    <root>/<name>/<version>/manifest.json      metadata + sha256/size of every published file
    <root>/<name>/<version>/<published files>  never modified after publication
    <root>/<name>/<version>/exports.json       derived files (model.ts, model.onnx), rebuildable
    <root>/<name>/aliases.json                 {"aliases": {...}, "history": {...}}
    <root>/<name>/deleted.json                 versions removed by `delete` (never reused)

A leaf module: standard library and ``filelock`` only, so both the training side and the
service can import it without pulling in torch or FastAPI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock

__all__ = [
    "ConflictError",
    "IntegrityError",
    "InvalidNameError",
    "ModelVersion",
    "NotFoundError",
    "Registry",
    "RegistryError",
    "main",
    "validate_name",
]

# Used with fullmatch(): a "$" anchor would let a trailing newline through.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION_RE = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() accepts "²"
MANIFEST = "manifest.json"
EXPORTS = "exports.json"
ALIASES = "aliases.json"
DELETED = "deleted.json"
TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
DEFAULT_ALIAS = "production"
STALE_TMP_SECONDS = 3600.0
LOCK_TIMEOUT_SECONDS = 120.0
_RESERVED_FILES = frozenset({MANIFEST, EXPORTS})
_CHUNK = 1 << 20


class RegistryError(Exception):
    """Base class for every registry error."""


class NotFoundError(RegistryError):
    """A model, version, alias or file does not exist."""


class InvalidNameError(RegistryError):
    """A model, alias or file name is not acceptable."""


class IntegrityError(RegistryError):
    """A file is missing or differs from its recorded size/sha256."""


class ConflictError(RegistryError):
    """The operation conflicts with the registry state (e.g. deleting an aliased version)."""


@dataclass(frozen=True)
class ModelVersion:
    """One published version; ``manifest`` is the parsed manifest.json."""

    name: str
    version: str
    path: Path
    # Excluded from eq/hash: dicts are unhashable and the identity is name+version+path.
    manifest: dict = field(compare=False, repr=False)

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def file(self, filename: str) -> Path:
        """Path of a file in this version's folder (name validated, content not checked)."""
        validate_name(filename, "file name")
        return self.path / filename


# ---------------------------------------------------------------------------- helpers


def _valid_name(value: object) -> bool:
    # One rule for model, alias and file names: a plain name can never escape its folder.
    return isinstance(value, str) and bool(_NAME_RE.fullmatch(value)) and ".." not in value


def _is_version(value: object) -> bool:
    return isinstance(value, str) and bool(_VERSION_RE.fullmatch(value))


def validate_name(value: object, what: str = "name") -> str:
    if not _valid_name(value):
        raise InvalidNameError(
            f"invalid {what} {value!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..'"
        )
    return value


def _check_alias(alias: object) -> str:
    validate_name(alias, "alias name")
    # A numeric alias would be indistinguishable from a version in "name@3".
    if _is_version(alias):
        raise InvalidNameError(f"invalid alias name {alias!r}: must not be a number")
    return str(alias)


def _fsync_dir(path: Path) -> None:
    # Makes a rename/creation durable; not supported everywhere, and not worth failing on.
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _iter_source(src: Path | bytes) -> Iterator[bytes]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        yield bytes(src)
        return
    with open(src, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _copy_hashed(src: Path | bytes, dst: Path) -> dict[str, Any]:
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


def _tmp_name(label: str = "") -> str:
    return f"{TMP_PREFIX}{secrets.token_hex(8)}{'-' + label if label else ''}"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see half a file."""
    tmp = path.with_name(_tmp_name(path.name))
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path.name} in {path.parent} is unreadable: {e}") from e


def _remove_tree_or_file(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_tmp(folder: Path, max_age: float = STALE_TMP_SECONDS) -> None:
    # Leftovers of crashed writers; young ones may belong to a publish still copying.
    now = time.time()
    for p in folder.glob(TMP_PREFIX + "*"):
        try:
            if now - p.lstat().st_mtime > max_age:
                _remove_tree_or_file(p)
        except OSError:
            pass


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


def _check_entry(folder: Path, filename: str, entry: object) -> str | None:
    """Return a problem (naming the file) or None if the file matches its entry."""
    if not isinstance(entry, dict) or "sha256" not in entry or "size" not in entry:
        return f"{filename}: malformed checksum entry"
    path = folder / filename
    if path.is_symlink():
        return f"{filename}: is a symbolic link"
    if not path.is_file():
        return f"{filename}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{filename}: size mismatch (expected {entry['size']} bytes, found {size})"
    digest = _sha256_file(path)
    if digest != entry["sha256"]:
        return (
            f"{filename}: sha256 mismatch (expected {str(entry['sha256'])[:12]}..., "
            f"found {digest[:12]}...)"
        )
    return None


def _split_ref(ref: str) -> tuple[str, str | None]:
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
            if _is_version(p.name) and p.is_dir() and (p / MANIFEST).is_file()
        )

    def _deleted(self, name: str) -> list[str]:
        path = self._model_dir(name) / DELETED
        if not path.is_file():
            return []
        return [str(v) for v in _read_json(path).get("deleted", [])]

    def _load(self, name: str, version: str, strict: bool = True) -> ModelVersion:
        path = self._model_dir(name) / version
        try:
            manifest = _read_json(path / MANIFEST)
            if not isinstance(manifest, dict):
                raise IntegrityError(f"manifest.json of {name}@{version} is not an object")
        except IntegrityError:
            if strict:
                raise
            manifest = {}  # listings stay usable; verify() reports the problem
        return ModelVersion(name=name, version=version, path=path, manifest=manifest)

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

    def _read_aliases(self, name: str) -> tuple[dict[str, str], dict[str, list[str]]]:
        path = self._model_dir(name) / ALIASES
        if not path.is_file():
            return {}, {}
        data = _read_json(path)
        if not isinstance(data, dict):
            raise IntegrityError(f"{path} is not a JSON object")
        if "aliases" not in data:  # tolerate the flat {"production": "3"} form
            data = {"aliases": data, "history": {}}
        current = {str(k): str(v) for k, v in dict(data.get("aliases") or {}).items()}
        history = {str(k): [str(x) for x in v] for k, v in dict(data.get("history") or {}).items()}
        for alias, target in current.items():
            if not history.get(alias) or history[alias][-1] != target:
                history.setdefault(alias, []).append(target)
        return current, history

    def _write_aliases(
        self, name: str, current: dict[str, str], history: dict[str, list[str]]
    ) -> None:
        path = self._model_dir(name) / ALIASES
        _write_atomic(path, _dump_json({"aliases": current, "history": history}))

    # -- resolution

    def _unknown_model_message(self, name: str) -> str:
        known = self.names()
        return f"model {name!r} not found in {self.root}; models: {', '.join(known) or '(none)'}"

    def _resolve_version(self, name: str, version_or_alias: str | None) -> str:
        numbers = self._version_numbers(name)
        if not numbers:
            raise NotFoundError(self._unknown_model_message(name))
        existing = [str(n) for n in numbers]
        current = self.aliases(name)
        if version_or_alias is None:  # bare name: production if promoted, else the latest
            version_or_alias = DEFAULT_ALIAS if DEFAULT_ALIAS in current else existing[-1]
        if _is_version(version_or_alias):
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
        name, rest = _split_ref(ref)
        return self._load(name, self._resolve_version(name, rest))

    # -- publication

    def publish(
        self,
        name: str,
        files: Mapping[str, Path | bytes],
        metadata: dict,
        parent: str | None = None,
    ) -> ModelVersion:
        """Publish ``files`` (path or bytes per file name) as the next version of ``name``.

        The manifest is ``metadata`` plus name, version, created, code_revision, parent and
        files (sha256/size); those keys override same-named metadata keys.
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
        json.dumps(metadata)  # raises TypeError now rather than after copying gigabytes
        revision = _code_revision()

        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / _tmp_name()
        tmp.mkdir()
        try:
            # The slow part (copy + hash) runs outside the lock so publishes overlap.
            checksums = {fn: _copy_hashed(src, tmp / fn) for fn, src in files.items()}
            with self._locked(name, create=True):
                _remove_stale_tmp(model_dir)
                used = self._version_numbers(name) + [
                    int(v) for v in self._deleted(name) if _is_version(v)
                ]
                # History may name versions whose folders are gone; never reuse a number.
                for targets in self.alias_history(name).values():
                    used += [int(v) for v in targets if _is_version(v)]
                version = str(max(used, default=0) + 1)
                manifest = {
                    **metadata,
                    "name": name,
                    "version": version,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "code_revision": revision,
                    "parent": parent,
                    "files": checksums,
                }
                with open(tmp / MANIFEST, "xb") as f:
                    f.write(_dump_json(manifest))
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp)
                final = model_dir / version
                os.rename(tmp, final)  # the commit point: atomic on POSIX
                _fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ModelVersion(name=name, version=version, path=final, manifest=manifest)

    # -- aliases

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at an existing ``version`` (recorded in the alias history)."""
        _check_alias(alias)
        if not _is_version(str(version)):
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
            name, rest = _split_ref(ref_or_version)
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
            manifest = _read_json(folder / MANIFEST)
            files = manifest["files"]
            if not isinstance(files, dict):
                raise TypeError("files is not an object")
        except (IntegrityError, KeyError, TypeError) as e:
            return [f"{MANIFEST}: unreadable or without a files table ({e})"]
        if str(manifest.get("name")) != name or str(manifest.get("version")) != version:
            problems.append(
                f"{MANIFEST}: says {manifest.get('name')}@{manifest.get('version')}, "
                f"but lives in {name}/{version}"
            )
        expected = {MANIFEST} | set(files)
        for filename, entry in files.items():
            problem = _check_entry(folder, filename, entry)
            if problem:
                problems.append(problem)
        if (folder / EXPORTS).exists():
            expected.add(EXPORTS)
            try:
                derived_files = _read_json(folder / EXPORTS).get("files", {})
                for filename, entry in derived_files.items():
                    expected.add(filename)
                    problem = _check_entry(folder, filename, entry)
                    if problem:
                        problems.append(problem)
            except (IntegrityError, AttributeError) as e:
                problems.append(f"{EXPORTS}: unreadable ({e})")
        for p in sorted(folder.iterdir()):
            # Temp files are half-written derived files of a crashed writer: never served.
            if p.name not in expected and not p.name.startswith(TMP_PREFIX):
                problems.append(f"{p.name}: unexpected file (not in manifest or exports)")
        return problems

    def open_verified(self, mv: ModelVersion, filename: str) -> Path:
        """Path of ``filename`` after checking its size and sha256; IntegrityError otherwise."""
        validate_name(filename, "file name")
        files = mv.manifest.get("files")
        if not isinstance(files, dict):
            raise IntegrityError(f"{MANIFEST} of {mv.ref} is unreadable; refusing {filename}")
        entry = files.get(filename)
        if entry is None:
            entry = self.derived(mv).get("files", {}).get(filename)
        if entry is None:
            raise NotFoundError(f"{filename} is not part of {mv.ref}")
        problem = _check_entry(mv.path, filename, entry)
        if problem:
            raise IntegrityError(f"{mv.ref}: {problem}")
        return mv.path / filename

    # -- derived files

    def derived(self, mv: ModelVersion) -> dict:
        """Contents of exports.json ({} if nothing has been derived yet)."""
        path = self._model_dir(mv.name) / mv.version / EXPORTS
        if not path.is_file():
            return {}
        data = _read_json(path)
        if not isinstance(data, dict):
            raise IntegrityError(f"{EXPORTS} of {mv.ref} is not a JSON object")
        return data

    def add_derived(self, mv: ModelVersion, files: Mapping[str, Path | bytes], info: dict) -> None:
        """Add or replace derived files and record them in exports.json.

        Entries and info from earlier calls are kept unless overwritten, so exports can be
        rebuilt one at a time.
        """
        for filename in files:
            validate_name(filename, "file name")
            if filename in _RESERVED_FILES or filename in mv.manifest.get("files", {}):
                raise InvalidNameError(
                    f"{filename!r} is a published or reserved file of {mv.ref}; "
                    "derived files cannot replace it"
                )
        json.dumps(info)
        with self._locked(mv.name):
            folder = self._model_dir(mv.name) / self._resolve_version(mv.name, mv.version)
            _remove_stale_tmp(folder)
            exports = self.derived(mv)
            recorded = dict(exports.get("files", {}))
            for filename, src in files.items():
                tmp = folder / _tmp_name(filename)
                try:
                    recorded[filename] = _copy_hashed(src, tmp)
                    os.replace(tmp, folder / filename)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
            _fsync_dir(folder)
            _write_atomic(folder / EXPORTS, _dump_json({**exports, **info, "files": recorded}))

    # -- deletion

    def delete(self, name: str, version: str) -> None:
        """Remove an unaliased version; its number is never reused."""
        if not _is_version(str(version)):
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
            _write_atomic(model_dir / DELETED, _dump_json({"deleted": [*deleted, version]}))
            # Rename first so the version vanishes atomically even if rmtree is interrupted.
            doomed = model_dir / _tmp_name(f"deleted-{version}")
            os.rename(model_dir / version, doomed)
            _fsync_dir(model_dir)
            shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------- CLI


def _format_accuracy(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    # Stored as a fraction (0.91) by convention; tolerate an already-scaled percentage.
    return f"{value * 100 if value <= 1 else value:.2f}%"


def _selected(registry: Registry, ref: str | None) -> list[ModelVersion]:
    """No ref: every version; NAME: every version of NAME; NAME@X: that version."""
    if ref is None:
        return [mv for name in registry.names() for mv in registry.versions(name)]
    name, rest = _split_ref(ref)
    return registry.versions(name) if rest is None else [registry.resolve(name, rest)]


def _materialize(registry: Registry, mv: ModelVersion) -> None:
    # Lazy: training.export imports torch, which the registry itself must never need.
    from training.export import materialize

    materialize(registry, mv)


def _cmd_list(registry: Registry, args: argparse.Namespace) -> int:
    rows = [("NAME", "VERSION", "ALIASES", "TEST ACC", "CREATED")]
    for name in registry.names():
        aliases = registry.aliases(name)
        for mv in registry.versions(name):
            pointing = ",".join(sorted(a for a, v in aliases.items() if v == mv.version))
            metrics = mv.manifest.get("metrics")
            acc = metrics.get("test_accuracy") if isinstance(metrics, dict) else None
            created = str(mv.manifest.get("created", "-"))
            rows.append((name, mv.version, pointing or "-", _format_accuracy(acc), created))
    if len(rows) == 1:
        print(f"no models in {registry.root}")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _cmd_show(registry: Registry, args: argparse.Namespace) -> int:
    mv = registry.get(args.ref)
    print(json.dumps(mv.manifest, indent=2))
    pointing = sorted(a for a, v in registry.aliases(mv.name).items() if v == mv.version)
    print(f"aliases: {', '.join(pointing) or '(none)'}")
    derived_files = registry.derived(mv).get("files", {})
    if not derived_files:
        print(f"derived files: none (run: python -m service.registry materialize {mv.ref})")
    for filename, entry in sorted(derived_files.items()):
        problem = _check_entry(mv.path, filename, entry)
        print(f"derived {filename}: {problem or 'ok'}")
    return 0


def _cmd_promote(registry: Registry, args: argparse.Namespace) -> int:
    before = registry.aliases(args.name).get(args.alias)
    registry.set_alias(args.name, args.alias, args.version)
    after = registry.aliases(args.name)[args.alias]
    print(f"{args.name}: {args.alias} -> {after} (was {before or 'unset'})")
    return 0


def _cmd_rollback(registry: Registry, args: argparse.Namespace) -> int:
    target = registry.rollback(args.name, args.alias)
    print(f"{args.name}: {args.alias} -> {target} (rolled back)")
    return 0


def _cmd_verify(registry: Registry, args: argparse.Namespace) -> int:
    selected = _selected(registry, args.ref)
    failed = False
    for mv in selected:
        problems = registry.verify(mv)
        if problems:
            failed = True
            for problem in problems:
                print(f"FAIL {mv.ref}: {problem}")
        else:
            print(f"OK {mv.ref}")
    if not selected:
        print(f"no models in {registry.root}")
    return 1 if failed else 0


def _cmd_delete(registry: Registry, args: argparse.Namespace) -> int:
    registry.delete(args.name, args.version)
    print(f"deleted {args.name}@{args.version}")
    return 0


def _cmd_materialize(registry: Registry, args: argparse.Namespace) -> int:
    for mv in _selected(registry, args.ref):
        _materialize(registry, mv)
        print(f"materialized {mv.ref}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.registry", description="Inspect and manage the model registry."
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("SEEDNET_REGISTRY_ROOT", "models"),
        help="registry folder (default: $SEEDNET_REGISTRY_ROOT or ./models)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="table of every version").set_defaults(func=_cmd_list)
    p = sub.add_parser("show", help="manifest, aliases and derived files of a version")
    p.add_argument("ref", metavar="NAME[@VERSION|@ALIAS]")
    p.set_defaults(func=_cmd_show)
    for cmd, func, help_ in (
        ("promote", _cmd_promote, "point an alias at a version"),
        ("rollback", _cmd_rollback, "point an alias back to its previous target"),
    ):
        p = sub.add_parser(cmd, help=help_)
        p.add_argument("name")
        if cmd == "promote":
            p.add_argument("version")
        p.add_argument("--alias", default=DEFAULT_ALIAS)
        p.set_defaults(func=func)
    p = sub.add_parser("verify", help="check sizes and sha256 (all versions by default)")
    p.add_argument("ref", nargs="?", metavar="NAME[@VERSION]")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("delete", help="delete an unaliased version")
    p.add_argument("name")
    p.add_argument("version")
    p.set_defaults(func=_cmd_delete)
    p = sub.add_parser("materialize", help="(re)build derived exports (all versions by default)")
    p.add_argument("ref", nargs="?", metavar="NAME[@VERSION]")
    p.set_defaults(func=_cmd_materialize)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 on registry errors, 2 on usage errors)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on usage errors and --help; report, don't exit
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(Registry(args.root), args))
    except (RegistryError, OSError, ImportError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception carried
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

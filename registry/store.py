"""File-based model registry: immutable, checksummed versions plus movable aliases.

Layout::

    <root>/<name>/<version>/manifest.json      typed manifest (registry.manifest) with the
                                               sha256/size of every published file
    <root>/<name>/<version>/manifest.sha256    sha256 of manifest.json (checked on every load)
    <root>/<name>/<version>/<published files>  never modified after publication
    <root>/<name>/<version>/exports.json       derived files (model.ts, model.onnx), rebuildable
    <root>/<name>/aliases.json                 {"aliases": {...}, "history": {...}}
    <root>/<name>/aliases.log                  every aliases.json written, one JSON per line
                                               (what `repair` restores a corrupt file from)
    <root>/<name>/deleted.json                 versions removed by `delete` (never reused)

Errors name files relative to the root (``seednet/aliases.json``), never by absolute
path: messages travel to HTTP clients. A failed write raises StorageError and leaves
the registry as it was.

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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import filelock

from registry.errors import (
    ConflictError,
    IntegrityError,
    InvalidNameError,
    MetadataError,
    NotFoundError,
    RegistryError,
    StorageError,
)
from registry.files import (
    OWNER_SUFFIX,
    TMP_PREFIX,
    OwnedTmpDir,
    copy_hashed,
    dump_json,
    fsync_dir,
    remove_dead_tmp,
    sha256_bytes,
    sha256_file,
    tmp_entries,
    tmp_name,
    write_atomic,
)
from registry.manifest import (
    EXPORTS_FILE,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    FileEntry,
    Manifest,
    VersionSpec,
)

# Used with fullmatch(): a "$" anchor would let a trailing newline through.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION_RE = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() accepts "²"
ALIASES = "aliases.json"
ALIASES_LOG = "aliases.log"
DELETED = "deleted.json"
LOCK_NAME = ".lock"
DEFAULT_ALIAS = "production"
LOCK_TIMEOUT_SECONDS = 120.0
_RESERVED_FILES = frozenset({MANIFEST_FILE, MANIFEST_DIGEST_FILE, EXPORTS_FILE})


@dataclass(frozen=True)
class ModelVersion:
    """One published version. ``manifest`` raises IntegrityError if it could not be read."""

    name: str
    version: str
    path: Path
    # Excluded from eq/hash: the identity is name+version+path.
    _manifest: Manifest | None = field(compare=False, repr=False)
    problem: str | None = field(default=None, compare=False, repr=False)
    # False for a version published before manifest.sha256 existed (see ``seal``).
    sealed: bool = field(default=True, compare=False, repr=False)
    # True when ``publish`` found these weights already published and returned that one.
    existing: bool = field(default=False, compare=False, repr=False)

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


def os_reason(e: OSError) -> str:
    """What went wrong, without the file name (which OSError gives as an absolute path)."""
    return e.strerror or str(e) or type(e).__name__


def read_json(path: Path, label: str | None = None, error: type[IntegrityError] = IntegrityError):
    """Parse a JSON file; ``error`` naming ``label`` (default: folder/name) if it cannot."""
    label = label or f"{path.parent.name}/{path.name}"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{label} is unreadable: {os_reason(e)}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{label} is not valid JSON: {e}") from e


def digest_text(manifest_bytes: bytes) -> bytes:
    """The content of manifest.sha256 for these manifest bytes."""
    return f"{sha256_bytes(manifest_bytes)}  {MANIFEST_FILE}\n".encode()


def parse_digest(data: bytes) -> str | None:
    """The sha256 recorded in a manifest.sha256 file, or None if malformed."""
    parts = data.decode("ascii", "replace").split()
    if len(parts) == 2 and parts[1].lstrip("*") == MANIFEST_FILE:
        digest = parts[0].lower()
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            return digest
    return None


def parse_aliases(data: object, where: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Current aliases and their history from aliases.json's content; MetadataError if odd.

    Every alias must be a valid alias name and every target a version number; the flat
    ``{"production": "3"}`` form of early registries is still read.
    """
    if not isinstance(data, dict):
        raise MetadataError(f"{where} is not a JSON object")
    if "aliases" not in data and "history" not in data:
        data = {"aliases": data, "history": {}}
    current_raw, history_raw = data.get("aliases") or {}, data.get("history") or {}
    if not isinstance(current_raw, dict) or not isinstance(history_raw, dict):
        raise MetadataError(f"{where}: 'aliases' and 'history' must be JSON objects")

    def target(value: object, alias: str) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not is_version(value):
            raise MetadataError(f"{where}: alias {alias!r} points at {value!r}, not a version")
        return str(int(value))

    current: dict[str, str] = {}
    history: dict[str, list[str]] = {}
    for alias, value in current_raw.items():
        if not _valid_name(alias) or is_version(alias):
            raise MetadataError(f"{where}: {alias!r} is not a valid alias name")
        current[alias] = target(value, alias)
    for alias, targets in history_raw.items():
        if not _valid_name(alias) or not isinstance(targets, list):
            raise MetadataError(f"{where}: the history of {alias!r} is not a list of versions")
        history[alias] = [target(v, alias) for v in targets]
    for alias, version in current.items():
        if not history.get(alias) or history[alias][-1] != version:
            history.setdefault(alias, []).append(version)
    return current, history


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

    def relative(self, path: Path | str) -> str:
        """``path`` as named in messages: relative to the root (never absolute)."""
        path = Path(path)
        for base in (self.root, self.root.resolve()):
            try:
                return path.relative_to(base).as_posix()
            except ValueError:
                continue
        return path.name

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Turn an OSError while changing ``what`` into StorageError (relative names only)."""
        try:
            yield
        except RegistryError:
            raise
        except OSError as e:
            named = self.relative(e.filename) if e.filename else ""
            # a temp file's random name says nothing that ``what`` does not
            where = f" ({named})" if named and TMP_PREFIX not in named else ""
            raise StorageError(f"cannot write {what}: {os_reason(e)}{where}") from e

    @contextmanager
    def _locked(self, name: str, create: bool = False) -> Iterator[Path]:
        model_dir = self._model_dir(name)
        with self._writing(f"the registry lock of {name!r}"):
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
        where = f"{name}/{DELETED}"
        data = read_json(path, where, MetadataError)
        deleted = data.get("deleted", []) if isinstance(data, dict) else None
        if not isinstance(deleted, list) or not all(is_version(str(v)) for v in deleted):
            raise MetadataError(f"{where} is not {{'deleted': [version numbers]}}")
        return [str(v) for v in deleted]

    def _read_manifest(self, name: str, version: str) -> tuple[Manifest, bool]:
        """The manifest of ``name@version`` checked against manifest.sha256; (manifest, sealed).

        The bytes are read once, then hashed and parsed, so what is checked is what is used.
        """
        folder = self._model_dir(name) / version
        ref = f"{name}@{version}"
        try:
            raw = (folder / MANIFEST_FILE).read_bytes()
        except OSError as e:
            raise IntegrityError(f"{MANIFEST_FILE} of {ref} is unreadable: {os_reason(e)}") from e
        sealed = (folder / MANIFEST_DIGEST_FILE).is_file()
        if sealed:
            try:
                recorded = parse_digest((folder / MANIFEST_DIGEST_FILE).read_bytes())
            except OSError as e:
                raise IntegrityError(
                    f"{MANIFEST_DIGEST_FILE} of {ref} is unreadable: {os_reason(e)}"
                ) from e
            if recorded is None:
                raise IntegrityError(f"{MANIFEST_DIGEST_FILE} of {ref} is malformed")
            found = sha256_bytes(raw)
            if found != recorded:
                raise IntegrityError(
                    f"{MANIFEST_FILE} of {ref} was changed after publication: sha256 "
                    f"{found[:12]}..., {MANIFEST_DIGEST_FILE} records {recorded[:12]}..."
                )
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IntegrityError(f"{MANIFEST_FILE} of {ref} is not valid JSON: {e}") from e
        return Manifest.from_dict(data, f"{MANIFEST_FILE} of {ref}"), sealed

    def _load(self, name: str, version: str, strict: bool = True) -> ModelVersion:
        path = self._model_dir(name) / version
        try:
            manifest, sealed = self._read_manifest(name, version)
        except IntegrityError as e:
            if strict:
                raise
            # listings stay usable; verify() reports the problem
            return ModelVersion(name, version, path, None, str(e))
        return ModelVersion(name, version, path, manifest, sealed=sealed)

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
        if not path.exists():
            return {}, {}
        where = f"{name}/{ALIASES}"
        try:
            return parse_aliases(read_json(path, where, MetadataError), where)
        except MetadataError as e:
            raise MetadataError(
                f"{e}; the versions are unaffected: run `python -m service.registry "
                f"repair {name}` to restore it"
            ) from e

    def _write_aliases(
        self, name: str, current: dict[str, str], history: dict[str, list[str]]
    ) -> None:
        """Replace aliases.json (the commit point), then journal it in aliases.log."""
        model_dir = self._model_dir(name)
        state = {"aliases": current, "history": history}
        with self._writing(f"{name}/{ALIASES}"):
            write_atomic(model_dir / ALIASES, dump_json(state))
        # The journal is what `repair` restores from. It is written after the commit
        # point: failing here must not report an alias change that did happen as failed.
        line = json.dumps(
            {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **state}
        )
        try:
            with open(model_dir / ALIASES_LOG, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            pass

    # -- resolution

    def _unknown_model_message(self, name: str) -> str:
        known = self.names()
        return f"model {name!r} not found; models: {', '.join(known) or '(none)'}"

    def _resolve_version(self, name: str, version_or_alias: str | None) -> str:
        numbers = self._version_numbers(name)
        if not numbers:
            raise NotFoundError(self._unknown_model_message(name))
        existing = [str(n) for n in numbers]
        if version_or_alias is None:  # bare name: production if promoted, else the latest
            current = self.aliases(name)
            version_or_alias = DEFAULT_ALIAS if DEFAULT_ALIAS in current else existing[-1]
        if is_version(version_or_alias):  # a number never depends on aliases.json
            version = str(int(version_or_alias))  # "03" -> "3"
            if version not in existing:
                raise NotFoundError(
                    f"version {version_or_alias} of {name!r} not found; "
                    f"versions: {', '.join(existing)}"
                )
            return version
        current = self.aliases(name)
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
        force: bool = False,
    ) -> ModelVersion:
        """Publish ``files`` (path or bytes per file name) as the next version of ``name``.

        The manifest is ``spec`` plus what the registry adds: name, version, created,
        code_revision, parent and the sha256/size of every file; manifest.sha256 beside it
        records the manifest's own digest.

        Idempotent: when a version of ``name`` already holds the same weights (sha256 of
        ``weights.safetensors``), that version is returned with ``existing=True`` and
        nothing is written, so a retried publish never makes a duplicate; ``force``
        publishes a new version anyway. Temp folders of dead publishers are removed here.
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

        with self._writing(f"a new version of {name!r}"):
            model_dir.mkdir(parents=True, exist_ok=True)
            owned = OwnedTmpDir(model_dir, "publish")
        tmp = owned.path
        try:
            # The slow part (copy + hash) runs outside the lock so publishes overlap.
            with self._writing(f"a new version of {name!r}"):
                checksums = {
                    fn: FileEntry.from_dict(copy_hashed(src, tmp / fn)) for fn, src in files.items()
                }
            with self._locked(name, create=True), self._writing(f"a new version of {name!r}"):
                remove_dead_tmp(model_dir)
                same = None if force else self._same_weights(name, checksums.get(WEIGHTS_FILE))
                if same is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return replace(same, existing=True)
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
                manifest_bytes = dump_json(manifest.to_dict())
                for filename, data in (
                    (MANIFEST_FILE, manifest_bytes),
                    (MANIFEST_DIGEST_FILE, digest_text(manifest_bytes)),
                ):
                    with open(tmp / filename, "xb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                fsync_dir(tmp)
                final = model_dir / version
                os.rename(tmp, final)  # the commit point: atomic on POSIX
                fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            owned.release()
        return ModelVersion(name, version, final, manifest)

    def _same_weights(self, name: str, weights: FileEntry | None) -> ModelVersion | None:
        """The newest readable version of ``name`` whose weights are ``weights``, if any."""
        if weights is None:
            return None
        for n in reversed(self._version_numbers(name)):
            mv = self._load(name, str(n), strict=False)
            if mv.problem is None and mv.manifest.files.get(WEIGHTS_FILE) == weights:
                return mv
        return None

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
            manifest, _ = self._read_manifest(name, version)
        except IntegrityError as e:
            return [f"{MANIFEST_FILE}: unreadable, invalid or altered ({e})"]
        if manifest.name != name or manifest.version != version:
            problems.append(f"{MANIFEST_FILE}: says {manifest.ref}, but lives in {name}/{version}")
        expected = {MANIFEST_FILE, MANIFEST_DIGEST_FILE} | set(manifest.files)
        for filename, entry in manifest.files.items():
            problem = check_entry(folder, filename, entry)
            if problem:
                problems.append(problem)
        if (folder / EXPORTS_FILE).exists():
            expected.add(EXPORTS_FILE)
            try:
                derived = read_json(folder / EXPORTS_FILE, EXPORTS_FILE)
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
            # Temp files are half-written derived files of a crashed writer: never served
            # (check_model reports them).
            if p.name not in expected and not p.name.startswith(TMP_PREFIX):
                problems.append(f"{p.name}: unexpected file (not in manifest or exports)")
        return problems

    def warnings(self, mv: ModelVersion) -> list[str]:
        """What is not wrong with ``mv`` but weaker than it should be."""
        if (mv.path / MANIFEST_DIGEST_FILE).exists():
            return []
        return [
            f"{MANIFEST_DIGEST_FILE}: missing, so changes to {MANIFEST_FILE} go unnoticed "
            f"(published before manifests had a digest); after checking the version, run "
            f"`python -m service.registry seal {mv.ref}`"
        ]

    def check_model(self, name: str) -> tuple[list[str], list[str]]:
        """(problems, warnings) of a model's own files: aliases.json, deleted.json, temp.

        Problems: an unreadable or malformed aliases.json / deleted.json, an alias whose
        target does not exist. Warnings: temp folders of dead writers (removed by the next
        publish or by ``repair``) and of writers still at work.
        """
        model_dir = self._model_dir(name)
        problems: list[str] = []
        warnings: list[str] = []
        existing = {str(n) for n in self._version_numbers(name)}
        try:
            current, _ = self._read_aliases(name)
            for alias, target in sorted(current.items()):
                if target not in existing:
                    problems.append(
                        f"{ALIASES}: alias {alias!r} points at version {target}, which does "
                        f"not exist; run `python -m service.registry repair {name}`"
                    )
        except MetadataError as e:
            problems.append(str(e))
        try:
            self._deleted(name)
        except MetadataError as e:
            problems.append(f"{e}; run `python -m service.registry repair {name}`")
        folders = [model_dir] + [model_dir / n for n in sorted(existing, key=int)]
        for folder in folders:
            entries = tmp_entries(folder)
            folders_named = {p.name for p, _ in entries}
            for p, alive in entries:
                if p.name.removesuffix(OWNER_SUFFIX) in folders_named - {p.name}:
                    continue  # the lock file of a folder listed already
                where = self.relative(p)
                if alive:
                    warnings.append(f"{where}: temporary, in use by a running writer")
                else:
                    warnings.append(
                        f"{where}: stray temporary {'folder' if p.is_dir() else 'file'} of a "
                        "writer that died; removed by the next publish or `repair`"
                    )
        return problems, warnings

    def seal(self, mv: ModelVersion) -> bool:
        """Write manifest.sha256 for a version published without one; False if it had one.

        Refused (IntegrityError) unless every file matches the manifest: sealing records
        the manifest as it is, so check it first (``show``, ``verify``).
        """
        with self._locked(mv.name) as model_dir:
            folder = model_dir / mv.version
            if (folder / MANIFEST_DIGEST_FILE).exists():
                return False
            problems = self._verify_dir(mv.name, mv.version)
            if problems:
                raise IntegrityError(f"{mv.ref} does not verify, not sealed: {problems[0]}")
            with self._writing(f"{mv.name}/{mv.version}/{MANIFEST_DIGEST_FILE}"):
                raw = (folder / MANIFEST_FILE).read_bytes()
                write_atomic(folder / MANIFEST_DIGEST_FILE, digest_text(raw))
            return True

    def repair(self, name: str, reset: bool = False) -> list[str]:
        """Restore a corrupt aliases.json / deleted.json of ``name``; what was done.

        aliases.json comes back from the newest entry of aliases.log whose targets all
        exist (``reset``: empty, no aliases). A corrupt file is kept beside as
        ``<file>.corrupt`` for inspection. Dead writers' temp folders are removed.
        """
        done: list[str] = []
        with self._locked(name) as model_dir, self._writing(f"the registry files of {name!r}"):
            done += [f"removed {self.relative(model_dir / n)}" for n in remove_dead_tmp(model_dir)]
            existing = {str(n) for n in self._version_numbers(name)}
            aliases_ok = True
            try:
                current, _ = self._read_aliases(name)
                aliases_ok = all(v in existing for v in current.values())
            except MetadataError:
                aliases_ok = False
            if reset or not aliases_ok:
                restored = None if reset else self._from_alias_log(name, existing)
                if restored is None and not reset:
                    raise MetadataError(
                        f"{name}/{ALIASES} is corrupt and {name}/{ALIASES_LOG} holds no usable "
                        f"entry; `repair {name} --reset` empties it (then promote a version)"
                    )
                if (model_dir / ALIASES).exists():
                    os.replace(model_dir / ALIASES, model_dir / (ALIASES + ".corrupt"))
                current, history = restored or ({}, {})
                self._write_aliases(name, current, history)
                listed = ", ".join(f"{a} -> {v}" for a, v in sorted(current.items()))
                source = f"from {ALIASES_LOG}" if restored else "reset"
                done.append(f"{name}/{ALIASES} {source}: {listed or 'no aliases'}")
            try:
                self._deleted(name)
            except MetadataError:
                # Numbers must never be reused: every gap below the highest number known
                # (versions, alias history) counts as deleted.
                known = existing | {v for vs in self._alias_log_targets(name) for v in vs}
                top = max((int(v) for v in known), default=0)
                gaps = [str(n) for n in range(1, top + 1) if str(n) not in existing]
                os.replace(model_dir / DELETED, model_dir / (DELETED + ".corrupt"))
                write_atomic(model_dir / DELETED, dump_json({"deleted": gaps}))
                done.append(f"{name}/{DELETED} rebuilt: {', '.join(gaps) or 'none'} deleted")
        return done

    def _alias_log(self, name: str) -> list[tuple[dict[str, str], dict[str, list[str]]]]:
        """Every valid state in aliases.log, oldest first (broken lines skipped)."""
        path = self._model_dir(name) / ALIASES_LOG
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise MetadataError(f"{name}/{ALIASES_LOG} is unreadable: {os_reason(e)}") from e
        states = []
        for line in lines:
            try:
                states.append(parse_aliases(json.loads(line), ALIASES_LOG))
            except (json.JSONDecodeError, MetadataError):
                continue  # e.g. the torn last line of a crash
        return states

    def _alias_log_targets(self, name: str) -> list[list[str]]:
        return [list(cur.values()) + sum(hist.values(), []) for cur, hist in self._alias_log(name)]

    def _from_alias_log(
        self, name: str, existing: set[str]
    ) -> tuple[dict[str, str], dict[str, list[str]]] | None:
        for current, history in reversed(self._alias_log(name)):
            if all(v in existing for v in current.values()):
                return current, history
        return None

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
        data = read_json(path, f"{EXPORTS_FILE} of {mv.ref}")
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
        with self._locked(mv.name), self._writing(f"the exports of {mv.ref}"):
            folder = self._model_dir(mv.name) / self._resolve_version(mv.name, mv.version)
            remove_dead_tmp(folder)
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
        with self._locked(name) as model_dir, self._writing(f"{name}/{DELETED}"):
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

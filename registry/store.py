"""The model registry: immutable, checksummed versions plus movable aliases.

Layout (the same keys in a local folder and in an object store)::

    <root>/<name>/<version>/manifest.json      typed manifest (registry.manifest) with the
                                               sha256/size of every published file
    <root>/<name>/<version>/manifest.sha256    sha256 of manifest.json (checked on every load;
                                               on an object store, also the commit mark)
    <root>/<name>/<version>/<published files>  never modified after publication; a file whose
                                               bytes an earlier version already holds is not
                                               stored again: its manifest entry says where
                                               (``"location": "1/weights.safetensors"``)
    <root>/<name>/<version>/exports.json       derived files (model.ts, model.onnx), rebuildable
    <root>/<name>/aliases.json                 {"aliases": {...}, "history": {...}}
    <root>/<name>/aliases.log                  every aliases.json written, one JSON per line
                                               (what `repair` restores a corrupt file from)
    <root>/<name>/deleted.json                 versions removed by `delete` (never reused)
    <root>/<name>/rollouts.json                the rollouts of a candidate, with their
                                               decisions (registry.rollouts); written by
                                               compare-and-swap like aliases.json
    <root>/<name>/rollouts.log                 every rollout record written, one JSON per line

``root`` is a folder (the default), ``file://PATH`` or ``s3://bucket/prefix``; the
medium's own guarantees (commit point, lock, compare-and-swap) live in
:mod:`registry.localfs` and :mod:`registry.objectstore`, the rules here.

Errors name files relative to the root (``seednet/aliases.json``), never by absolute
path or URL credentials: messages travel to HTTP clients. A failed write raises
StorageError and leaves the registry as it was; an unreachable store raises
StoreUnavailableError (a StorageError).

Standard library and ``filelock`` only (fsspec for ``s3://`` roots, imported only then),
so training, the service and the CLI import it without pulling in torch or FastAPI.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from registry.errors import (
    ConflictError,
    IntegrityError,
    InvalidNameError,
    MetadataError,
    NotFoundError,
    RegistryError,
    StorageError,
)
from registry.files import TMP_PREFIX, dump_json, sha256_bytes
from registry.manifest import (
    EXPORTS_FILE,
    MANIFEST_DIGEST_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    FileEntry,
    Manifest,
    VersionSpec,
)
from registry.rollouts import (
    ROLLOUTS,
    ROLLOUTS_LOG,
    Rollout,
    RolloutState,
    Rule,
    Step,
    parse_rollouts,
)
from registry.storage import Storage, open_storage

# Used with fullmatch(): a "$" anchor would let a trailing newline through.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION_RE = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() accepts "²"
ALIASES = "aliases.json"
ALIASES_LOG = "aliases.log"
DELETED = "deleted.json"
DEFAULT_ALIAS = "production"
_RESERVED_FILES = frozenset({MANIFEST_FILE, MANIFEST_DIGEST_FILE, EXPORTS_FILE})
# A published file at least this large whose bytes an earlier version of the model already
# holds is stored once (the manifest records where). Smaller files are copied: sharing
# ties the versions together (the older cannot be deleted first), not worth a few bytes.
SHARE_MIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class ModelVersion:
    """One published version. ``manifest`` raises IntegrityError if it could not be read.

    ``path`` is the version's folder in a local registry; in an object store, its key
    relative to the root (nothing on this machine: use ``Registry.open_verified``).
    """

    name: str
    version: str
    path: Path | PurePosixPath
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

    def file(self, filename: str) -> Path | PurePosixPath:
        """Where a file of this version lives (name validated, content not checked): its
        folder, or the earlier version's that holds the bytes of a shared file."""
        validate_name(filename, "file name")
        entry = self._manifest.files.get(filename) if self._manifest is not None else None
        if entry is not None and entry.location is not None:
            return self.path.parent / entry.location
        return self.path / filename


@dataclass(frozen=True)
class AliasState:
    """A model's aliases, their history and the token of that state.

    ``token`` changes whenever aliases.json does (an object store's ETag, a local file's
    sha256; ``""`` while there is none). Hand it back to :meth:`Registry.set_alias` to
    move an alias only if nobody moved any meanwhile, or to
    :meth:`Registry.alias_state_if_changed` to learn cheaply whether anything moved.
    """

    aliases: dict[str, str]
    history: dict[str, list[str]]
    token: str


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


def parse_json(raw: bytes, label: str, error: type[IntegrityError] = IntegrityError) -> object:
    """Parse JSON bytes; ``error`` naming ``label`` if they are not JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
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


def split_ref(ref: str) -> tuple[str, str | None]:
    """``name[@version|@alias]`` -> (name, rest or None)."""
    name, sep, rest = ref.partition("@")
    if sep and not rest:
        raise InvalidNameError(f"invalid reference {ref!r}: nothing after '@'")
    return validate_name(name, "model name"), (rest if sep else None)


def _decision_note(rollout: Rollout) -> dict:
    """What the alias journal records of a rollout's latest decision."""
    d = rollout.decisions[-1]
    return {
        "rollout": rollout.id,
        "alias": rollout.alias,
        "stable": rollout.stable,
        "candidate": rollout.candidate,
        **d.to_dict(),
    }


# ---------------------------------------------------------------------------- registry


class Registry:
    """A model registry rooted at ``root``: a folder (created lazily on first publish),
    ``file://PATH`` or ``s3://bucket/prefix``.

    ``cache_dir``: where files of a remote registry are verified before use (default
    ``$SEEDNET_REGISTRY_CACHE`` or the user's cache folder). ``lock_lease_s``: how long
    an object-store writer's lock outlives a writer that died (default 30 s).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        cache_dir: Path | str | None = None,
        lock_lease_s: float | None = None,
    ) -> None:
        self.storage: Storage = open_storage(root, cache_dir=cache_dir, lock_lease_s=lock_lease_s)
        self.root = self.storage.root

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # -- names, messages and locking

    def relative(self, path: Path | str) -> str:
        """``path`` as named in messages: relative to the root (never absolute)."""
        path = Path(path)
        if isinstance(self.root, Path):
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
    def _locked(self, name: str, create: bool = False) -> Iterator[None]:
        validate_name(name, "model name")
        with ExitStack() as stack:
            with self._writing(f"the registry lock of {name!r}"):
                # don't leave an empty folder behind for a typo
                if not create and not self.storage.model_exists(name):
                    raise NotFoundError(self._unknown_model_message(name))
                stack.enter_context(self.storage.lock(name, create))
            yield

    def _alias_writing(self, name: str):
        """What an alias move holds: the writers' lock (local), or nothing but its
        compare-and-swap (object store: a promote never waits behind a publish)."""
        return self._locked(name) if self.storage.alias_writes_locked else nullcontext()

    def _version_numbers(self, name: str) -> list[int]:
        return self.storage.version_numbers(validate_name(name, "model name"))

    def _deleted(self, name: str) -> list[str]:
        where = f"{name}/{DELETED}"
        try:
            raw = self.storage.read_optional(where)
        except OSError as e:
            raise MetadataError(f"{where} is unreadable: {os_reason(e)}") from e
        if raw is None:
            return []
        data = parse_json(raw, where, MetadataError)
        deleted = data.get("deleted", []) if isinstance(data, dict) else None
        if not isinstance(deleted, list) or not all(is_version(str(v)) for v in deleted):
            raise MetadataError(f"{where} is not {{'deleted': [version numbers]}}")
        return [str(v) for v in deleted]

    def _read_manifest(self, name: str, version: str) -> tuple[Manifest, bool]:
        """The manifest of ``name@version`` checked against manifest.sha256; (manifest, sealed).

        The bytes are read once, then hashed and parsed, so what is checked is what is used.
        """
        folder = f"{name}/{version}"
        ref = f"{name}@{version}"
        try:
            raw = self.storage.read(f"{folder}/{MANIFEST_FILE}")
        except OSError as e:
            raise IntegrityError(f"{MANIFEST_FILE} of {ref} is unreadable: {os_reason(e)}") from e
        try:
            digest_file = self.storage.read_optional(f"{folder}/{MANIFEST_DIGEST_FILE}")
        except OSError as e:
            raise IntegrityError(
                f"{MANIFEST_DIGEST_FILE} of {ref} is unreadable: {os_reason(e)}"
            ) from e
        sealed = digest_file is not None
        if digest_file is not None:
            recorded = parse_digest(digest_file)
            if recorded is None:
                raise IntegrityError(f"{MANIFEST_DIGEST_FILE} of {ref} is malformed")
            found = sha256_bytes(raw)
            if found != recorded:
                raise IntegrityError(
                    f"{MANIFEST_FILE} of {ref} was changed after publication: sha256 "
                    f"{found[:12]}..., {MANIFEST_DIGEST_FILE} records {recorded[:12]}..."
                )
        data = parse_json(raw, f"{MANIFEST_FILE} of {ref}")
        return Manifest.from_dict(data, f"{MANIFEST_FILE} of {ref}"), sealed

    def _load(self, name: str, version: str, strict: bool = True) -> ModelVersion:
        path = self.storage.version_path(name, version)
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
        return sorted(
            n
            for n in self.storage.list_names("")
            if _valid_name(n) and self.storage.version_numbers(n)
        )

    def versions(self, name: str) -> list[ModelVersion]:
        """All versions of ``name``, oldest first; NotFoundError if it has none."""
        numbers = self._version_numbers(name)
        if not numbers:
            raise NotFoundError(self._unknown_model_message(name))
        return [self._load(name, str(n), strict=False) for n in numbers]

    def aliases(self, name: str) -> dict[str, str]:
        """Current alias -> version mapping of ``name`` ({} if none)."""
        return self.alias_state(name).aliases

    def alias_history(self, name: str) -> dict[str, list[str]]:
        """Every target each alias has had, oldest first; the last item is current."""
        return self.alias_state(name).history

    def aliases_of(self, mv: ModelVersion) -> list[str]:
        """The aliases that point at ``mv`` now, sorted."""
        return sorted(a for a, v in self.aliases(mv.name).items() if v == mv.version)

    def alias_state(self, name: str) -> AliasState:
        """Aliases, history and the token of aliases.json (see :class:`AliasState`)."""
        key = f"{validate_name(name, 'model name')}/{ALIASES}"
        try:
            raw, token = self.storage.read_state(key)
        except OSError as e:
            raise self._corrupt_aliases(name, f"{key} is unreadable: {os_reason(e)}") from e
        return self._parse_alias_state(name, raw, token)

    def alias_state_if_changed(self, name: str, token: str) -> AliasState | None:
        """The alias state, or None when ``token`` is still current.

        What a server following an alias polls: on an object store, one conditional GET
        (``If-None-Match``) that downloads nothing while the aliases are unchanged.
        """
        key = f"{validate_name(name, 'model name')}/{ALIASES}"
        try:
            changed = self.storage.read_state_if_changed(key, token)
        except OSError as e:
            raise self._corrupt_aliases(name, f"{key} is unreadable: {os_reason(e)}") from e
        return None if changed is None else self._parse_alias_state(name, *changed)

    def _corrupt_aliases(self, name: str, problem: str) -> MetadataError:
        return MetadataError(
            f"{problem}; the versions are unaffected: run `python -m service.registry_cli "
            f"repair {name}` to restore it"
        )

    def _parse_alias_state(self, name: str, raw: bytes | None, token: str) -> AliasState:
        if raw is None:
            return AliasState({}, {}, token)
        where = f"{name}/{ALIASES}"
        try:
            current, history = parse_aliases(parse_json(raw, where, MetadataError), where)
        except MetadataError as e:
            raise self._corrupt_aliases(name, str(e)) from e
        return AliasState(current, history, token)

    def _write_aliases(
        self,
        name: str,
        current: dict[str, str],
        history: dict[str, list[str]],
        expected: str,
        note: dict | None = None,
    ) -> str:
        """Replace aliases.json if its token is still ``expected`` (the commit point), then
        journal it in aliases.log (with ``note``: why it moved); the new token."""
        state = {"aliases": current, "history": history}
        with self._writing(f"{name}/{ALIASES}"):
            token = self.storage.write_state(f"{name}/{ALIASES}", dump_json(state), expected)
        # The journal is what `repair` restores from. It is written after the commit
        # point: failing here must not report an alias change that did happen as failed.
        self._journal_aliases(name, state, note)
        return token

    def _journal_aliases(self, name: str, state: dict, note: dict | None) -> None:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **state}
        if note is not None:
            entry["note"] = note
        with suppress(OSError, RegistryError, TypeError, ValueError):
            self.storage.append_line(f"{name}/{ALIASES_LOG}", json.dumps(entry))

    def note_aliases(self, name: str, note: dict) -> None:
        """Add ``note`` (a decision that left the aliases where they are, with its
        evidence) to the alias history journal, aliases.log, beside the current state."""
        state = self.alias_state(name)
        self._journal_aliases(name, {"aliases": state.aliases, "history": state.history}, note)

    def alias_journal(self, name: str) -> list[dict]:
        """Every entry of aliases.log that parses, oldest first: ``time``, ``aliases``,
        ``history`` and, for a move or decision that gave its reason, ``note``."""
        validate_name(name, "model name")
        try:
            raw = self.storage.read_optional(f"{name}/{ALIASES_LOG}")
        except OSError as e:
            raise MetadataError(f"{name}/{ALIASES_LOG} is unreadable: {os_reason(e)}") from e
        entries = []
        for line in (raw or b"").decode("utf-8", errors="replace").splitlines():
            with suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def _move_aliases(
        self,
        name: str,
        before: AliasState,
        current: dict[str, str],
        history: dict[str, list[str]],
        target: str,
        doing: str,
        note: dict | None = None,
    ) -> None:
        """Write the new alias state over ``before`` (compare-and-swap), or ConflictError."""
        try:
            token = self._write_aliases(name, current, history, before.token, note)
        except ConflictError as e:
            raise ConflictError(
                f"the aliases of {name!r} moved while {doing} (another promote or rollback "
                f"won the race); nothing was changed: check `list` and try again"
            ) from e
        if self.storage.alias_writes_locked or int(target) in self._version_numbers(name):
            return
        # Without a lock, a delete may have hidden the target meanwhile (it checks the
        # aliases after hiding, this checks the version after writing: one of the two
        # sees the other). Put the aliases back as they were.
        with suppress(ConflictError):  # someone moved them again already: theirs stands
            self._write_aliases(name, before.aliases, before.history, token)
        raise ConflictError(f"{name}@{target} was deleted while {doing}; aliases left as they were")

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
        share: bool = True,
    ) -> ModelVersion:
        """Publish ``files`` (path or bytes per file name) as the next version of ``name``.

        The manifest is ``spec`` plus what the registry adds: name, version, created,
        code_revision, parent and the sha256/size of every file; manifest.sha256 beside it
        records the manifest's own digest.

        Idempotent: when a version of ``name`` already holds the same weights (sha256 of
        ``weights.safetensors``), that version is returned with ``existing=True`` and
        nothing is written, so a retried publish never makes a duplicate; ``force``
        publishes a new version anyway. A file of ``SHARE_MIN_BYTES`` or more whose bytes
        an earlier version holds (and that verify there now) is not stored again: the
        manifest records its location (``share=False`` stores a copy). Debris of dead
        writers is removed here.
        """
        # Validate everything before touching the disk: a refused publish leaves no trace.
        validate_name(name, "model name")
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
            staging = self.storage.stage(name)
        try:
            # The slow part (copy + hash) runs outside the lock so publishes overlap.
            with self._writing(f"a new version of {name!r}"):
                checksums = {fn: staging.add(fn, src) for fn, src in files.items()}
            with self._locked(name, create=True), self._writing(f"a new version of {name!r}"):
                self.storage.remove_debris(name)
                same = None if force else self._same_weights(name, checksums.get(WEIGHTS_FILE))
                if same is not None:
                    return replace(same, existing=True)
                entries = self._share(name, checksums) if share else dict(checksums)
                for filename, entry in entries.items():
                    if entry.location is not None:
                        staging.drop(filename)
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
                    files=entries,
                )
                manifest_bytes = dump_json(manifest.to_dict())
                staging.commit(name, version, manifest_bytes, digest_text(manifest_bytes))
        finally:
            staging.release()
        return ModelVersion(name, version, self.storage.version_path(name, version), manifest)

    def _same_weights(self, name: str, weights: FileEntry | None) -> ModelVersion | None:
        """The newest readable version of ``name`` whose weights are ``weights``, if any."""
        if weights is None:
            return None
        for n in reversed(self._version_numbers(name)):
            mv = self._load(name, str(n), strict=False)
            recorded = mv.manifest.files.get(WEIGHTS_FILE) if mv.problem is None else None
            if recorded is not None and recorded.same_bytes(weights):
                return mv
        return None

    def _share(self, name: str, checksums: dict[str, FileEntry]) -> dict[str, FileEntry]:
        """``checksums`` with a location for each large file an earlier version holds."""
        entries = dict(checksums)
        wanted = {fn: e for fn, e in checksums.items() if e.size >= SHARE_MIN_BYTES}
        if not wanted:
            return entries
        stored: dict[tuple[str, int], str] = {}  # content -> "<version>/<file>" holding it
        for n in reversed(self._version_numbers(name)):
            mv = self._load(name, str(n), strict=False)
            if mv.problem is None:
                for fn, e in mv.manifest.files.items():
                    stored.setdefault((e.sha256, e.size), e.location or f"{n}/{fn}")
        for fn, entry in wanted.items():
            location = stored.get((entry.sha256, entry.size))
            # Only bytes that verify where they are now: never tie a version to damage.
            if location is not None and self.storage.check(f"{name}/{location}", entry) is None:
                entries[fn] = replace(entry, location=location)
        return entries

    # -- aliases

    def set_alias(
        self,
        name: str,
        alias: str,
        version: str,
        expected_token: str | None = None,
        note: dict | None = None,
    ) -> None:
        """Point ``alias`` at an existing ``version`` (recorded in the alias history).

        A compare-and-swap of aliases.json: ConflictError, and nothing written, if another
        writer moved any alias of ``name`` since this call read them, or since the state
        whose ``token`` is ``expected_token`` (see :meth:`alias_state`). ``note`` (why,
        with what evidence) goes with the move into the journal, aliases.log.
        """
        _check_alias(alias)
        if not is_version(str(version)):
            raise InvalidNameError(f"version must be a number, got {version!r}")
        with self._alias_writing(name):
            target = self._resolve_version(name, str(version))
            before = self.alias_state(name)
            self._check_expected(name, before, expected_token)
            self.refuse_during_rollout(name, alias)
            if before.aliases.get(alias) == target:
                return  # re-promoting the current target must not add a rollback step
            current = {**before.aliases, alias: target}
            history = {a: list(v) for a, v in before.history.items()}
            history.setdefault(alias, []).append(target)
            self._move_aliases(name, before, current, history, target, f"promoting {alias!r}", note)

    def refuse_during_rollout(self, name: str, alias: str) -> None:
        """ConflictError when a running rollout owns ``alias``: it moves the alias itself."""
        running = self.rollout_state(name).running
        if running is not None and running.alias == alias:
            raise ConflictError(
                f"a rollout of {name}@{running.candidate} to {alias!r} is running "
                f"({running.id}); it moves the alias itself when its rule passes: wait for "
                f"its decision, or `rollout abort {name}` first"
            )

    def _check_expected(self, name: str, state: AliasState, expected: str | None) -> None:
        if expected is not None and expected != state.token:
            raise ConflictError(
                f"the aliases of {name!r} changed since they were read (another promote or "
                "rollback); nothing was changed: read them again and retry"
            )

    def rollback(
        self, name: str, alias: str = DEFAULT_ALIAS, expected_token: str | None = None
    ) -> str:
        """Point ``alias`` back to its previous target; returns that version."""
        _check_alias(alias)
        with self._alias_writing(name):
            before = self.alias_state(name)
            self._check_expected(name, before, expected_token)
            self.refuse_during_rollout(name, alias)
            if alias not in before.aliases:
                raise NotFoundError(f"alias {alias!r} of {name!r} is not set")
            targets = before.history.get(alias, [])
            if len(targets) < 2:
                raise ConflictError(
                    f"alias {alias!r} of {name!r} has no previous target to roll back to"
                )
            previous = targets[-2]
            if previous not in [str(n) for n in self._version_numbers(name)]:
                raise ConflictError(
                    f"previous target of {alias!r} ({name}@{previous}) no longer exists"
                )
            history = {a: list(v) for a, v in before.history.items()}
            history[alias] = targets[:-1]
            current = {**before.aliases, alias: previous}
            self._move_aliases(name, before, current, history, previous, f"rolling back {alias!r}")
            return previous

    # -- rollouts (registry.rollouts: the record, its steps and rule)

    def rollout_state(self, name: str) -> RolloutState:
        """Every kept rollout of ``name``, the revision and the token of rollouts.json."""
        key = f"{validate_name(name, 'model name')}/{ROLLOUTS}"
        try:
            raw, token = self.storage.read_state(key)
        except OSError as e:
            raise self._corrupt_rollouts(name, f"{key} is unreadable: {os_reason(e)}") from e
        return self._parse_rollout_state(name, raw, token)

    def rollout_state_if_changed(self, name: str, token: str) -> RolloutState | None:
        """The rollout state, or None while ``token`` is current (one conditional read,
        as :meth:`alias_state_if_changed`): what every serving process polls."""
        key = f"{validate_name(name, 'model name')}/{ROLLOUTS}"
        try:
            changed = self.storage.read_state_if_changed(key, token)
        except OSError as e:
            raise self._corrupt_rollouts(name, f"{key} is unreadable: {os_reason(e)}") from e
        return None if changed is None else self._parse_rollout_state(name, *changed)

    def _corrupt_rollouts(self, name: str, problem: str) -> MetadataError:
        return MetadataError(
            f"{problem}; the versions and aliases are unaffected: run `python -m "
            f"service.registry_cli repair {name}` to restore it from {ROLLOUTS_LOG}"
        )

    def _parse_rollout_state(self, name: str, raw: bytes | None, token: str) -> RolloutState:
        if raw is None:
            return RolloutState((), 0, token)
        where = f"{name}/{ROLLOUTS}"
        try:
            return parse_rollouts(parse_json(raw, where, MetadataError), where, token)
        except MetadataError as e:
            raise self._corrupt_rollouts(name, str(e)) from e

    def _write_rollouts(self, name: str, before: RolloutState, rollout: Rollout) -> RolloutState:
        """Write ``rollout`` over ``before`` (compare-and-swap on its token), then journal
        it in rollouts.log; the new state. ConflictError, nothing written, if it moved."""
        after = RolloutState(before.with_latest(rollout), before.revision + 1, "")
        key = f"{name}/{ROLLOUTS}"
        try:
            with self._writing(key):
                token = self.storage.write_state(key, dump_json(after.to_dict()), before.token)
        except ConflictError as e:
            raise ConflictError(
                f"the rollouts of {name!r} changed meanwhile (another start, decision or "
                "abort won the race); nothing was changed: check `rollout status` and retry"
            ) from e
        line = {"time": rollout.decisions[-1].time, "revision": after.revision}
        with suppress(OSError, RegistryError):
            self.storage.append_line(
                f"{name}/{ROLLOUTS_LOG}", json.dumps({**line, "rollout": rollout.to_dict()})
            )
        return replace(after, token=token)

    def start_rollout(
        self,
        name: str,
        candidate: str,
        steps: tuple[Step, ...],
        rule: Rule,
        alias: str = DEFAULT_ALIAS,
        by: str = "",
    ) -> Rollout:
        """Start rolling ``name@candidate`` out to ``alias`` through ``steps`` under ``rule``.

        Refused, with nothing written: an unknown model, version or unset alias
        (NotFoundError), a candidate that is what the alias names already or a rollout
        of ``name`` still running (ConflictError). The serving processes do the rest.
        """
        _check_alias(alias)
        if not is_version(str(candidate)):
            raise InvalidNameError(f"the candidate must be a version number, got {candidate!r}")
        if not steps or not all(isinstance(s, Step) for s in steps):
            raise TypeError("steps must be registry.rollouts.Step (see validate_steps)")
        with self._alias_writing(name):
            candidate = self._resolve_version(name, str(candidate))
            aliases = self.alias_state(name).aliases
            if alias not in aliases:
                raise NotFoundError(
                    f"alias {alias!r} of {name!r} is not set: promote a first version, "
                    "then roll the next one out against it"
                )
            stable = aliases[alias]
            if stable == candidate:
                raise ConflictError(
                    f"{name}@{candidate} is what {alias!r} names already: nothing to roll out"
                )
            before = self.rollout_state(name)
            running = before.running
            if running is not None:
                raise ConflictError(
                    f"a rollout of {name!r} is running already ({running.id}: "
                    f"{running.stable} -> {running.candidate}); wait for its decision or "
                    "abort it first"
                )
            rollout = Rollout.new(name, alias, stable, candidate, tuple(steps), rule, by)
            self._write_rollouts(name, before, rollout)
        self._note_decision(name, rollout)
        return rollout

    def decide_rollout(
        self,
        name: str,
        rollout_id: str,
        action: str,
        reason: str,
        evidence: dict | None = None,
        by: str = "",
        step: int | None = None,
    ) -> Rollout:
        """Record a decision of the running rollout ``rollout_id`` (registry.rollouts.ACTIONS)
        with its evidence, in rollouts.json and in the alias journal; on ``promote`` the
        alias moves to the candidate right after.

        A compare-and-swap: ConflictError, nothing written, when ``rollout_id`` is no longer
        the running rollout (another process decided first, or it was aborted), when
        ``step`` (the step the decision was taken on, if given) is no longer its current
        step, or when a ``check`` finds the check set already passed: two processes that
        judge the same step write one decision between them.
        """
        with self._alias_writing(name):
            before = self.rollout_state(name)
            running = before.running
            if running is None or running.id != rollout_id:
                latest = before.latest
                now = f"{latest.id} is {latest.state}" if latest is not None else "none exists"
                raise ConflictError(
                    f"rollout {rollout_id} of {name!r} is not running ({now}); nothing was changed"
                )
            if step is not None and running.step != step:
                raise ConflictError(
                    f"rollout {rollout_id} of {name!r} is at step {running.step + 1}, not "
                    f"{step + 1}: another process decided first; nothing was changed"
                )
            if action == "check" and running.checked:
                raise ConflictError(
                    f"the check set of rollout {rollout_id} of {name!r} was passed already; "
                    "nothing was changed"
                )
            after = running.decided(action, reason, evidence, by)
            self._write_rollouts(name, before, after)
        if action == "promote":
            self.finish_promotion(name, after)
        else:
            self._note_decision(name, after)
        return after

    def abort_rollout(self, name: str, reason: str = "", by: str = "") -> Rollout:
        """Stop the running rollout of ``name``: the candidate is dropped, the alias stays.
        ConflictError when none is running."""
        running = self.rollout_state(name).running
        if running is None:
            raise ConflictError(f"no rollout of {name!r} is running; nothing to abort")
        return self.decide_rollout(
            name, running.id, "abort", reason or "aborted by an operator", by=by
        )

    def finish_promotion(self, name: str, rollout: Rollout) -> bool:
        """Point the alias of a promoted ``rollout`` at its candidate, if it still names the
        stable version; True if this call moved it.

        The promote writes rollouts.json first, then the alias: a process that dies in
        between leaves a promoted record with the alias unmoved, and whoever reads the
        record next calls this (idempotent). An alias someone else moved meanwhile is left.
        """
        if rollout.state != "promoted":
            return False
        state = self.alias_state(name)
        if state.aliases.get(rollout.alias) != rollout.stable:
            return False
        try:
            self.set_alias(
                name,
                rollout.alias,
                rollout.candidate,
                expected_token=state.token,
                note=_decision_note(rollout),
            )
        except ConflictError:
            return False  # moved meanwhile: by another process finishing it, or a person
        return True

    def _note_decision(self, name: str, rollout: Rollout) -> None:
        # the alias journal is best effort, as for alias moves: never fail a decision on it
        with suppress(OSError, RegistryError):
            self.note_aliases(name, _decision_note(rollout))

    # -- integrity

    def verify(self, ref_or_version: str | ModelVersion) -> list[str]:
        """Problems found in one version (empty list = OK); re-reads everything from storage."""
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

    def _check_file(self, name: str, version: str, filename: str, entry: FileEntry) -> str | None:
        """A problem naming ``filename`` (and where a shared file lives), or None."""
        if entry.location is None:
            problem = self.storage.check(f"{name}/{version}/{filename}", entry)
            return f"{filename}: {problem}" if problem else None
        owner = entry.stored_in
        where = f"{filename} (stored once, in {name}@{owner})"
        if owner is None or int(owner) not in self._version_numbers(name):
            return f"{where}: missing: {name}@{owner} does not exist"
        problem = self.storage.check(f"{name}/{entry.location}", entry)
        return f"{where}: {problem}" if problem else None

    def check_file(self, mv: ModelVersion, filename: str) -> str | None:
        """What is wrong with one published or derived file of ``mv`` (None: it verifies)."""
        entry = self._entry(mv, filename)
        return self._check_file(mv.name, mv.version, filename, entry)

    def _entry(self, mv: ModelVersion, filename: str) -> FileEntry:
        validate_name(filename, "file name")
        entry = mv.manifest.files.get(filename)
        if entry is not None:
            return entry
        raw = self.derived(mv).get("files", {}).get(filename)
        if raw is None:
            raise NotFoundError(f"{filename} is not part of {mv.ref}")
        try:  # derived files are per version: always in its own folder
            return replace(FileEntry.from_dict(raw), location=None)
        except ValueError as e:
            raise IntegrityError(f"{mv.ref}: {filename}: malformed checksum entry") from e

    def _verify_dir(self, name: str, version: str) -> list[str]:
        problems: list[str] = []
        try:
            manifest, _ = self._read_manifest(name, version)
        except IntegrityError as e:
            return [f"{MANIFEST_FILE}: unreadable, invalid or altered ({e})"]
        if manifest.name != name or manifest.version != version:
            problems.append(f"{MANIFEST_FILE}: says {manifest.ref}, but lives in {name}/{version}")
        expected = {MANIFEST_FILE, MANIFEST_DIGEST_FILE}
        for filename, entry in manifest.files.items():
            if entry.location is None:
                expected.add(filename)
            problem = self._check_file(name, version, filename, entry)
            if problem:
                problems.append(problem)
        try:
            raw = self.storage.read_optional(f"{name}/{version}/{EXPORTS_FILE}")
        except OSError as e:
            raw = None
            problems.append(f"{EXPORTS_FILE}: unreadable ({os_reason(e)})")
            expected.add(EXPORTS_FILE)
        if raw is not None:
            expected.add(EXPORTS_FILE)
            try:
                derived = parse_json(raw, EXPORTS_FILE)
                if not isinstance(derived, dict) or not isinstance(derived.get("files", {}), dict):
                    raise IntegrityError("not an object with a files table")
                for filename, raw_entry in derived.get("files", {}).items():
                    expected.add(filename)
                    try:
                        entry = replace(FileEntry.from_dict(raw_entry), location=None)
                    except ValueError:
                        problems.append(f"{filename}: malformed checksum entry")
                        continue
                    problem = self._check_file(name, version, filename, entry)
                    if problem:
                        problems.append(problem)
            except IntegrityError as e:
                problems.append(f"{EXPORTS_FILE}: unreadable ({e})")
        for filename in sorted(self.storage.version_files(name, version)):
            # Temp files are half-written derived files of a crashed writer: never served
            # (check_model reports them).
            if filename not in expected and not filename.startswith(TMP_PREFIX):
                problems.append(f"{filename}: unexpected file (not in manifest or exports)")
        return problems

    def warnings(self, mv: ModelVersion) -> list[str]:
        """What is not wrong with ``mv`` but weaker than it should be."""
        if self.storage.exists(f"{mv.name}/{mv.version}/{MANIFEST_DIGEST_FILE}"):
            return []
        return [
            f"{MANIFEST_DIGEST_FILE}: missing, so changes to {MANIFEST_FILE} go unnoticed "
            f"(published before manifests had a digest); after checking the version, run "
            f"`python -m service.registry_cli seal {mv.ref}`"
        ]

    def check_model(self, name: str) -> tuple[list[str], list[str]]:
        """(problems, warnings) of a model's own files: aliases.json, deleted.json, temp.

        Problems: an unreadable or malformed aliases.json / deleted.json, an alias whose
        target does not exist. Warnings: leftovers of dead writers (temp folders and files,
        a version never committed; removed by the next publish or ``repair``) and of
        writers still at work.
        """
        problems: list[str] = []
        warnings: list[str] = []
        existing = {str(n) for n in self._version_numbers(name)}
        try:
            for alias, target in sorted(self.aliases(name).items()):
                if target not in existing:
                    problems.append(
                        f"{ALIASES}: alias {alias!r} points at version {target}, which does "
                        f"not exist; run `python -m service.registry_cli repair {name}`"
                    )
        except MetadataError as e:
            problems.append(str(e))
        try:
            self._deleted(name)
        except MetadataError as e:
            problems.append(f"{e}; run `python -m service.registry_cli repair {name}`")
        problems += self._check_rollouts(name, existing)
        for d in self.storage.debris(name):
            if d.alive:
                warnings.append(f"{d.where}: temporary, in use by a running writer")
            else:
                warnings.append(
                    f"{d.where}: stray temporary {d.what} of a writer that died; removed by "
                    "the next publish or `repair`"
                )
        return problems, warnings

    def _check_rollouts(self, name: str, existing: set[str]) -> list[str]:
        """Problems of rollouts.json: unreadable or malformed; a running rollout whose
        versions or alias are gone, or for another model."""
        try:
            state = self.rollout_state(name)
        except MetadataError as e:
            return [str(e)]
        running = state.running
        if running is None:
            return []
        where = f"{ROLLOUTS}: running rollout {running.id}"
        roles = (("stable version", running.stable), ("candidate", running.candidate))
        problems = [
            f"{where}: its {role} {name}@{version} does not exist; `rollout abort {name}`"
            for role, version in roles
            if version not in existing
        ]
        if running.model != name:
            problems.append(f"{where} is for model {running.model!r}, but lives in {name}/")
        return problems

    def seal(self, mv: ModelVersion) -> bool:
        """Write manifest.sha256 for a version published without one; False if it had one.

        Refused (IntegrityError) unless every file matches the manifest: sealing records
        the manifest as it is, so check it first (``show``, ``verify``).
        """
        folder = f"{mv.name}/{mv.version}"
        with self._locked(mv.name):
            if self.storage.exists(f"{folder}/{MANIFEST_DIGEST_FILE}"):
                return False
            problems = self._verify_dir(mv.name, mv.version)
            if problems:
                raise IntegrityError(f"{mv.ref} does not verify, not sealed: {problems[0]}")
            with self._writing(f"{folder}/{MANIFEST_DIGEST_FILE}"):
                raw = self.storage.read(f"{folder}/{MANIFEST_FILE}")
                self.storage.write(f"{folder}/{MANIFEST_DIGEST_FILE}", digest_text(raw))
            return True

    def repair(self, name: str, reset: bool = False) -> list[str]:
        """Restore a corrupt aliases.json / deleted.json of ``name``; what was done.

        aliases.json comes back from the newest entry of aliases.log whose targets all
        exist (``reset``: empty, no aliases). A corrupt file is kept beside as
        ``<file>.corrupt`` for inspection. Leftovers of dead writers (temp folders, derived
        files half written, versions never committed) are removed.
        """
        done: list[str] = []
        aliases_key, deleted_key = f"{name}/{ALIASES}", f"{name}/{DELETED}"
        with self._locked(name), self._writing(f"the registry files of {name!r}"):
            done += [f"removed {where}" for where in self.storage.remove_debris(name)]
            existing = {str(n) for n in self._version_numbers(name)}
            aliases_ok = True
            try:
                state = self.alias_state(name)
                token = state.token
                aliases_ok = all(v in existing for v in state.aliases.values())
            except MetadataError:
                aliases_ok = False
                token = self.storage.read_state(aliases_key)[1]
            if reset or not aliases_ok:
                restored = None if reset else self._from_alias_log(name, existing)
                if restored is None and not reset:
                    raise MetadataError(
                        f"{name}/{ALIASES} is corrupt and {name}/{ALIASES_LOG} holds no usable "
                        f"entry; `repair {name} --reset` empties it (then promote a version)"
                    )
                if self.storage.exists(aliases_key):
                    self.storage.copy(aliases_key, aliases_key + ".corrupt")
                current, history = restored or ({}, {})
                self._write_aliases(name, current, history, token)
                listed = ", ".join(f"{a} -> {v}" for a, v in sorted(current.items()))
                source = f"from {ALIASES_LOG}" if restored else "reset"
                done.append(f"{name}/{ALIASES} {source}: {listed or 'no aliases'}")
            done += self._repair_rollouts(name)
            try:
                self._deleted(name)
            except MetadataError:
                # Numbers must never be reused: every gap below the highest number known
                # (versions, alias history) counts as deleted.
                known = existing | {v for vs in self._alias_log_targets(name) for v in vs}
                top = max((int(v) for v in known), default=0)
                gaps = [str(n) for n in range(1, top + 1) if str(n) not in existing]
                self.storage.copy(deleted_key, deleted_key + ".corrupt")
                self.storage.write(deleted_key, dump_json({"deleted": gaps}))
                done.append(f"{name}/{DELETED} rebuilt: {', '.join(gaps) or 'none'} deleted")
        return done

    def _repair_rollouts(self, name: str) -> list[str]:
        """Rebuild a corrupt rollouts.json from rollouts.log (the newest record of each
        rollout that parses; the corrupt file kept beside). Holding the model's lock."""
        key = f"{name}/{ROLLOUTS}"
        try:
            self.rollout_state(name)
            return []
        except MetadataError:
            token = self.storage.read_state(key)[1]
        latest: dict[str, Rollout] = {}
        revision = 0
        raw = self.storage.read_optional(f"{name}/{ROLLOUTS_LOG}") or b""
        for line in raw.decode("utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                rollout = Rollout.from_dict(entry["rollout"], ROLLOUTS_LOG)
                revision = max(revision, int(entry.get("revision", 0)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, MetadataError):
                continue  # e.g. the torn last line of a crash
            latest.pop(rollout.id, None)  # re-inserted: ordered by their latest record
            latest[rollout.id] = rollout
        rollouts = list(latest.values())
        # only the newest may be running: an older one still "running" lost its ending
        for i, r in enumerate(rollouts[:-1]):
            if r.running:
                rollouts[i] = r.decided("abort", "rollouts.json was repaired without its ending")
        if self.storage.exists(key):
            self.storage.copy(key, key + ".corrupt")
        state = RolloutState(tuple(rollouts), revision + 1, "")
        self.storage.write_state(key, dump_json(state.to_dict()), token)
        running = state.running
        now = f"; {running.id} is running" if running else ""
        return [f"{key} restored from {ROLLOUTS_LOG}: {len(rollouts)} rollout(s){now}"]

    def _alias_log(self, name: str) -> list[tuple[dict[str, str], dict[str, list[str]]]]:
        """Every valid state in aliases.log, oldest first (broken lines skipped)."""
        try:
            raw = self.storage.read_optional(f"{name}/{ALIASES_LOG}")
        except OSError as e:
            raise MetadataError(f"{name}/{ALIASES_LOG} is unreadable: {os_reason(e)}") from e
        states = []
        for line in (raw or b"").decode("utf-8", errors="replace").splitlines():
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
        """A local path of ``filename`` whose size and sha256 were checked just now.

        A local registry checks the file in place; a remote one downloads it into the
        local cache and checks it there first. IntegrityError naming the file otherwise:
        a corrupt file is never handed out.
        """
        entry = self._entry(mv, filename)
        key = (
            f"{mv.name}/{entry.location}"
            if entry.location is not None
            else f"{mv.name}/{mv.version}/{filename}"
        )
        try:
            return self.storage.local_file(key, entry, filename)
        except IntegrityError as e:
            where = f" (stored once, in {mv.name}@{entry.stored_in})" if entry.location else ""
            raise IntegrityError(f"{mv.ref}: {filename}{where}: {e}") from None

    @contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """A private local folder to build files for ``name`` in (exports before they are
        registered, a golden set before it is published); removed on exit, and by the next
        publish or ``repair`` if this process dies first. It lives in the registry's own
        temp area (the model's folder; for a remote registry, the local cache)."""
        validate_name(name, "model name")
        with self._writing(f"a scratch folder of {name!r}"), self.storage.scratch(name) as path:
            yield path

    # -- derived files

    def derived(self, mv: ModelVersion) -> dict:
        """Contents of exports.json ({} if nothing has been derived yet)."""
        label = f"{EXPORTS_FILE} of {mv.ref}"
        try:
            raw = self.storage.read_optional(f"{mv.name}/{mv.version}/{EXPORTS_FILE}")
        except OSError as e:
            raise IntegrityError(f"{label} is unreadable: {os_reason(e)}") from e
        if raw is None:
            return {}
        data = parse_json(raw, label)
        if not isinstance(data, dict):
            raise IntegrityError(f"{label} is not a JSON object")
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
            folder = f"{mv.name}/{self._resolve_version(mv.name, mv.version)}"
            self.storage.remove_debris(mv.name)
            exports = self.derived(mv)
            recorded = dict(exports.get("files", {}))
            for filename, src in files.items():
                recorded[filename] = self.storage.replace_file(
                    f"{folder}/{filename}", src
                ).to_dict()
            self.storage.write(
                f"{folder}/{EXPORTS_FILE}", dump_json({**exports, **info, "files": recorded})
            )

    # -- deletion

    def delete(self, name: str, version: str) -> None:
        """Remove an unaliased version whose files no other version shares; its number is
        never reused."""
        if not is_version(str(version)):
            raise InvalidNameError(f"delete takes a version number, got {version!r}")
        with self._locked(name), self._writing(f"{name}/{DELETED}"):
            version = self._resolve_version(name, str(version))
            running = self.rollout_state(name).running
            if running is not None and version in (running.stable, running.candidate):
                raise ConflictError(
                    f"{name}@{version} is in the running rollout {running.id} "
                    f"({running.stable} -> {running.candidate}); abort it or let it decide first"
                )
            pointing = self._aliases_pointing(name, version)
            if pointing:
                raise ConflictError(
                    f"{name}@{version} is the target of alias(es) {', '.join(pointing)}; "
                    "promote another version first"
                )
            self._refuse_if_shared(name, version)
            deleted = self._deleted(name)
            self.storage.write(f"{name}/{DELETED}", dump_json({"deleted": [*deleted, version]}))
            unused = self.storage.remove_version(
                name, version, lambda: not self._aliases_pointing(name, version)
            )
            if not unused:
                self.storage.write(f"{name}/{DELETED}", dump_json({"deleted": deleted}))
                raise ConflictError(
                    f"{name}@{version} became the target of an alias while being deleted; "
                    "it is kept"
                )

    def _aliases_pointing(self, name: str, version: str) -> list[str]:
        return sorted(a for a, v in self.aliases(name).items() if v == version)

    def _refuse_if_shared(self, name: str, version: str) -> None:
        """ConflictError if another version reads files stored in ``name@version``."""
        for n in self._version_numbers(name):
            if str(n) == version:
                continue
            other = self._load(name, str(n), strict=False)
            if other.problem is not None:
                raise ConflictError(
                    f"cannot tell whether {other.ref} shares files of {name}@{version}: "
                    f"{other.problem}; run verify, then repair or delete {other.ref} first"
                )
            shared = sorted(fn for fn, e in other.manifest.files.items() if e.stored_in == version)
            if shared:
                raise ConflictError(
                    f"{name}@{version} stores {', '.join(shared)} for {other.ref} (stored "
                    f"once, shared); delete {other.ref} first, or keep {name}@{version}"
                )

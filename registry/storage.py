"""Where a registry keeps its bytes: a local folder, or an object store (S3 API).

:class:`registry.store.Registry` holds the rules (immutable versions, checksums, aliases
with history, what is visible when); a :class:`Storage` holds the bytes and provides the
few primitives whose guarantees differ by medium: the commit point of a publish, the
writers' lock, the compare-and-swap of the alias file, temp debris, a verified local copy.

Keys are ``/``-separated and relative to the root (``seednet/3/manifest.json``); they are
also what messages name, never an absolute path or a credential.

:func:`open_storage` picks the medium from the root: a path or ``file://...`` is a local
folder (the default, no extra dependency); ``s3://bucket/prefix`` is an S3 bucket through
fsspec + s3fs, imported only then.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from registry.errors import RegistryError
from registry.manifest import FileEntry

# The token of a file that does not exist (compare-and-swap: "create, never replace").
ABSENT = ""


@dataclass(frozen=True)
class Debris:
    """A leftover of a writer, as ``verify`` reports it."""

    where: str  # key relative to the root, as messages name it
    alive: bool  # its writer is still at work
    what: str  # "folder", "file", "version"


class Staging(ABC):
    """The files of a version being published, before its number is known."""

    @abstractmethod
    def add(self, filename: str, src: Path | bytes) -> FileEntry:
        """Copy ``src`` in, hashing exactly the bytes kept."""

    @abstractmethod
    def drop(self, filename: str) -> None:
        """Forget a file that will not be stored (its bytes are shared)."""

    @abstractmethod
    def commit(self, model: str, version: str, manifest: bytes, digest: bytes) -> None:
        """Make ``model/version`` visible with the files added: files first, manifest and
        digest last. Called holding the model's lock; the version number is unused."""

    @abstractmethod
    def release(self) -> None:
        """Remove whatever is left (nothing after a commit)."""


class Storage(ABC):
    """The bytes of a registry. See the module docstring."""

    root: Path | str
    # Whether alias writes take the writers' lock (local) or rely on compare-and-swap
    # alone (object store: a promote never waits for a publish).
    alias_writes_locked: bool

    # -- reading
    @abstractmethod
    def list_names(self, key: str = "") -> list[str]:
        """Names directly under ``key`` (files and folders); [] when there is none."""

    @abstractmethod
    def model_exists(self, model: str) -> bool: ...

    @abstractmethod
    def version_numbers(self, model: str) -> list[int]:
        """Committed versions of ``model``, sorted (a partial version is never listed)."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The bytes of ``key``: FileNotFoundError if absent, OSError if unreadable."""

    def read_optional(self, key: str) -> bytes | None:
        try:
            return self.read(key)
        except FileNotFoundError:
            return None

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_state(self, key: str) -> tuple[bytes | None, str]:
        """(content or None when absent, token) of a file changed by compare-and-swap."""

    @abstractmethod
    def read_state_if_changed(self, key: str, token: str) -> tuple[bytes | None, str] | None:
        """Like :meth:`read_state`, or None (nothing downloaded) while ``token`` is current."""

    @abstractmethod
    def check(self, key: str, entry: FileEntry) -> str | None:
        """What is wrong with the bytes at ``key`` (re-read from the medium), or None."""

    @abstractmethod
    def local_file(self, key: str, entry: FileEntry, filename: str) -> Path:
        """A local path (named ``filename``, for runtimes that read the extension) whose
        bytes were checked against ``entry`` just now.

        Raises IntegrityError (``"<key>: <problem>"``) if they differ; never returns
        unchecked bytes.
        """

    @abstractmethod
    def version_files(self, model: str, version: str) -> list[str]:
        """Names in a version's folder (temp entries included)."""

    @abstractmethod
    def version_path(self, model: str, version: str) -> Path | PurePosixPath:
        """The version's folder (local) or its key (object store), for ModelVersion.path."""

    # -- writing (holding the model's lock unless said otherwise)
    @abstractmethod
    def lock(self, model: str, create: bool) -> AbstractContextManager[None]:
        """The model's writers' lock (ConflictError when busy too long)."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Replace ``key`` atomically: a reader sees the old or the new bytes."""

    @abstractmethod
    def write_state(self, key: str, data: bytes, expected: str) -> str:
        """Replace ``key`` only if its token is still ``expected`` (ABSENT: create only);
        the new token. ConflictError if it changed: nothing is written."""

    @abstractmethod
    def append_line(self, key: str, line: str) -> None:
        """Add a line to a journal (best effort: a lost line never fails the caller)."""

    @abstractmethod
    def copy(self, key: str, new_key: str) -> None: ...

    @abstractmethod
    def replace_file(self, key: str, src: Path | bytes) -> FileEntry:
        """Write a derived file: a reader sees the whole old or the whole new one."""

    @abstractmethod
    def stage(self, model: str) -> Staging:
        """Start a publish (no lock needed: copying runs beside other writers)."""

    @abstractmethod
    def remove_version(self, model: str, version: str, still_unused: Callable[[], bool]) -> bool:
        """Hide a version at once, then remove its files if ``still_unused()`` (checked
        after hiding) is true; otherwise unhide it and return False."""

    @abstractmethod
    def remove_debris(self, model: str) -> list[str]:
        """Remove what dead writers left in ``model`` (the caller holds its lock)."""

    @abstractmethod
    def debris(self, model: str) -> list[Debris]:
        """What writers left in ``model``, dead or alive (no lock needed)."""

    @abstractmethod
    def scratch(self, model: str) -> AbstractContextManager[Path]:
        """A private local folder for building files to publish, removed on exit and, if
        its process dies, by the next publish or ``repair``."""


def open_storage(
    root: Path | str, *, cache_dir: Path | str | None = None, lock_lease_s: float | None = None
) -> Storage:
    """The storage for a registry root: a path, ``file://PATH`` or ``s3://bucket/prefix``."""
    if isinstance(root, Path):
        from registry.localfs import LocalStorage

        return LocalStorage(root)
    text = str(root)
    scheme, sep, rest = text.partition("://")
    if not sep:
        from registry.localfs import LocalStorage

        return LocalStorage(Path(text))
    scheme = scheme.lower()
    if scheme == "file":
        from registry.localfs import LocalStorage

        return LocalStorage(Path(rest or "."))
    if scheme in ("s3", "s3a"):
        from registry.objectstore import ObjectStorage

        return ObjectStorage(rest, cache_dir=cache_dir, lock_lease_s=lock_lease_s)
    raise RegistryError(
        f"unsupported registry root {scheme}://...: use a folder, file://PATH or "
        "s3://bucket/prefix (S3 or any S3-compatible store)"
    )

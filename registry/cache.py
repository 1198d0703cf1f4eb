"""The local cache of a remote registry: files verified by sha256 before anyone opens them.

Layout, under ``$SEEDNET_REGISTRY_CACHE`` (default ``$XDG_CACHE_HOME/seednet/registry``,
else ``~/.cache/seednet/registry``)::

    files/<sha256>/<file name>   a verified copy (content-addressed: one copy whatever the
                                 version, model or bucket; the name keeps its extension,
                                 which some runtimes read)
    files/<sha256>/.tmp-*        a download in progress (or of a process that died)
    scratch/.tmp-*               private build folders (exports before they are uploaded)

A copy is re-hashed every time it is handed out, as local registries re-hash in place, so
a damaged cache is refetched, never served. Entries never go stale (versions are
immutable); deleting the folder is always safe while no process is using it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from registry.errors import IntegrityError
from registry.files import check_file, remove_dead_tmp, tmp_name
from registry.manifest import FileEntry

CACHE_ENV = "SEEDNET_REGISTRY_CACHE"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "seednet" / "registry"


class VerifiedCache:
    """Content-addressed local copies, each checked against its sha256 before use."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_cache_dir()

    @property
    def scratch_root(self) -> Path:
        return self.folder / "scratch"

    def path_for(self, entry: FileEntry, filename: str) -> Path:
        return self.folder / "files" / entry.sha256 / filename

    def get(self, entry: FileEntry, filename: str, fetch: Callable[[Path], None]) -> Path:
        """The verified local copy of ``entry``, fetched into ``path`` by ``fetch`` if needed.

        IntegrityError (the problem, e.g. ``sha256 mismatch ...``) when the fetched bytes
        are not the recorded ones; nothing of them stays in the cache.
        """
        final = self.path_for(entry, filename)
        if final.is_file():
            if check_file(final, entry.sha256, entry.size) is None:
                return final
            final.unlink(missing_ok=True)  # damaged locally: fetch again
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_tmp(final.parent)  # downloads of dead processes (young ones are kept)
        tmp = final.with_name(tmp_name(filename))
        try:
            fetch(tmp)
            problem = check_file(tmp, entry.sha256, entry.size)
            if problem:
                raise IntegrityError(problem)
            os.replace(tmp, final)  # another process may have done the same: same bytes
        finally:
            tmp.unlink(missing_ok=True)
        return final

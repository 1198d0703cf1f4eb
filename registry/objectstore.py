"""A registry in an S3 bucket (AWS S3 or any S3-compatible store), through fsspec + s3fs.

Why fsspec + s3fs: the reference Python interface to object stores (pandas, Dask,
Hugging Face, MLflow use it), credentials resolved by botocore exactly as the AWS CLI
does (environment, ``~/.aws``, instance/pod roles, ``AWS_ENDPOINT_URL`` for other
stores), and it passes S3's conditional-write parameters through untouched. It is
imported only when a root is ``s3://...``; a local registry never needs it.

The same keys as a local folder (``<model>/<version>/<file>``, ``<model>/aliases.json``,
...), with the commit protocol an object store allows:

- publish (holding the model's lease lock, :mod:`registry.objectlock`): the files, then
  ``manifest.json``, then ``manifest.sha256`` (both ``If-None-Match: *``). A version is
  visible only once its ``manifest.sha256`` exists, so a reader never sees a partial one;
  a version folder without it is a dead publisher's debris, removed by the next publish or
  ``repair``.
- aliases.json: compare-and-swap on its ETag (``If-Match``, or ``If-None-Match: *`` to
  create it), so of two concurrent promotes exactly one wins.
- reading a file for use: downloaded into the local cache and checked against its sha256
  first (:mod:`registry.cache`).

Credentials are never taken from the URL, never logged, never put in a message.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath
from typing import Any

from registry.cache import VerifiedCache
from registry.errors import (
    ConflictError,
    IntegrityError,
    RegistryError,
    StorageError,
    StoreUnavailableError,
)
from registry.files import CHUNK, TMP_PREFIX, OwnedTmpDir, copy_hashed, remove_dead_tmp
from registry.manifest import MANIFEST_DIGEST_FILE, MANIFEST_FILE, FileEntry
from registry.objectlock import DEFAULT_LEASE_SECONDS, LeaseLock
from registry.storage import ABSENT, Debris, Staging, Storage

LOCK_NAME = ".lock"
# Fail fast when the store is down (the service keeps serving what it loaded): a few
# seconds, not botocore's minutes. AWS_MAX_ATTEMPTS / AWS_RETRY_MODE still win when set.
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 30
MAX_ATTEMPTS = 3


def _is_version(name: str) -> bool:
    return name.isascii() and name.isdigit() and len(name) <= 18


def _response(e: BaseException | None) -> dict | None:
    """The S3 error response behind an exception (s3fs wraps botocore's ClientError)."""
    while e is not None:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return response
        e = e.__cause__
    return None


def _status(e: BaseException) -> int | None:
    response = _response(e)
    if response is None:
        return None
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _reason(e: BaseException) -> str:
    response = _response(e)
    if response is not None:
        error = response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".strip(": ")
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


class ObjectStaging(Staging):
    """Files of a version being published: local copies (hashed), uploaded at commit."""

    def __init__(self, store: ObjectStorage, model: str) -> None:
        self.store = store
        store.cache.scratch_root.mkdir(parents=True, exist_ok=True)
        self.owned = OwnedTmpDir(store.cache.scratch_root, f"{model}-publish")
        self.path = self.owned.path
        self.files: list[str] = []

    def add(self, filename: str, src: Path | bytes) -> FileEntry:
        entry = FileEntry.from_dict(copy_hashed(src, self.path / filename))
        self.files.append(filename)
        return entry

    def drop(self, filename: str) -> None:
        self.files.remove(filename)
        (self.path / filename).unlink(missing_ok=True)

    def commit(self, model: str, version: str, manifest: bytes, digest: bytes) -> None:
        folder = f"{model}/{version}"
        for filename in self.files:
            self.store.put_file(f"{folder}/{filename}", self.path / filename)
        self.store.ensure_lock_held(model)
        self.store.write_state(f"{folder}/{MANIFEST_FILE}", manifest, ABSENT)
        self.store.ensure_lock_held(model)
        self.store.write_state(f"{folder}/{MANIFEST_DIGEST_FILE}", digest, ABSENT)

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.owned.release()


class ObjectStorage(Storage):
    alias_writes_locked = False

    def __init__(
        self,
        location: str,
        *,
        cache_dir: Path | str | None = None,
        lock_lease_s: float | None = None,
    ) -> None:
        bucket, _, prefix = location.partition("/")
        if not bucket or "@" in bucket or ":" in bucket:
            raise RegistryError(
                "an s3:// registry root is s3://BUCKET/PREFIX; credentials and endpoints "
                "come from the environment (AWS_* variables, ~/.aws, AWS_ENDPOINT_URL), "
                "never from the URL"
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.cache = VerifiedCache(Path(cache_dir) if cache_dir is not None else None)
        self.lease_s = lock_lease_s or DEFAULT_LEASE_SECONDS
        self._fs: Any = None
        self._fs_lock = threading.Lock()
        self._held = threading.local()  # model -> LeaseLock held by this thread

    def __repr__(self) -> str:
        return f"ObjectStorage({self.root!r})"

    # -- connection

    @property
    def fs(self) -> Any:
        with self._fs_lock:
            if self._fs is None:
                try:
                    import fsspec

                    s3 = fsspec.get_filesystem_class("s3")
                except ImportError as e:
                    raise RegistryError(
                        f"an s3:// registry needs s3fs (pip install s3fs): {e}"
                    ) from e
                config: dict[str, Any] = {
                    "connect_timeout": CONNECT_TIMEOUT_S,
                    "read_timeout": READ_TIMEOUT_S,
                }
                if "AWS_MAX_ATTEMPTS" not in os.environ and "AWS_RETRY_MODE" not in os.environ:
                    config["retries"] = {"max_attempts": MAX_ATTEMPTS, "mode": "standard"}
                fs = s3(
                    skip_instance_cache=True,
                    use_listings_cache=False,  # another process may have written since
                    config_kwargs=config,
                )
                fs.retries = 1  # botocore retries already; s3fs would multiply them
                self._fs = fs
            return self._fs

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{self._object(key)}" if key else f"{self.bucket}/{self.prefix}"

    def _run(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the store; FileNotFoundError as is, any other failure as a StorageError."""
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError, RegistryError):
            raise
        except PermissionError as e:
            raise StorageError(f"{self.root}: access denied while {what} ({_reason(e)})") from e
        except Exception as e:
            if _status(e) == 404:
                raise FileNotFoundError(what) from e
            raise StoreUnavailableError(
                f"registry {self.root} unavailable while {what}: {_reason(e)}"
            ) from e

    def _sync(self, coroutine_function: Callable[..., Any], *args: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, coroutine_function, *args)

    async def _get(self, key: str, if_none_match: str | None = None) -> tuple[bytes, str]:
        extra = {"IfNoneMatch": if_none_match} if if_none_match else {}
        response = await self.fs._call_s3(
            "get_object", Bucket=self.bucket, Key=self._object(key), **extra
        )
        body = response["Body"]
        try:
            data = await body.read()
        finally:
            body.close()
        return data, response["ETag"]

    async def _stream(self, key: str, sink: Callable[[bytes], None]) -> None:
        response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._object(key))
        body = response["Body"]
        try:
            while chunk := await body.read(CHUNK):
                sink(chunk)
        finally:
            body.close()

    def _put(self, key: str, data: bytes, **conditions: str) -> str:
        response = self.fs.call_s3(
            "put_object", Bucket=self.bucket, Key=self._object(key), Body=data, **conditions
        )
        return response["ETag"]

    # -- reading

    def list_names(self, key: str = "") -> list[str]:
        try:
            found = self._run(f"listing {key or '/'}", self.fs.ls, self._path(key), detail=False)
        except FileNotFoundError:
            return []
        return sorted({PurePosixPath(p).name for p in found})

    def model_exists(self, model: str) -> bool:
        return bool(self.list_names(model))

    def _listing(self, model: str) -> dict[str, set[str]]:
        """Every file name under each version folder of ``model`` (one listing call)."""
        base = self._path(model) + "/"
        try:
            keys = self._run(f"listing {model}", self.fs.find, base, detail=False)
        except FileNotFoundError:
            return {}
        folders: dict[str, set[str]] = {}
        for path in keys:
            parts = path[len(base) :].split("/") if path.startswith(base) else []
            if len(parts) == 2 and _is_version(parts[0]):
                folders.setdefault(parts[0], set()).add(parts[1])
        return folders

    def version_numbers(self, model: str) -> list[int]:
        # The digest is written last: without it the version is a publish in progress
        # or the debris of a dead one, never visible.
        return sorted(
            int(v) for v, names in self._listing(model).items() if MANIFEST_DIGEST_FILE in names
        )

    def read(self, key: str) -> bytes:
        return self._run(f"reading {key}", self._sync, self._get, key)[0]

    def exists(self, key: str) -> bool:
        try:
            self._run(
                f"looking up {key}",
                self.fs.call_s3,
                "head_object",
                Bucket=self.bucket,
                Key=self._object(key),
            )
        except FileNotFoundError:
            return False
        return True

    def read_state(self, key: str) -> tuple[bytes | None, str]:
        try:
            return self._run(f"reading {key}", self._sync, self._get, key)
        except FileNotFoundError:
            return None, ABSENT

    def read_state_if_changed(self, key: str, token: str) -> tuple[bytes | None, str] | None:
        if token == ABSENT:
            state = self.read_state(key)
            return None if state[1] == ABSENT else state
        try:
            # A conditional GET: 304 Not Modified, no body, while the ETag is current.
            return self._run(f"reading {key}", self._sync, self._get, key, token)
        except FileNotFoundError:
            return None, ABSENT
        except StoreUnavailableError as e:
            if _status(e) == 304:
                return None
            raise

    def check(self, key: str, entry: FileEntry) -> str | None:
        try:
            info = self._run(f"looking up {key}", self.fs.info, self._path(key))
        except FileNotFoundError:
            return "missing"
        if info.get("size") != entry.size:
            return f"size mismatch (expected {entry.size} bytes, found {info.get('size')})"
        h = hashlib.sha256()
        try:
            self._run(f"reading {key}", self._sync, self._stream, key, h.update)
        except FileNotFoundError:
            return "missing"
        digest = h.hexdigest()
        if digest != entry.sha256:
            return f"sha256 mismatch (expected {entry.sha256[:12]}..., found {digest[:12]}...)"
        return None

    def local_file(self, key: str, entry: FileEntry, filename: str) -> Path:
        def fetch(tmp: Path) -> None:
            with open(tmp, "xb") as out:
                try:
                    self._run(f"downloading {key}", self._sync, self._stream, key, out.write)
                except FileNotFoundError:
                    raise IntegrityError("missing") from None

        return self.cache.get(entry, filename, fetch)

    def version_files(self, model: str, version: str) -> list[str]:
        return self.list_names(f"{model}/{version}")

    def version_path(self, model: str, version: str) -> PurePosixPath:
        return PurePosixPath(model, version)

    # -- writing

    @contextmanager
    def lock(self, model: str, create: bool) -> Iterator[None]:
        lease = LeaseLock(self, f"{model}/{LOCK_NAME}", repr(model), lease_s=self.lease_s)
        lease.acquire()
        held = getattr(self._held, "locks", None) or {}
        self._held.locks = {**held, model: lease}
        try:
            yield
        finally:
            self._held.locks = held
            lease.release()

    def ensure_lock_held(self, model: str) -> None:
        lease = (getattr(self._held, "locks", None) or {}).get(model)
        if lease is None:
            raise ConflictError(f"the registry lock of {model!r} is not held")
        lease.ensure_held()

    def write(self, key: str, data: bytes) -> None:
        self._run(f"writing {key}", self._put, key, data)

    def write_state(self, key: str, data: bytes, expected: str) -> str:
        condition = {"IfNoneMatch": "*"} if expected == ABSENT else {"IfMatch": expected}
        try:
            return self._run(f"writing {key}", self._put, key, data, **condition)
        except FileNotFoundError:
            pass  # If-Match on an object that is gone: it changed
        except FileExistsError:
            pass  # If-None-Match: * on an object that exists
        except StoreUnavailableError as e:
            # 412: the ETag moved; 409: a concurrent conditional write won the race
            if _status(e) not in (409, 412):
                raise
        # A retried PUT may meet its own first attempt: then the write did happen.
        current, token = self.read_state(key)
        if current == data:
            return token
        raise ConflictError(f"{key} was changed by another writer")

    def delete_if(self, key: str, etag: str) -> None:
        """Delete ``key`` if its ETag is still ``etag`` (best effort, for the lease)."""
        # Failing means taken over, gone, or unreachable: the lease runs out by itself.
        with suppress(Exception):
            self.fs.call_s3(
                "delete_object", Bucket=self.bucket, Key=self._object(key), IfMatch=etag
            )

    def append_line(self, key: str, line: str) -> None:
        for _ in range(5):  # a journal line is never worth failing a promote
            try:
                current, token = self.read_state(key)
                self.write_state(key, (current or b"") + (line + "\n").encode(), token)
                return
            except RegistryError:
                continue

    def copy(self, key: str, new_key: str) -> None:
        self._run(f"copying {key}", self.fs.copy, self._path(key), self._path(new_key))

    def put_file(self, key: str, path: Path) -> None:
        self._run(f"uploading {key}", self.fs.put_file, str(path), self._path(key))

    def replace_file(self, key: str, src: Path | bytes) -> FileEntry:
        # A PUT is atomic: a reader sees the whole old object or the whole new one.
        with self.scratch(PurePosixPath(key).parts[0]) as folder:
            staged = folder / PurePosixPath(key).name
            entry = FileEntry.from_dict(copy_hashed(src, staged))
            self.put_file(key, staged)
        return entry

    def stage(self, model: str) -> ObjectStaging:
        return ObjectStaging(self, model)

    def _remove(self, keys: list[str], what: str) -> None:
        if keys:
            self._run(what, self.fs.rm, [self._path(k) for k in keys])

    def remove_version(self, model: str, version: str, still_unused: Callable[[], bool]) -> bool:
        folder = f"{model}/{version}"
        digest = self.read(f"{folder}/{MANIFEST_DIGEST_FILE}")
        # The digest is the commit mark: removing it hides the version at once.
        self._remove([f"{folder}/{MANIFEST_DIGEST_FILE}"], f"deleting {folder}")
        if not still_unused():
            self.write(f"{folder}/{MANIFEST_DIGEST_FILE}", digest)
            return False
        names = self.version_files(model, version)
        self._remove([f"{folder}/{n}" for n in names], f"deleting {folder}")
        return True

    def _uncommitted(self, model: str) -> dict[str, set[str]]:
        return {
            v: names
            for v, names in self._listing(model).items()
            if MANIFEST_DIGEST_FILE not in names
        }

    def remove_debris(self, model: str) -> list[str]:
        # Writers upload only while holding the lock, which the caller holds now: a version
        # folder without its digest is a dead writer's, whatever its age.
        removed = []
        for version, names in sorted(self._uncommitted(model).items()):
            self._remove([f"{model}/{version}/{n}" for n in names], f"cleaning {model}/{version}")
            removed.append(f"{model}/{version}/")
        stray = [n for n in self.list_names(model) if n.startswith(TMP_PREFIX)]
        self._remove([f"{model}/{n}" for n in stray], f"cleaning {model}")
        removed += [f"{model}/{n}" for n in stray]
        if self.cache.scratch_root.is_dir():  # local build folders of dead processes
            remove_dead_tmp(self.cache.scratch_root)
        return removed

    def debris(self, model: str) -> list[Debris]:
        writing = self.exists(f"{model}/{LOCK_NAME}")
        return [
            Debris(f"{model}/{version}/", writing, "version")
            for version in sorted(self._uncommitted(model), key=int)
        ]

    @contextmanager
    def scratch(self, model: str) -> Iterator[Path]:
        self.cache.scratch_root.mkdir(parents=True, exist_ok=True)
        owned = OwnedTmpDir(self.cache.scratch_root, f"{model}-scratch")
        try:
            yield owned.path
        finally:
            shutil.rmtree(owned.path, ignore_errors=True)
            owned.release()

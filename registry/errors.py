"""Registry errors. Each carries a stable ``code``; the service maps codes to HTTP once."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class for every registry error."""

    code = "registry_error"


class NotFoundError(RegistryError):
    """A model, version, alias or file does not exist."""

    code = "not_found"


class InvalidNameError(RegistryError):
    """A model, alias, version or file name is not acceptable."""

    code = "invalid_name"


class IntegrityError(RegistryError):
    """A file is missing, unreadable or differs from its recorded size/sha256."""

    code = "integrity_error"


class ConflictError(RegistryError):
    """The operation conflicts with the registry state (e.g. deleting an aliased version)."""

    code = "conflict"


class MetadataError(IntegrityError):
    """A model's own registry file (aliases.json, deleted.json) is unreadable or malformed.

    Versions stay intact; ``python -m service.registry_cli repair NAME`` restores the file.
    """

    code = "registry_corrupt"


class StorageError(RegistryError):
    """The registry could not be written (read-only, full, permissions); nothing changed."""

    code = "registry_unwritable"


class StoreUnavailableError(StorageError):
    """The registry's store could not be reached or answered with an error (network,
    endpoint, timeout). Nothing changed; a served model keeps serving."""

    code = "registry_unavailable"


class InvalidRolloutError(RegistryError):
    """A rollout command or rule that cannot be carried out as given (a bad step, share,
    threshold or field). Nothing was written."""

    code = "invalid_rollout"

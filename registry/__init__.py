"""The model registry: immutable, checksummed versions, typed manifests, movable aliases.

Standard library and ``filelock`` only (a test enforces it), so every layer can use it;
``fsspec`` (+ s3fs) is imported only for an ``s3://`` root.
"""

from registry.errors import (
    ConflictError,
    IntegrityError,
    InvalidNameError,
    InvalidRolloutError,
    MetadataError,
    NotFoundError,
    RegistryError,
    StorageError,
    StoreUnavailableError,
)
from registry.manifest import Manifest, VersionSpec
from registry.store import DEFAULT_ALIAS, AliasState, ModelVersion, Registry, validate_name

__all__ = [
    "DEFAULT_ALIAS",
    "AliasState",
    "ConflictError",
    "IntegrityError",
    "InvalidNameError",
    "InvalidRolloutError",
    "Manifest",
    "MetadataError",
    "ModelVersion",
    "NotFoundError",
    "Registry",
    "RegistryError",
    "StorageError",
    "StoreUnavailableError",
    "VersionSpec",
    "validate_name",
]

"""The model registry: immutable, checksummed versions, typed manifests, movable aliases.

Standard library and ``filelock`` only (a test enforces it), so every layer can use it.
"""

from registry.errors import (
    ConflictError,
    IntegrityError,
    InvalidNameError,
    MetadataError,
    NotFoundError,
    RegistryError,
    StorageError,
)
from registry.manifest import Manifest, VersionSpec
from registry.store import DEFAULT_ALIAS, ModelVersion, Registry, validate_name

__all__ = [
    "DEFAULT_ALIAS",
    "ConflictError",
    "IntegrityError",
    "InvalidNameError",
    "Manifest",
    "MetadataError",
    "ModelVersion",
    "NotFoundError",
    "Registry",
    "RegistryError",
    "StorageError",
    "VersionSpec",
    "validate_name",
]

"""The manifest of a published version, typed once; every reader and writer goes through it.

``manifest.json`` is written by :meth:`registry.store.Registry.publish` and never changed
afterwards. Schema history:

- 1 (no ``schema_version`` key): the first wave's manifests; they also carry a redundant
  ``input_size`` next to ``input.size``, which is read and dropped.
- 2: ``schema_version`` recorded; ``input_size`` no longer written.
- 3: what schema-2 readers must not take for a version they know, either of:
  a file entry with ``location``: the bytes are shared with an earlier version of the
  same model and live in its folder (``"1/weights.safetensors"``), so they are stored
  once; or a calibrated version: ``calibration`` (the temperature inside the served
  graph), ``ood`` (how ``ood_score`` is computed, the threshold of
  ``out_of_distribution``, the measured quality per out-of-distribution set), ``int8``
  (the int8 export published as a version file and its accuracy gate) and the
  calibration figures in ``metrics``; its exports have a third output, ``ood_score``.
  Code that reads schema 2 at most refuses such a version by its number instead of
  serving what it does not know. Any other version is still written as schema 2.

Reading never rewrites a file, so versions published under schema 1 keep their bytes and
checksums. Keys this code does not know are kept in ``extra`` (and written back by
``to_dict``), at the top level and inside ``metrics``, so a newer writer's additions
survive.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from registry.errors import IntegrityError

# "<version>/<file name>": the same rules as registry.store's names, so it cannot escape.
_LOCATION_RE = re.compile(r"[0-9]{1,18}/[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

SCHEMA_VERSION = 3  # the newest this code reads and writes (see required_schema)
PLAIN_SCHEMA = 2  # what a version without shared files or calibration is written as

MANIFEST_FILE = "manifest.json"
# sha256 of manifest.json's bytes, beside it (``sha256sum -c`` format): the manifest
# holds every other file's checksum, this file holds the manifest's. Written at publish;
# ``seal`` adds it to versions published before it existed, never touching the manifest.
MANIFEST_DIGEST_FILE = "manifest.sha256"
EXPORTS_FILE = "exports.json"
WEIGHTS_FILE = "weights.safetensors"
GOLDEN_FILE = "golden.safetensors"  # real test images + the eager outputs recorded at publish
ATTENTION_REFERENCE_FILE = "attention_per_class.json"
# Derived files (recorded in exports.json), by backend. OpenVINO compiles the ONNX export;
# the int8 export is built by `python -m training quantize` (it needs calibration data).
EXPORT_FILES: dict[str, str] = {
    "torchscript": "model.ts",
    "onnx": "model.onnx",
    "openvino": "model.onnx",
    "onnx-int8": "model.int8.onnx",
}
# The int8 export of a calibrated version is a *published* file (it needs calibration and
# test data to build, so it cannot be derived on a serving host); its gate is in
# ``manifest.int8``. Another name than the derived ``model.int8.onnx`` of older versions.
PUBLISHED_INT8_FILE = "int8.onnx"


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one file of a version, and where its bytes live.

    ``location`` is None for a file stored in the version's own folder, else
    ``"<version>/<file name>"``: the same bytes, stored once, in an earlier version of the
    same model (schema 3). It always names the version that stores the bytes itself.
    """

    sha256: str
    size: int
    location: str | None = None

    @classmethod
    def from_dict(cls, data: object) -> FileEntry:
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("sha256"), str)
            or not isinstance(data.get("size"), int)
            or isinstance(data.get("size"), bool)
        ):
            raise ValueError(f"malformed checksum entry {data!r}")
        location = data.get("location")
        if location is not None and not (
            isinstance(location, str) and _LOCATION_RE.fullmatch(location) and ".." not in location
        ):
            raise ValueError(f"malformed file location {location!r} (want '<version>/<file>')")
        return cls(sha256=data["sha256"], size=data["size"], location=location)

    def to_dict(self) -> dict[str, Any]:
        # No "location": null for a file stored in place: schema-2 bytes stay schema-2 bytes.
        out: dict[str, Any] = {"sha256": self.sha256, "size": self.size}
        if self.location is not None:
            out["location"] = self.location
        return out

    def same_bytes(self, other: FileEntry) -> bool:
        """Whether ``other`` records the same content (wherever it is stored)."""
        return (self.sha256, self.size) == (other.sha256, other.size)

    @property
    def stored_in(self) -> str | None:
        """The version whose folder holds the bytes (None: this version's own)."""
        return None if self.location is None else self.location.split("/", 1)[0]


@dataclass(frozen=True)
class ModelInfo:
    """What network the weights belong to. ``config`` is the network's own config (JSON)."""

    architecture: str
    arch: str
    config: dict
    parameters: int | None = None
    macs_per_image: int | None = None
    blocks: int | None = None
    branches_per_block: list[int] | None = None


@dataclass(frozen=True)
class InputSpec:
    size: tuple[int, int] = (32, 32)
    dtype: str = "uint8"
    layout: str = "NCHW RGB"


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std on the 0..1 scale (applied inside the exported graph)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Metrics:
    """Test-set figures of the trained model (fractions, not percentages).

    Calibration figures (schema 3) are of the served (calibrated) probabilities and of
    the same network without calibration, on images that fitted nothing:
    ``ece`` (expected calibration error, ``ece_bins`` equal-width confidence bins),
    ``nll`` (mean negative log-likelihood of the true class), ``brier`` (mean squared
    error of the probability vector against the one-hot label, summed over classes).
    """

    test_accuracy: float | None = None
    test_accuracy_flip_tta: float | None = None
    test_loss: float | None = None
    per_class_accuracy: dict[str, float] | None = None
    test_images: int | None = None
    ece: float | None = None
    nll: float | None = None
    brier: float | None = None
    uncalibrated_ece: float | None = None
    uncalibrated_nll: float | None = None
    uncalibrated_brier: float | None = None
    ece_bins: int | None = None
    calibration_eval_images: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object) -> Metrics:
        if not isinstance(data, dict):
            raise ValueError("metrics is not an object")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )

    @property
    def calibrated(self) -> bool:
        return self.ece is not None


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling, inside the served graph: ``softmax(logits / temperature)``.

    With a ``curve`` (method ``confidence-temperature``) the served probabilities are
    ``softmax(logits / T(c))``, one temperature per image from its confidence
    (``log_t0``, ``knots``, ``slopes``: seednet.temperature); ``temperature`` is then
    still the one the OOD score uses. ``fitted_on`` / ``evaluated_on`` describe the
    images (never used in training) the calibration was fitted on and the figures in
    ``metrics`` measured on.
    """

    method: str
    temperature: float
    fitted_on: dict = field(default_factory=dict)
    evaluated_on: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    curve: dict | None = None

    @classmethod
    def from_dict(cls, data: object) -> Calibration:
        d = _object(data, "calibration")
        temperature = d.get("temperature")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise ValueError("calibration.temperature must be a number")
        if not temperature > 0:
            raise ValueError("calibration.temperature must be positive")
        curve = d.get("curve")
        if curve is not None and not (
            isinstance(curve, dict)
            and all(isinstance(curve.get(k), list) for k in ("knots", "slopes"))
            and isinstance(curve.get("log_t0"), (int, float))
        ):
            raise ValueError("calibration.curve must hold log_t0, knots and slopes")
        return cls(
            curve=curve,
            method=_str(d.get("method"), "calibration.method"),
            temperature=float(temperature),
            fitted_on=dict(d.get("fitted_on") or {}),
            evaluated_on=dict(d.get("evaluated_on") or {}),
            details=dict(d.get("details") or {}),
        )


@dataclass(frozen=True)
class OutOfDistribution:
    """The ``ood_score`` output and the ``out_of_distribution`` flag.

    ``score`` names the formula (``energy``: ``-logsumexp(logits / T)``), higher
    meaning less like the training images; an image is flagged when its score is above
    ``threshold``, chosen on held-out in-distribution images so that ``target_kept`` of
    them are not flagged. ``kept`` is the share measured on other held-out images, and
    ``sets`` the measured quality on each out-of-distribution set (AUROC, the false
    positive rate at 95 % true positives, the share flagged).
    """

    score: str
    threshold: float
    target_kept: float
    kept: float | None = None
    fitted_on: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    # ``density+energy`` only: the stage, the version file with the class means and the
    # whitening matrix, and the standardising scalars (seednet.ood.FeatureDensity)
    features: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: object) -> OutOfDistribution:
        d = _object(data, "ood")
        return cls(
            score=_str(d.get("score"), "ood.score"),
            threshold=_number(d.get("threshold"), "ood.threshold"),
            target_kept=_number(d.get("target_kept"), "ood.target_kept"),
            kept=None if d.get("kept") is None else _number(d["kept"], "ood.kept"),
            fitted_on=dict(d.get("fitted_on") or {}),
            sets=dict(d.get("sets") or {}),
            details=dict(d.get("details") or {}),
            features=dict(d.get("features") or {}),
        )


@dataclass(frozen=True)
class Int8Gate:
    """The int8 export built at publish and its accuracy gate.

    ``passed``: int8 test accuracy at most ``max_drop_points`` below fp32 on
    ``test_images`` images; only then is ``file`` published (a version file, with its
    sha256 in ``files``), and only then may a server choose it.
    """

    passed: bool
    fp32_accuracy: float
    int8_accuracy: float
    test_images: int
    max_drop_points: float
    file: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def drop_points(self) -> float:
        return (self.fp32_accuracy - self.int8_accuracy) * 100

    @classmethod
    def from_dict(cls, data: object) -> Int8Gate:
        d = _object(data, "int8")
        if not isinstance(d.get("passed"), bool):
            raise ValueError("int8.passed must be true or false")
        test_images = d.get("test_images")
        if not isinstance(test_images, int) or isinstance(test_images, bool):
            raise ValueError("int8.test_images must be an integer")
        file = d.get("file")
        return cls(
            passed=d["passed"],
            fp32_accuracy=_number(d.get("fp32_accuracy"), "int8.fp32_accuracy"),
            int8_accuracy=_number(d.get("int8_accuracy"), "int8.int8_accuracy"),
            test_images=test_images,
            max_drop_points=_number(d.get("max_drop_points"), "int8.max_drop_points"),
            file=None if file is None else _str(file, "int8.file"),
            details=dict(d.get("details") or {}),
        )


@dataclass(frozen=True, kw_only=True)
class VersionSpec:
    """What a publisher states about a version; the registry adds identity and checksums."""

    model: ModelInfo
    class_names: tuple[str, ...]
    normalization: Normalization
    input: InputSpec = field(default_factory=InputSpec)
    metrics: Metrics = field(default_factory=Metrics)
    recipe: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    calibration: Calibration | None = None
    ood: OutOfDistribution | None = None
    int8: Int8Gate | None = None

    def required_schema(self) -> int:
        """The lowest schema that describes this version (see the module docstring)."""
        calibrated = (self.calibration, self.ood, self.int8) != (None, None, None)
        return SCHEMA_VERSION if calibrated or self.metrics.calibrated else PLAIN_SCHEMA


@dataclass(frozen=True, kw_only=True)
class Manifest(VersionSpec):
    """A published version's manifest.json."""

    name: str
    version: str
    created: str
    code_revision: str
    parent: str | None
    files: dict[str, FileEntry]
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    # ----- JSON ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": self.schema_version}
        for f in fields(self):
            if f.name in ("schema_version", "extra"):
                continue
            value = getattr(self, f.name)
            if f.name == "files":
                value = {k: v.to_dict() for k, v in value.items()}
            elif f.name == "class_names":
                value = list(value)
            elif f.name in ("calibration", "ood", "int8") and value is None:
                continue  # absent sections stay absent: schema-2 files round-trip
            elif f.name == "metrics":
                data = _plain(asdict(value))
                extra = data.pop("extra")
                value = {**extra, **{k: v for k, v in data.items() if v is not None or k in _V2}}
            elif f.name == "calibration":
                value = _plain(asdict(value))
                if value["curve"] is None:
                    del value["curve"]  # one temperature: written as before
            elif f.name == "ood":
                value = _plain(asdict(value))
                if not value["features"]:
                    del value["features"]  # energy / max_softmax: written as before
            elif hasattr(value, "__dataclass_fields__"):
                value = _plain(asdict(value))
            out[f.name] = value
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data: object, where: str = MANIFEST_FILE) -> Manifest:
        """Parse (schema 1 or 2); IntegrityError naming ``where`` when it is not a manifest."""
        if not isinstance(data, dict):
            raise IntegrityError(f"{where} is not a JSON object")
        try:
            return cls._parse(dict(data))
        except (KeyError, TypeError, ValueError) as e:
            problem = f"missing {e}" if isinstance(e, KeyError) else str(e)
            raise IntegrityError(f"{where} is not a valid manifest: {problem}") from e

    @classmethod
    def _parse(cls, d: dict) -> Manifest:
        schema = d.pop("schema_version", 1)
        if not isinstance(schema, int) or not 1 <= schema <= SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {schema!r} is not one this code reads (1..{SCHEMA_VERSION})"
            )
        legacy_size = d.pop("input_size", None)  # schema 1 stored the size twice
        raw_input = d.pop("input", None) or {"size": legacy_size or (32, 32)}
        raw_files = d.pop("files")
        if not isinstance(raw_files, dict):
            raise ValueError("files is not an object")
        raw_norm = d.pop("normalization")
        values: dict[str, Any] = {
            "schema_version": schema,
            "name": _str(d.pop("name"), "name"),
            "version": _str(d.pop("version"), "version"),
            "created": str(d.pop("created", "")),
            "code_revision": str(d.pop("code_revision", "unknown")),
            "parent": d.pop("parent", None),
            "files": {str(k): FileEntry.from_dict(v) for k, v in raw_files.items()},
            "model": ModelInfo(**d.pop("model")),
            "class_names": tuple(_str(c, "class name") for c in d.pop("class_names")),
            "normalization": Normalization(
                mean=tuple(float(x) for x in raw_norm["mean"]),
                std=tuple(float(x) for x in raw_norm["std"]),
            ),
            "input": InputSpec(
                size=tuple(int(x) for x in raw_input["size"]),  # type: ignore[arg-type]
                dtype=str(raw_input.get("dtype", "uint8")),
                layout=str(raw_input.get("layout", "NCHW RGB")),
            ),
            "metrics": Metrics.from_dict(d.pop("metrics", None) or {}),
            "recipe": dict(d.pop("recipe", None) or {}),
            "dataset": dict(d.pop("dataset", None) or {}),
            "training": dict(d.pop("training", None) or {}),
            "calibration": _optional(Calibration, d.pop("calibration", None)),
            "ood": _optional(OutOfDistribution, d.pop("ood", None)),
            "int8": _optional(Int8Gate, d.pop("int8", None)),
        }
        if schema < 3 and any(e.location for e in values["files"].values()):
            raise ValueError(f"a file location needs schema_version 3, not {schema}")
        if values["parent"] is not None and not isinstance(values["parent"], str):
            raise ValueError("parent must be a string or null")
        if not isinstance(values["model"].config, dict):
            raise ValueError("model.config is not an object")
        if (values["calibration"] is None) != (values["ood"] is None):
            raise ValueError("calibration and ood come together (the graph's third output)")
        return cls(**values, extra=d)

    @classmethod
    def build(
        cls,
        spec: VersionSpec,
        *,
        name: str,
        version: str,
        created: str,
        code_revision: str,
        parent: str | None,
        files: dict[str, FileEntry],
    ) -> Manifest:
        shares = any(entry.location is not None for entry in files.values())
        return cls(
            **{f.name: getattr(spec, f.name) for f in fields(VersionSpec)},
            name=name,
            version=version,
            created=created,
            code_revision=code_revision,
            parent=parent,
            files=files,
            schema_version=SCHEMA_VERSION if shares else spec.required_schema(),
        )


# Metrics fields written even when null (what schema-2 versions have always written).
_V2 = ("test_accuracy", "test_accuracy_flip_tta", "test_loss", "per_class_accuracy", "test_images")


def _optional(cls, data: object):
    return None if data is None else cls.from_dict(data)


def _object(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _number(value: object, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    # asdict keeps tuples; JSON wants lists (and a round trip must compare equal).
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

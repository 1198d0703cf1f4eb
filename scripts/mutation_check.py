"""Plant named bugs in a copy of the tree and report which the test suite catches.

Each mutant replaces one exact snippet in one file (the script refuses to run if the
snippet is no longer there, so a refactoring cannot silently retire a mutant), then runs
the tests that should catch it. A mutant is caught when those tests fail. The table goes
to stdout; the exit status is 1 when any mutant survives.

    scripts/mutation-check.sh [NAME ...]     # all mutants, or the named ones
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


PREPARED = "    candidates = tuple((b, registry.open_verified(mv, EXPORT_FILES[b])) for b in ready)"


def _unchecked(backend: str) -> str:
    """The line above with ``backend``'s export opened straight from disk, unchecked."""
    return (
        f"    candidates = tuple((b, mv.path / EXPORT_FILES[b] if b == {backend!r} else "
        "registry.open_verified(mv, EXPORT_FILES[b])) for b in ready)"
    )


MUTANTS = [
    Mutant(
        "checksum-skipped-torchscript",
        "model.ts is opened without its sha256 check",
        "service/lifecycle/prepare.py",
        PREPARED,
        _unchecked("torchscript"),
        (
            "tests/seednet/test_export.py::test_a_flipped_byte_fails_verify_and_loading",
            "tests/service/test_service.py::test_a_corrupted_version_is_never_promoted_over_http",
        ),
    ),
    Mutant(
        "checksum-skipped-onnx",
        "model.onnx is opened without its sha256 check",
        "service/lifecycle/prepare.py",
        PREPARED,
        _unchecked("onnx"),
        ("tests/seednet/test_export.py::test_a_flipped_byte_fails_verify_and_loading",),
    ),
    Mutant(
        "checksum-skipped-weights",
        "the weights (eager's file, the exports' source) are not checked",
        "service/lifecycle/prepare.py",
        "    weights = registry.open_verified(mv, WEIGHTS_FILE)",
        "    weights = mv.path / WEIGHTS_FILE",
        ("tests/seednet/test_export.py::test_a_flipped_byte_fails_verify_and_loading",),
    ),
    Mutant(
        "ema-not-restored",
        "--resume starts a fresh EMA instead of the checkpoint's",
        "training/train.py",
        '        run.ema.load_state_dict(ckpt["ema"])',
        "        pass",
        (
            "tests/training/test_train.py::test_fast_recipe_resumes_exactly_with_its_ema_and_schedule",
        ),
    ),
    Mutant(
        "rows-rotated-in-a-batch",
        "requests merged into one batch get each other's rows",
        "service/dataplane/batching.py",
        "        self.stats.on_batch(n_images, seconds, mode)",
        "        self.stats.on_batch(n_images, seconds, mode)\n"
        "        if len(live) > 1:\n"
        "            outputs = {k: np.roll(v, 1, axis=0) for k, v in outputs.items()}",
        (
            "tests/service/test_service.py::"
            "test_64_concurrent_requests_are_batched_and_each_gets_its_own_answer",
        ),
    ),
    Mutant(
        "lock-removed",
        "the registry's file lock is never taken",
        "registry/localfs.py",  # LocalStorage.lock, the writers' lock of a local registry
        "        try:\n            lock.acquire()\n        except filelock.Timeout as e:",
        "        try:\n            pass\n        except filelock.Timeout as e:",
        ("tests/registry/test_registry.py",),
    ),
    Mutant(
        "class-names-shifted",
        "labels are read one position off the manifest's class order",
        "service/lifecycle/loading.py",
        "    classes = list(mv.manifest.class_names)",
        "    classes = list(mv.manifest.class_names[1:] + mv.manifest.class_names[:1])",
        ("tests/service/test_service.py::test_predict_matches_the_registry_golden_outputs",),
    ),
    Mutant(
        "pixel-limit-off-by-one",
        "an image of exactly max_pixels is refused",
        "service/dataplane/images.py",
        "    if width * height > limits.max_pixels:",
        "    if width * height >= limits.max_pixels:",
        ("tests/service/test_preprocessing.py",),
    ),
    Mutant(
        "image-count-off-by-one",
        "one image more than SEEDNET_MAX_IMAGES_PER_REQUEST is accepted",
        "service/frontends/http/bodies.py",
        "        if len(self.uploads) >= self.max_images:",
        "        if len(self.uploads) > self.max_images:",
        ("tests/service/test_service.py::test_too_many_images_is_413",),
    ),
    Mutant(
        "crop-returns-input",
        "random_crop hands back the image unshifted",
        "training/data.py",
        '    The reflection is an index map into the image itself (any dtype, any device)."""',
        '    The reflection is an index map into the image itself (any dtype, any device)."""'
        "\n    return x",
        ("tests/training/test_data.py",),
    ),
    Mutant(
        "split-request-out-of-order",
        "a request larger than max_batch_size gets its chunks' rows back in the wrong order",
        "service/dataplane/batching.py",  # Batcher.submit, where the chunks' rows are joined
        "        served_by = chunks[0].future.result()\n",
        "        served_by = chunks[0].future.result()\n        chunks = chunks[1:] + chunks[:1]\n",
        ("tests/service/test_batch_order.py",),
    ),
    Mutant(
        "verify-skips-missing-file",
        "verify passes a version whose published file is missing",
        "registry/store.py",  # Registry._verify_dir, the loop over the manifest's files
        "            problem = self._check_file(name, version, filename, entry)\n"
        "            if problem:\n                problems.append(problem)\n        try:",
        "            problem = self._check_file(name, version, filename, entry)\n"
        "            if problem and not problem.endswith('missing'):\n"
        "                problems.append(problem)\n        try:",
        ("tests/registry/test_registry.py::test_verify_reports_a_missing_file",),
    ),
    Mutant(
        "admin-token-prefix-accepted",
        "a prefix of the admin token is accepted",
        "service/frontends/http/deps.py",  # require_admin, the token comparison
        "    if not secrets.compare_digest(header[7:].strip().encode(), "
        "settings.admin_token.encode()):",
        "    if not settings.admin_token.encode().startswith(header[7:].strip().encode()):",
        ("tests/service/test_admin_token.py",),
    ),
    Mutant(
        "final-eval-on-raw-weights",
        "the run's final evaluation scores the raw weights, not the EMA weights it publishes",
        "training/train.py",  # finish_run, the final evaluation
        "    ev: Evaluation = evaluate(model, test_set, autocast=False, flip_tta=True)",
        "    ev: Evaluation = evaluate(run.model, test_set, autocast=False, flip_tta=True)",
        (
            "tests/training/test_train.py::"
            "test_the_reported_accuracy_is_that_of_the_published_ema_weights",
        ),
    ),
    Mutant(
        "curve-sharpens-the-unsure",
        "the served graph's confidence temperature rises with the confidence",
        "seednet/temperature.py",  # ConfidenceTemperatureScaling.forward
        "        log_t = self.log_t0 - (torch.relu(c - self.knots) * self.slopes)",
        "        log_t = self.log_t0 + (torch.relu(c - self.knots) * self.slopes)",
        (
            "tests/seednet/test_confidence_temperature.py::"
            "test_the_curve_is_the_same_in_numpy_and_in_the_graph",
        ),
    ),
    Mutant(
        "curve-left-out-of-the-graph",
        "a version with a curve is served with its one temperature",
        "seednet/graph.py",  # CalibratedInferenceModel.probabilities
        "        if self.per_image is not None:\n            return torch.softmax(",
        "        if False:\n            return torch.softmax(",
        (
            "tests/seednet/test_confidence_temperature.py::"
            "test_the_curve_is_the_same_in_numpy_and_in_the_graph",
        ),
    ),
]


def copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run(mutant: Mutant, data: str) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        target = tree / mutant.path
        text = target.read_text()
        if text.count(mutant.old) != 1:
            return "STALE (snippet not found once: update the mutant)", 0.0
        target.write_text(text.replace(mutant.old, mutant.new))
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=tree,
            env={**os.environ, "SEEDNET_CIFAR10": data},
            capture_output=True,
            text=True,
        )
        seconds = time.monotonic() - t0
    verdict = {0: "MISSED", 1: "caught"}.get(
        proc.returncode, f"error (pytest exit {proc.returncode})"
    )
    if proc.returncode not in (0, 1):
        print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
    return verdict, seconds


def main(names: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    from training.data import default_source

    data = str((REPO / default_source()).resolve())
    chosen = [m for m in MUTANTS if not names or m.name in names]
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutants: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    rows = []
    for m in chosen:
        verdict, seconds = run(m, data)
        rows.append((m.name, m.what, verdict, seconds))
        print(f"{m.name}: {verdict} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    print("| mutant | planted bug | result | test time |")
    print("| --- | --- | --- | --- |")
    for name, what, verdict, seconds in rows:
        print(f"| `{name}` | {what} | {verdict} | {seconds:.0f} s |")
    return 0 if all(r[2] == "caught" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

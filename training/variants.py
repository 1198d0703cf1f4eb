"""Publish a variant of a registry version, to rehearse a rollout with versions whose
behaviour is known in advance.

- ``noise``: every weight tensor plus Gaussian noise of ``noise`` times its own standard
  deviation: a distinct version (other bytes, other outputs) that mostly agrees with its
  source, a stand-in for a retrained one;
- ``shift_names``: the class names rotated by one: the same network, every answer under
  its neighbour's name, a deliberately wrong version that loads, runs and answers fast.

The golden set is recomputed from the variant's own served graph (calibrated with the
source's temperature when it has one) and the exports are built and checked against it,
as for any published version. The variant records no test metrics and no int8 export
(neither was measured on it)::

    python -m training.variants seednet-small@1 --noise 0.02 --root models-scratch
    python -m training.variants seednet-small@1 --shift-names --root models-scratch
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from registry import ModelVersion, Registry, VersionSpec
from registry.manifest import GOLDEN_FILE, WEIGHTS_FILE, Metrics
from seednet.export import density_path, golden_set, materialize
from seednet.graph import version_graph
from seednet.ood import DENSITY_FILE

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def publish_variant(
    registry: Registry,
    ref: str,
    *,
    noise: float = 0.0,
    shift_names: bool = False,
    seed: int = 0,
    exports: bool = True,
) -> ModelVersion:
    """Publish a variant of ``ref`` (see the module docstring) as the next version."""
    source = registry.get(ref)
    m = source.manifest
    spec = VersionSpec(**{f.name: getattr(m, f.name) for f in fields(VersionSpec)})
    spec = replace(spec, metrics=Metrics(), int8=None)
    if shift_names:
        spec = replace(spec, class_names=(*m.class_names[1:], m.class_names[0]))
    weights = load_file(str(registry.open_verified(source, WEIGHTS_FILE)))
    if noise:
        generator = torch.Generator().manual_seed(seed)
        for name, tensor in weights.items():
            if name.endswith(BUFFERS):
                continue  # batch-norm statistics: a variance must stay positive
            if tensor.is_floating_point() and tensor.numel() > 1:
                scale = noise * float(tensor.float().std())
                tensor += torch.randn(tensor.shape, generator=generator) * scale
    golden = load_file(str(registry.open_verified(source, GOLDEN_FILE)))
    with registry.scratch(source.name) as tmp:
        weights_path = tmp / WEIGHTS_FILE
        save_file(weights, str(weights_path))
        density = density_path(registry, source)  # the source's features' density: carried
        model = version_graph(m, weights_path, density)
        golden_path = tmp / GOLDEN_FILE
        save_file(golden_set(model, golden["images"]), str(golden_path))
        files = {WEIGHTS_FILE: weights_path, GOLDEN_FILE: golden_path}
        if density is not None:
            files[DENSITY_FILE] = density
        mv = registry.publish(source.name, files, spec, parent=source.ref, force=True)
    if exports:
        materialize(registry, mv)
    return mv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.variants", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("ref", metavar="NAME@VERSION")
    parser.add_argument("--root", default="models", help="registry root (default: models)")
    parser.add_argument("--noise", type=float, default=0.0, help="weight noise, x each std")
    parser.add_argument("--shift-names", action="store_true", help="rotate the class names")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.noise and not args.shift_names:
        parser.error("give --noise and/or --shift-names")
    mv = publish_variant(
        Registry(Path(args.root) if "://" not in args.root else args.root),
        args.ref,
        noise=args.noise,
        shift_names=args.shift_names,
        seed=args.seed,
    )
    print(f"published {mv.ref} (a variant of {args.ref})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Trim an upstream CustomResourceDefinition to what offline validation needs.

    python scripts/vendor_crd.py UPSTREAM.yaml OUT.yaml --source "owner/repo TAG path"

Keeps the names, scope and the served versions' ``openAPIV3Schema`` (without ``status``,
which a manifest never sets); drops the description strings, printer columns and the
controller-gen annotations. The result is still a CRD (it could be applied), about a
tenth of the size for small CRDs. deploy/k8s/crds/README.md lists the sources.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def without_descriptions(node):
    """Every schema's ``description`` text removed; a *field* named description stays."""
    if isinstance(node, dict):
        return {
            k: without_descriptions(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def trim(crd: dict) -> dict:
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit(f"not a CustomResourceDefinition: kind {crd.get('kind')!r}")
    spec = crd["spec"]
    versions = []
    for v in spec["versions"]:
        if not v.get("served"):
            continue
        schema = without_descriptions(v["schema"]["openAPIV3Schema"])
        schema.get("properties", {}).pop("status", None)
        versions.append(
            {
                "name": v["name"],
                "served": True,
                "storage": v.get("storage", False),
                "schema": {"openAPIV3Schema": schema},
            }
        )
    return {
        "apiVersion": crd["apiVersion"],
        "kind": crd["kind"],
        "metadata": {"name": crd["metadata"]["name"]},
        "spec": {
            "group": spec["group"],
            "names": spec["names"],
            "scope": spec["scope"],
            "versions": versions,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", required=True, help="where the file came from")
    args = parser.parse_args(argv)
    crd = trim(yaml.load(args.upstream.read_text(), Loader=yaml.CSafeLoader))
    header = (
        f"# Trimmed by scripts/vendor_crd.py from {args.source}\n"
        "# (Apache License 2.0; see README.md in this folder). Do not edit by hand.\n"
    )
    body = yaml.dump(
        crd, Dumper=yaml.CSafeDumper, sort_keys=False, default_flow_style=None, width=100
    )
    args.out.write_text(header + body)


if __name__ == "__main__":
    main()

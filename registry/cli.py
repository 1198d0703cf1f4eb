"""The registry's command line: list, show, promote, rollback, verify, seal, repair, delete,
materialize.

Building exports needs the network code (torch), which this package never imports: the
caller passes a ``materialize`` function in. ``python -m service.registry_cli`` (and the
``seednet-registry`` script) is this CLI with the SeedNet exporter plugged in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from registry.errors import MetadataError, RegistryError
from registry.store import DEFAULT_ALIAS, ModelVersion, Registry, split_ref

Materializer = Callable[[Registry, ModelVersion], object]


def _format_accuracy(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    # Stored as a fraction (0.91) by convention; tolerate an already-scaled percentage.
    return f"{value * 100 if value <= 1 else value:.2f}%"


def _selected(registry: Registry, ref: str | None) -> list[ModelVersion]:
    """No ref: every version; NAME: every version of NAME; NAME@X: that version."""
    if ref is None:
        return [mv for name in registry.names() for mv in registry.versions(name)]
    name, rest = split_ref(ref)
    return registry.versions(name) if rest is None else [registry.resolve(name, rest)]


def _cmd_list(registry: Registry, args: argparse.Namespace) -> int:
    rows = [("NAME", "VERSION", "ALIASES", "TEST ACC", "CREATED")]
    for name in registry.names():
        try:
            aliases = registry.aliases(name)
        except MetadataError as e:  # list the versions anyway; say what is wrong
            print(f"warning: {' '.join(str(e).split())}", file=sys.stderr)
            aliases = {}
        for mv in registry.versions(name):
            pointing = ",".join(sorted(a for a, v in aliases.items() if v == mv.version))
            if mv.problem is None:
                acc, created = mv.manifest.metrics.test_accuracy, mv.manifest.created
            else:
                acc, created = None, "(unreadable manifest: run verify)"
            rows.append((name, mv.version, pointing or "-", _format_accuracy(acc), created))
    if len(rows) == 1:
        print(f"no models in {registry.root}")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _cmd_show(registry: Registry, args: argparse.Namespace) -> int:
    mv = registry.get(args.ref)
    print(json.dumps(mv.manifest.to_dict(), indent=2))
    print(f"aliases: {', '.join(registry.aliases_of(mv)) or '(none)'}")
    derived_files = registry.derived(mv).get("files", {})
    if not derived_files:
        print(f"derived files: none (run: python -m service.registry_cli materialize {mv.ref})")
    for filename in sorted(derived_files):
        problem = registry.check_file(mv, filename)
        print(f"derived {filename}: {problem or 'ok'}")
    return 0


def _cmd_promote(registry: Registry, args: argparse.Namespace) -> int:
    before = registry.aliases(args.name).get(args.alias)
    registry.set_alias(args.name, args.alias, args.version)
    after = registry.aliases(args.name)[args.alias]
    print(f"{args.name}: {args.alias} -> {after} (was {before or 'unset'})")
    return 0


def _cmd_rollback(registry: Registry, args: argparse.Namespace) -> int:
    target = registry.rollback(args.name, args.alias)
    print(f"{args.name}: {args.alias} -> {target} (rolled back)")
    return 0


def _cmd_verify(registry: Registry, args: argparse.Namespace) -> int:
    """FAIL lines (exit 1) for what is wrong, WARN lines (exit 0) for what is weak."""
    names = registry.names() if args.ref is None else [split_ref(args.ref)[0]]
    failed = False
    for name in names:  # the model's own files first: aliases.json, deleted.json, temp
        problems, warnings = registry.check_model(name)
        failed |= bool(problems)
        for problem in problems:
            print(f"FAIL {name}: {problem}")
        for warning in warnings:
            print(f"WARN {name}: {warning}")
    selected = _selected(registry, args.ref)
    for mv in selected:
        problems = registry.verify(mv)
        if problems:
            failed = True
            for problem in problems:
                print(f"FAIL {mv.ref}: {problem}")
        else:
            print(f"OK {mv.ref}")
            for warning in registry.warnings(mv):
                print(f"WARN {mv.ref}: {warning}")
    if not selected:
        print(f"no models in {registry.root}")
    return 1 if failed else 0


def _cmd_seal(registry: Registry, args: argparse.Namespace) -> int:
    for mv in _selected(registry, args.ref):
        if registry.seal(mv):
            print(f"sealed {mv.ref}: wrote {mv.name}/{mv.version}/manifest.sha256")
        else:
            print(f"{mv.ref}: already sealed")
    return 0


def _cmd_repair(registry: Registry, args: argparse.Namespace) -> int:
    done = registry.repair(args.name, reset=args.reset)
    for line in done:
        print(line)
    if not done:
        print(f"{args.name}: nothing to repair")
    return 0


def _cmd_delete(registry: Registry, args: argparse.Namespace) -> int:
    registry.delete(args.name, args.version)
    print(f"deleted {args.name}@{args.version}")
    return 0


def build_parser(materialize: Materializer | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.registry_cli", description="Inspect and manage the model registry."
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("SEEDNET_REGISTRY_ROOT", "models"),
        help="registry: a folder, file://PATH or s3://BUCKET/PREFIX (credentials from the "
        "environment / AWS config) (default: $SEEDNET_REGISTRY_ROOT or ./models)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="table of every version").set_defaults(func=_cmd_list)
    p = sub.add_parser("show", help="manifest, aliases and derived files of a version")
    p.add_argument("ref", metavar="NAME[@VERSION|@ALIAS]")
    p.set_defaults(func=_cmd_show)
    for cmd, func, help_ in (
        ("promote", _cmd_promote, "point an alias at a version"),
        ("rollback", _cmd_rollback, "point an alias back to its previous target"),
    ):
        p = sub.add_parser(cmd, help=help_)
        p.add_argument("name")
        if cmd == "promote":
            p.add_argument("version")
        p.add_argument("--alias", default=DEFAULT_ALIAS)
        p.set_defaults(func=func)
    p = sub.add_parser(
        "verify",
        help="check sizes and sha256 of every file and manifest, aliases.json, deleted.json "
        "and temp folders (all models by default); exit 1 on any FAIL",
    )
    p.add_argument("ref", nargs="?", metavar="NAME[@VERSION]")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser(
        "seal", help="write manifest.sha256 for versions published without one (after verify)"
    )
    p.add_argument("ref", nargs="?", metavar="NAME[@VERSION]")
    p.set_defaults(func=_cmd_seal)
    p = sub.add_parser(
        "repair",
        help="restore a corrupt aliases.json (from aliases.log) or deleted.json, "
        "remove dead writers' temp folders",
    )
    p.add_argument("name")
    p.add_argument(
        "--reset", action="store_true", help="empty aliases.json instead (then promote a version)"
    )
    p.set_defaults(func=_cmd_repair)
    p = sub.add_parser("delete", help="delete an unaliased version")
    p.add_argument("name")
    p.add_argument("version")
    p.set_defaults(func=_cmd_delete)
    if materialize is not None:

        def _cmd_materialize(registry: Registry, args: argparse.Namespace) -> int:
            for mv in _selected(registry, args.ref):
                materialize(registry, mv)
                print(f"materialized {mv.ref}")
            return 0

        p = sub.add_parser("materialize", help="(re)build derived exports (all by default)")
        p.add_argument("ref", nargs="?", metavar="NAME[@VERSION]")
        p.set_defaults(func=_cmd_materialize)
    return parser


def main(argv: list[str] | None = None, materialize: Materializer | None = None) -> int:
    """CLI entry point; returns the exit status (1 on registry errors, 2 on usage errors)."""
    parser = build_parser(materialize)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on usage errors and --help; report, don't exit
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(Registry(args.root), args))
    except (RegistryError, OSError, ImportError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception carried
        print(f"error: {message}", file=sys.stderr)
        return 1

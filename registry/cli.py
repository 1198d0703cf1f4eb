"""The registry's command line: list, show, promote, rollback, verify, seal, repair, delete,
rollout (start, status, abort), materialize.

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

from registry.errors import InvalidRolloutError, MetadataError, RegistryError
from registry.rollouts import MODES, Rollout, Rule, parse_steps
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


def _read_rule(path: str | None) -> Rule:
    if path is None:
        return Rule()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise InvalidRolloutError(f"cannot read the rule file {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRolloutError(f"the rule file {path} is not JSON: {e}") from e
    return Rule.from_dict(data)


def _cmd_rollout_start(registry: Registry, args: argparse.Namespace) -> int:
    name, candidate = split_ref(args.ref)
    if candidate is None:
        raise InvalidRolloutError(f"name the candidate version: {name}@VERSION")
    then = list(args.then or [])
    for mode, _ in then:
        if mode not in MODES:
            raise InvalidRolloutError(f"--then takes a mode ({', '.join(MODES)}), got {mode!r}")
    steps = parse_steps(args.shadow, then)
    rule = _read_rule(args.rule)
    rollout = registry.start_rollout(name, candidate, steps, rule, args.alias, by=_who())
    print(f"started rollout {rollout.id}: {name}@{rollout.candidate} against {rollout.alias} "
          f"-> {rollout.stable}")  # fmt: skip
    _print_rollout(rollout)
    print("serving processes that read this registry pick it up at their next check")
    return 0


def _cmd_rollout_status(registry: Registry, args: argparse.Namespace) -> int:
    names = registry.names() if args.name is None else [split_ref(args.name)[0]]
    states = {name: registry.rollout_state(name) for name in names}
    if args.json:
        print(json.dumps({n: s.to_dict() for n, s in states.items()}, indent=2))
        return 0
    shown = False
    for name, state in states.items():
        latest = state.latest
        if latest is None:
            if args.name is not None:
                print(f"{name}: no rollout yet")
            continue
        shown = True
        print(f"{name}: rollout {latest.id} {latest.state}, {latest.alias}: {latest.stable} "
              f"(stable) -> {latest.candidate} (candidate)")  # fmt: skip
        _print_rollout(latest)
    if not shown and args.name is None:
        print(f"no rollouts in {registry.root}")
    return 0


def _cmd_rollout_abort(registry: Registry, args: argparse.Namespace) -> int:
    name = split_ref(args.name)[0]
    rollout = registry.abort_rollout(name, args.reason or "", by=_who())
    print(f"aborted rollout {rollout.id}: {rollout.alias} stays at {name}@{rollout.stable}; "
          f"{name}@{rollout.candidate} is dropped by the serving processes")  # fmt: skip
    return 0


class _AppendCanary(argparse.Action):
    """``--canary PCTS``: ``--then canary PCTS``, in the order the steps were given."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        steps = list(getattr(namespace, self.dest, None) or [])
        steps.append(("canary", values))
        setattr(namespace, self.dest, steps)


def _who() -> str:
    return f"cli:{os.environ.get('USER') or os.getuid()}@{os.uname().nodename}"


def _print_rollout(rollout: Rollout) -> None:
    steps = []
    for i, step in enumerate(rollout.steps):
        here = " (now)" if rollout.running and i == rollout.step else ""
        steps.append(f"{step}{here}")
    print(f"  steps: {', '.join(steps)}, then {rollout.alias} -> {rollout.candidate}")
    rule = rollout.rule
    print(
        f"  rule: at least {rule.min_samples} samples per step; error rate at most "
        f"{rule.max_error_rate_increase:g} above stable; p99 model time (canary) at most "
        f"{rule.max_p99_ratio:g}x stable; top-1 agreement (shadow) at least "
        f"{rule.min_agreement:g}"
        + (f"; a step fails after {rule.max_step_s:g} s" if rule.max_step_s else "")
    )
    if rule.check is not None:
        status = "passed" if rollout.checked else "pending: no traffic before it passes"
        print(
            f"  check set: {rule.check.folder} ({rule.check.per_class} per class), accuracy "
            f"at least {rule.check.min_accuracy:g}: {status}"
        )
    for d in rollout.decisions:
        print(f"  {d.time}  step {d.step + 1}  {d.action:<8}  {d.reason}")


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
    rollout = sub.add_parser(
        "rollout",
        help="roll a candidate version out to an alias: shadow, canary steps, then the alias "
        "(decided by the serving processes on live evidence)",
    )
    steps = rollout.add_subparsers(dest="rollout_command", required=True)
    p = steps.add_parser(
        "start",
        help="start a rollout, e.g. seednet@2 --shadow 20 --then canary 10,50 --rule rule.json",
    )
    p.add_argument("ref", metavar="NAME@VERSION", help="the candidate")
    p.add_argument("--alias", default=DEFAULT_ALIAS, help="the alias it replaces (production)")
    p.add_argument(
        "--shadow", type=float, metavar="PCT", help="first step: shadow this share of requests"
    )
    p.add_argument(
        "--then",
        nargs=2,
        action="append",
        metavar=("MODE", "PCTS"),
        help="further steps: a mode (canary or shadow) and comma-separated shares",
    )
    p.add_argument(
        "--canary",
        dest="then",
        action=_AppendCanary,
        metavar="PCTS",
        help="same as --then canary PCTS",
    )
    p.add_argument(
        "--rule",
        metavar="FILE",
        help="JSON rule: min_samples, max_error_rate_increase, max_p99_ratio, "
        "min_agreement, max_step_s, check {folder, min_accuracy, per_class}",
    )
    p.set_defaults(func=_cmd_rollout_start)
    p = steps.add_parser("status", help="the latest rollout of each model and its decisions")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--json", action="store_true", help="rollouts.json as it is stored")
    p.set_defaults(func=_cmd_rollout_status)
    p = steps.add_parser("abort", help="stop the running rollout: the alias stays where it is")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--reason", help="recorded with the decision")
    p.set_defaults(func=_cmd_rollout_abort)
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

"""Every default the docs state for a ``SEEDNET_*`` setting is the one the code uses.

The settings are data (``service.config.Settings``); the tables in README.md and docs/*.md,
the image's ``ENV`` lines and docker-compose.yml's pass-throughs restate their defaults, and
drift silently when a default changes. This module derives the truth from ``Settings`` (the
environment name of a field is ``SEEDNET_`` + its name in upper case), so a new or changed
setting is followed without editing the test, and checks:

- every settings table (a markdown table with a ``default`` column and ``SEEDNET_*`` rows) in
  README.md and docs/*.md: the stated default is the field's default. A table whose default
  column says ``container`` states the defaults inside the image: the field's default, then
  the Dockerfile's ``ENV``, then docker-compose.yml's environment;
- docker-compose.yml: each ``${SEEDNET_X:-default}`` (and each literal value) is what the
  image would use without it, every variable it passes is a setting, and the CPU variant
  differs from the GPU service only in ``SEEDNET_DEVICE``;
- the README's configuration table has a row for every field; docs/docker.md's container
  table lists exactly what compose passes.

Defaults that are not a value (``None``, or computed from the host) are written in the docs
in the forms ``SPECIAL_FORMS`` lists; a computed form comes with the rule it states, which is
checked against ``Settings`` on a range of CPU counts. The last tests plant wrong defaults
in copies of the real texts to show that each check fails.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import yaml

from service import config
from service.config import Settings
from tests.conftest import REPO

PREFIX = "SEEDNET_"
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

#: ``SEEDNET_*`` variables that are not service settings: compose's own knobs and the
#: scripts' and tests' variables. A table row naming any other variable that is not a
#: field fails (a typo, or a setting that was removed).
NOT_SETTINGS = {
    "SEEDNET_IMAGE", "SEEDNET_PUBLISH", "SEEDNET_GRPC_PUBLISH", "SEEDNET_MODELS_DIR",
    "SEEDNET_UID", "SEEDNET_GID", "SEEDNET_PROXY_PORT", "SEEDNET_CIFAR10", "SEEDNET_SKIP_SLOW",
}  # fmt: skip


@dataclass(frozen=True)
class Computed:
    """A default computed from the host: the words the docs use for it, what Settings
    computes (``actual(settings)``) and the rule those words state (``rule(cpus, workers)``)."""

    form: str
    actual: Callable[[Settings], object]
    rule: Callable[[int, int], object]


BACKENDS = typing.get_args(Settings.model_fields["backend"].annotation)
SPINNING = ("torchscript", "eager")  # torch's intra-op threads spin while they wait


#: How the docs write a default that is not a plain value. A field whose default is None
#: and that is not listed here may only be documented as "unset" (or "empty").
SPECIAL_FORMS: dict[str, Computed] = {
    "decode_workers": Computed(
        "the worker's CPUs, at most 4",
        lambda s: s.decode_threads(),
        lambda cpus, workers: min(4, max(1, cpus // workers)),
    ),
    "inference_threads": Computed(
        "per backend: the worker's CPUs for ONNX Runtime and OpenVINO, one fewer (at least 1) "
        "for TorchScript and eager",
        lambda s: {b: s.threads_for(b) for b in BACKENDS if not b.startswith("auto")},
        lambda cpus, workers: {
            b: max(1, cpus // workers - (b in SPINNING))
            for b in BACKENDS
            if not b.startswith("auto")
        },
    ),
}
UNSET_FORMS = ("unset", "empty")


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def field_defaults() -> dict[str, object]:
    """Environment name -> the field's default, read from Settings itself."""
    return {
        env_name(name): info.get_default(call_default_factory=True)
        for name, info in Settings.model_fields.items()
    }


# ------------------------------------------------------------------------ parsing


def split_row(line: str) -> list[str]:
    """The cells of a markdown table row; a ``|`` inside a code span does not split."""
    cells, cell, in_code = [], [], False
    for ch in line.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append("".join(cell).strip())
            cell = []
        else:
            cell.append(ch)
    cells.append("".join(cell).strip())
    return cells


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`]*)`", text)


@dataclass(frozen=True)
class Row:
    where: str  # file:line
    variable: str
    stated: str  # the default as written (first code span, else the cell's text)
    container: bool  # the table states the defaults inside the image


def settings_rows(text: str, where: str) -> list[Row]:
    """Rows of every table that has a ``default`` column and names ``SEEDNET_*`` variables."""
    lines = [line.strip() for line in text.splitlines()]  # a table may sit in a list item
    rows: list[Row] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        start = i
        while i < len(lines) and lines[i].startswith("|"):
            i += 1
        header = [c.lower() for c in split_row(lines[start])]
        default_col = next((k for k, c in enumerate(header) if "default" in c), None)
        if default_col is None:
            continue
        container = "container" in header[default_col]
        for n in range(start + 2, i):  # after the header and the --- line
            cells = split_row(lines[n])
            names = [s for c in cells[:default_col] for s in code_spans(c) if s.startswith(PREFIX)]
            if not names:
                continue
            cell = cells[default_col] if default_col < len(cells) else ""
            spans = code_spans(cell)
            if len(names) == 1:
                stated = [spans[0] if spans else cell]
            elif len(spans) == len(names):  # "`A`, `B`" | "`1`, `2`"
                stated = spans
            else:
                stated = [f"<{len(names)} variables, {len(spans)} defaults: {cell}>"] * len(names)
            for name, value in zip(names, stated, strict=True):
                rows.append(Row(f"{where}:{n + 1}", name, value.strip(), container))
    return rows


def dockerfile_env(text: str) -> dict[str, str]:
    """``SEEDNET_*`` values set by the Dockerfile's ``ENV`` instructions."""
    joined = re.sub(r"\\\n", " ", text)
    env: dict[str, str] = {}
    for line in joined.splitlines():
        if line.strip().upper().startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line):
                if key.startswith(PREFIX):
                    env[key] = value.strip("\"'")
    return env


PASS_THROUGH = re.compile(r"^\$\{(\w+):-(.*)\}$")


def compose_environment(text: str, service: str = "seednet") -> dict[str, str]:
    """A service's environment: variable -> the value it gets when the shell does not set
    it (the default of a ``${VAR:-default}`` pass-through, else the literal value)."""
    env = yaml.safe_load(text)["services"][service]["environment"]
    out = {}
    for key, value in env.items():
        value = "" if value is None else str(value)
        m = PASS_THROUGH.match(value)
        out[key] = m.group(2) if m and m.group(1) == key else value
    return out


# ------------------------------------------------------------------------ comparing


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "")).strip().lower()


def states(stated: str, default: object) -> bool:
    """Whether the text ``stated`` in a doc says the value ``default``."""
    s = normalise(stated)
    if default is None:
        return s.startswith(UNSET_FORMS)
    if isinstance(default, bool):
        return s == str(default).lower()
    if isinstance(default, int | float):
        try:
            return float(s.replace(",", "").replace("_", "")) == float(default)
        except ValueError:
            return False
    return s == normalise(str(default))


def expected_form(field: str, default: object) -> str:
    if field in SPECIAL_FORMS:
        return SPECIAL_FORMS[field].form
    if default is None:
        return "unset"
    return str(default).lower() if isinstance(default, bool) else str(default)


def container_defaults(dockerfile: str, compose: str) -> dict[str, object]:
    """What each setting is inside the image: Settings, then ENV, then compose."""
    out: dict[str, object] = dict(field_defaults())
    out |= dockerfile_env(dockerfile)
    out |= compose_environment(compose)
    return out


def says(field: str, stated: str, want: object) -> bool:
    """Whether ``stated`` says ``want``: a value (from Settings), a string (set by the
    Dockerfile or compose), or None (unset, or one of ``SPECIAL_FORMS``)."""
    text = normalise(stated)
    if want is None and field in SPECIAL_FORMS:
        return text.startswith(normalise(SPECIAL_FORMS[field].form))
    if isinstance(want, str) and not isinstance(Settings.model_fields[field].default, str):
        return text == normalise(want) or (want == "" and text.startswith(UNSET_FORMS))
    return states(stated, want)


def check_rows(rows: list[Row], container: dict[str, object] | None = None) -> list[str]:
    """One line per row whose stated default is not the code's (or the container's)."""
    defaults = field_defaults()
    problems = []
    for row in rows:
        if row.variable not in defaults:
            if row.variable not in NOT_SETTINGS:
                problems.append(f"{row.where}: {row.variable} is not a setting of Settings")
            continue
        field = row.variable[len(PREFIX) :].lower()
        if row.container:
            assert container is not None, f"{row.where}: a container table needs its defaults"
            want, truth = container[row.variable], f"the container has {container[row.variable]!r}"
        else:
            want = defaults[row.variable]
            truth = f"Settings says {expected_form(field, want)!r}"
        if not says(field, row.stated, want):
            problems.append(f"{row.where}: {row.variable} states {row.stated!r}, {truth}")
    return problems


def check_compose(compose: str, dockerfile: str) -> list[str]:
    """Compose passes what the image would use anyway, and only settings."""
    defaults, image = field_defaults(), dockerfile_env(dockerfile)
    problems = []
    env = compose_environment(compose)
    for key, value in env.items():
        if key not in defaults:
            problems.append(f"docker-compose.yml: {key} is not a setting of Settings")
            continue
        if key in image:
            ok, truth = value == image[key], f"the Dockerfile's ENV {image[key]!r}"
        else:
            ok = states(value, defaults[key]) if value else defaults[key] is None
            truth = f"Settings' {expected_form(key[len(PREFIX) :].lower(), defaults[key])!r}"
        if not ok:
            problems.append(f"docker-compose.yml: {key} defaults to {value!r}, not {truth}")
    cpu = compose_environment(compose, "seednet-cpu")
    differ = {k for k in env.keys() | cpu.keys() if env.get(k) != cpu.get(k)}
    if differ != {"SEEDNET_DEVICE"} or cpu["SEEDNET_DEVICE"] != "cpu":
        problems.append(
            f"docker-compose.yml: seednet-cpu should differ from seednet only in "
            f"SEEDNET_DEVICE=cpu; it differs in {sorted(differ)}"
        )
    return problems


def readme_missing_rows(readme: str) -> list[str]:
    """Settings fields without a row in the README's configuration table."""
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = {r.variable for r in settings_rows(section, "README.md") if not r.container}
    return sorted(set(field_defaults()) - documented)


# ------------------------------------------------------------------------ the tests


def all_rows() -> list[Row]:
    return [
        r for doc in DOCS for r in settings_rows(doc.read_text(), doc.relative_to(REPO).as_posix())
    ]


def test_the_docs_have_settings_tables_to_check():
    rows = all_rows()
    files = {r.where.split(":")[0] for r in rows}
    assert {"README.md", "docs/docker.md"} <= files, files
    assert len({r.variable for r in rows if r.where.startswith("README.md")}) >= len(
        Settings.model_fields
    )


def test_every_stated_default_is_the_code_default():
    container = container_defaults(DOCKERFILE.read_text(), COMPOSE.read_text())
    problems = check_rows(all_rows(), container)
    assert not problems, "wrong defaults in the docs:\n" + "\n".join(problems)


def test_compose_passes_the_image_defaults():
    problems = check_compose(COMPOSE.read_text(), DOCKERFILE.read_text())
    assert not problems, "\n".join(problems)


def test_every_setting_has_a_row_in_the_readme():
    missing = readme_missing_rows(README.read_text())
    assert not missing, f"README.md's configuration table has no row for {missing}"


def test_docker_md_lists_exactly_what_compose_passes():
    text = (REPO / "docs" / "docker.md").read_text()
    listed = {r.variable for r in settings_rows(text, "docs/docker.md") if r.container}
    passed = set(compose_environment(COMPOSE.read_text()))
    assert listed == passed, (
        f"only in docs/docker.md: {sorted(listed - passed)}; "
        f"only in docker-compose.yml: {sorted(passed - listed)}"
    )


@pytest.mark.parametrize("field", sorted(SPECIAL_FORMS))
def test_a_computed_default_follows_the_rule_the_docs_state(field, monkeypatch):
    computed = SPECIAL_FORMS[field]
    assert Settings.model_fields[field].default is None, f"{field} is no longer computed"
    for name in SPECIAL_FORMS:  # the rule is about the default: nothing set from outside
        monkeypatch.delenv(env_name(name), raising=False)
    for cpus in (1, 2, 3, 4, 7, 8, 16, 64):
        monkeypatch.setattr(config, "available_cpus", lambda cpus=cpus: cpus)
        for workers in (1, 2, 3):
            got, want = computed.actual(Settings(workers=workers)), computed.rule(cpus, workers)
            assert got == want, (
                f"{cpus} CPUs, {workers} workers: Settings computes {got}, but the docs say "
                f"{computed.form!r} (= {want})"
            )


# ------------------------------------------------------------------ planted mistakes


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in the text exactly once"
    return text.replace(old, new)


def test_a_wrong_default_planted_in_a_copy_of_the_readme_is_reported():
    text = README.read_text()
    planted = _replace_once(
        text, "| `SEEDNET_MAX_BATCH_WAIT_MS` | `2` |", "| `SEEDNET_MAX_BATCH_WAIT_MS` | `5` |"
    )
    planted = _replace_once(
        planted, "| `127.0.0.1`, `8000` |", "| `127.0.0.1`, `8080` |"
    )  # one of two variables in a row
    assert check_rows(settings_rows(text, "README.md")) == []
    problems = check_rows(settings_rows(planted, "README.md"))
    assert len(problems) == 2, problems
    assert "SEEDNET_MAX_BATCH_WAIT_MS states '5', Settings says '2.0'" in problems[0]
    assert "SEEDNET_PORT states '8080'" in problems[1]


def test_a_wrong_special_form_and_an_unknown_variable_are_reported():
    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `SEEDNET_DECODE_WORKERS`"))
    table = "| variable | default | meaning |\n| --- | --- | --- |\n"
    wrong_form = row.replace(SPECIAL_FORMS["decode_workers"].form, "min(4, CPUs)")
    typo = "| `SEEDNET_MAX_IMAGE_PER_REQUEST` | `64` | images per request |"
    problems = check_rows(settings_rows(table + wrong_form + "\n" + typo, "copy.md"))
    assert len(problems) == 2, problems
    assert "SEEDNET_DECODE_WORKERS states 'min(4, CPUs)'" in problems[0]
    assert "SEEDNET_MAX_IMAGE_PER_REQUEST is not a setting" in problems[1]


def test_a_wrong_default_planted_in_a_copy_of_the_container_table_is_reported():
    text = (REPO / "docs" / "docker.md").read_text()
    old = "| `SEEDNET_MAX_IMAGES_PER_REQUEST` | `64` |"
    planted = _replace_once(text, old, old.replace("`64`", "`16`"))
    container = container_defaults(DOCKERFILE.read_text(), COMPOSE.read_text())
    assert check_rows(settings_rows(text, "docs/docker.md"), container) == []
    problems = check_rows(settings_rows(planted, "docs/docker.md"), container)
    assert len(problems) == 1 and "SEEDNET_MAX_IMAGES_PER_REQUEST states '16'" in problems[0]


def test_a_wrong_pass_through_planted_in_a_copy_of_compose_is_reported():
    compose, dockerfile = COMPOSE.read_text(), DOCKERFILE.read_text()
    planted = _replace_once(
        compose, "${SEEDNET_MAX_BATCH_WAIT_MS:-2}", "${SEEDNET_MAX_BATCH_WAIT_MS:-5}"
    )
    planted = _replace_once(
        planted, "SEEDNET_GRPC_PORT: ${SEEDNET_GRPC_PORT:-8001}", "SEEDNET_GRPC_PORT: 9001"
    )  # a literal value, where the image sets another
    assert check_compose(compose, dockerfile) == []
    problems = check_compose(planted, dockerfile)
    assert len(problems) == 2, problems
    assert "SEEDNET_MAX_BATCH_WAIT_MS defaults to '5'" in problems[0]
    assert "SEEDNET_GRPC_PORT defaults to '9001', not the Dockerfile's ENV '8001'" in problems[1]


def test_a_setting_without_a_readme_row_is_reported():
    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `SEEDNET_WORKERS`"))
    assert readme_missing_rows(text) == []
    assert readme_missing_rows(text.replace(row + "\n", "")) == ["SEEDNET_WORKERS"]

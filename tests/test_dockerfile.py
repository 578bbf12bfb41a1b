"""The image, checked without a Docker engine: Docker's own parser reads the Dockerfile."""

from __future__ import annotations

import re
from pathlib import Path

import dockerfile
import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def first(instructions: list[dockerfile.Command], name: str) -> dockerfile.Command:
    return next(command for command in instructions if command.cmd == name)


def index_of(instructions: list[dockerfile.Command], pattern: str) -> int:
    return next(i for i, command in enumerate(instructions) if re.search(pattern, command.original))


def test_base_is_a_pinned_slim_python(instructions: list[dockerfile.Command]) -> None:
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", first(instructions, "FROM").value[0])


def test_runs_as_a_non_root_user(instructions: list[dockerfile.Command]) -> None:
    users = [command.value[0] for command in instructions if command.cmd == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_cmd_is_exec_form_so_sigterm_reaches_the_server(instructions: list[dockerfile.Command]) -> None:
    cmd = first(instructions, "CMD")
    assert cmd.json and list(cmd.value) == ["python", "gen_service.py"]


def test_healthcheck_uses_python_on_the_health_path(instructions: list[dockerfile.Command]) -> None:
    check = first(instructions, "HEALTHCHECK")
    assert check.json and check.value[:2] == ("CMD", "python") and "/health" in check.value[-1]


def test_listens_on_all_interfaces_on_8000(instructions: list[dockerfile.Command]) -> None:
    values = first(instructions, "ENV").value
    env = dict(zip(values[::2], values[1::2], strict=True))
    assert (env["HOST"], env["PORT"]) == ("0.0.0.0", "8000")
    assert first(instructions, "EXPOSE").value == ("8000",)


def test_dependencies_are_installed_before_the_code_is_copied(instructions: list[dockerfile.Command]) -> None:
    install = index_of(instructions, r"pip install --no-cache-dir -r requirements.txt")
    assert index_of(instructions, r"COPY requirements.txt") < install < index_of(instructions, r"COPY .*gen_service.py")


def test_everything_copied_exists_and_passes_dockerignore(instructions: list[dockerfile.Command]) -> None:
    copied = [source for command in instructions if command.cmd == "COPY" for source in command.value[:-1]]
    admitted = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert copied and set(copied) <= admitted
    assert all((ROOT / source).is_file() for source in copied)
    assert {module.name for module in ROOT.glob("*.py")} <= set(copied)

"""The image, checked without a Docker engine: Docker's own parser reads the Dockerfile."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dockerfile
import pytest

from conftest import free_port

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


def copied_files(instructions: list[dockerfile.Command]) -> list[str]:
    """The files the COPY instructions take from the build context, a directory's being its .py files."""
    sources = [source for command in instructions if command.cmd == "COPY" for source in command.value[:-1]]
    files = []
    for source in sources:
        if (ROOT / source).is_dir():
            files += sorted(str(path.relative_to(ROOT)) for path in (ROOT / source).glob("*.py"))
        else:
            files.append(source)
    return files


def test_everything_copied_exists_and_passes_dockerignore(instructions: list[dockerfile.Command]) -> None:
    copied = copied_files(instructions)
    admitted = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert copied and all(any(fnmatch.fnmatchcase(name, pattern) for pattern in admitted) for name in copied)
    assert all((ROOT / name).is_file() for name in copied)
    packages = [init.parent for init in ROOT.glob("*/__init__.py")]
    modules = [*ROOT.glob("*.py"), *(module for package in packages for module in package.glob("*.py"))]
    assert {str(module.relative_to(ROOT)) for module in modules} <= set(copied)


def test_the_image_starts_and_passes_its_healthcheck(instructions: list[dockerfile.Command], tmp_path: Path) -> None:
    """What `docker run` would do, without Docker: a fresh environment with only requirements.txt, the
    Dockerfile's ENV, its CMD from WORKDIR, then its HEALTHCHECK command. Only the address (loopback,
    a free port) and the directories (under tmp_path instead of /app) differ."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--no-cache-dir", "-r", str(ROOT / "requirements.txt")]
    subprocess.run(pip, check=True, timeout=600)
    workdir = tmp_path / "app"
    workdir.mkdir()
    for name in copied_files(instructions):
        (workdir / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, workdir / name)
    values = [value for command in instructions if command.cmd == "ENV" for value in command.value]
    image_env = dict(zip(values[::2], values[1::2], strict=True))
    port = str(free_port())
    env = {
        "PATH": os.environ["PATH"],
        **image_env,
        "HOST": "127.0.0.1",
        "PORT": port,
        "LOCAL_STORAGE_DIR": image_env["LOCAL_STORAGE_DIR"].replace("/app", str(workdir)),
    }
    to_venv = {"python": python}
    cmd = [to_venv.get(word, word) for word in first(instructions, "CMD").value]
    check = [to_venv.get(word, word) for word in first(instructions, "HEALTHCHECK").value[1:]]

    server = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(check, env=env, capture_output=True, timeout=10).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "the service did not come up"
            time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=30)

"""The README's examples work as written (issue 28 item 7): the Python quick start against
``serve-mock`` started with the README's own command line, and the prompt-file example, which must
name every task key."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemocc_dask.recipe.presets import FIELD_NAMES
from nemocc_dask.recipe.task_file import load_task_file

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    following = re.search(r"^#{2,3} ", text[start + len(title):], re.M)
    return text[start:start + len(title) + following.start()] if following else text[start:]


def _block(section: str, language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_prompt_file_example_names_every_key_and_loads(tmp_path):
    example = _block(_section("### Prompt files (`--prompt-file`)"), "toml")
    keys = {line.split("=")[0].strip() for line in example.splitlines() if "=" in line
            and not line.startswith(" ")}
    assert keys == set(FIELD_NAMES)
    path = tmp_path / "task.toml"
    path.write_text(example)
    task = load_task_file(path)
    assert task.name == "summary" and task.top_k == 20 and task.stop == ("</answer>",)
    assert task.extra_body == {"repetition_penalty": 1.05}


@pytest.mark.slow
def test_python_quick_start_runs_as_written_against_serve_mock(tmp_path):
    section = _section("## Python quick start")
    command = re.search(r"`(nemocc-dask serve-mock [^`]+)`", section).group(1)
    script = _block(section, "python")
    port = str(_free_port())  # the README's 8000 may be taken on a test machine
    argv = [a.replace("8000", port) for a in shlex.split(command)]
    server = subprocess.Popen([sys.executable, "-m", "nemocc_dask.cli", *argv[1:]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", int(port))) == 0:
                    break
            time.sleep(0.2)
        (tmp_path / "quick_start.py").write_text(script.replace("8000", port))
        done = subprocess.run([sys.executable, "quick_start.py"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert done.returncode == 0, done.stderr[-3000:]
    written = int(re.search(r"(\d+) rows written to qa-run/parts/", done.stdout).group(1))
    assert written > 0 and len(list((tmp_path / "qa-run" / "parts").glob("*.parquet"))) >= 1
    assert list((tmp_path / "qa").glob("*.parquet"))

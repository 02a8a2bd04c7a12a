"""The README's examples against the real demo: every shown output is what the shipped artefacts give.

Builds the demo with its default recipe (or reuses the build cached in pytest's cache directory), runs the
README's console blocks (`$ command` and its shown output) with bash in a scratch directory that holds the
build as `.cache/mhr-demo` and the environment as `.venv`, and its Python (`>>>`) blocks as doctests, against
the real `python -m server` serving the demo on a free loopback port, with the Makefile's admin key. Blocks run
in the README's order, so the server's counters are those a reader sees.

Matching conventions of shown output (`lines_match`):
  - a JSON line is compared as data, field by field, except the fields in UNSTABLE (ids and timestamps);
  - a line that is only `...` stands for any number of lines, and `...` inside a line for any text.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import ROOT, server_process
from training import demo

README = ROOT / "README.md"
DEMO_DIR = ".cache/mhr-demo"  # where the README's commands find the demo, relative to their directory
UNSTABLE = frozenset({"id", "created"})  # a response's fields that differ from run to run
README_PORT = "8000"
MARK = "@@readme-command-"
# `make demo` builds (cached) and then serves until stopped; here its build step runs, and the server is the
# one this test starts.
COMMANDS = {"make demo": f"mhr demo --cache-dir {DEMO_DIR}"}


# ----- the README's examples ----------------------------------------------------------------------

@dataclass
class Block:
    """A fenced ```console or ```python block of the README; `line` is its first line's number (1-based)."""

    kind: str
    text: str
    line: int


@dataclass
class Command:
    """A `$ command` of a console block (continuation lines included) and the output shown under it."""

    command: str
    shown: list[str]


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in re.finditer(r"^```(console|python)\n(.*?)^```$", text, flags=re.M | re.S):
        blocks.append(Block(match[1], match[2], text.count("\n", 0, match.start()) + 2))
    return blocks


def console_commands(text: str) -> list[Command]:
    """The commands of a console block: a line starting with `$ `, and the lines after it that continue
    it (a trailing backslash); the lines up to the next command are its shown output."""
    commands: list[Command] = []
    continued = False
    for line in text.splitlines():
        if continued:
            commands[-1].command += "\n" + line
        elif line.startswith("$ "):
            commands.append(Command(line[2:], []))
        elif commands:
            commands[-1].shown.append(line)
        continued = line.endswith("\\")
    return commands


# ----- matching shown output ----------------------------------------------------------------------

def stable(value):
    """`value` (parsed JSON) without the UNSTABLE fields of a top-level object (a response's own id and time)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in UNSTABLE}
    return value


def line_matches(shown: str, actual: str) -> bool:
    if shown.startswith("{"):
        try:
            return stable(json.loads(shown)) == stable(json.loads(actual))
        except json.JSONDecodeError:
            return False
    if "..." in shown:
        return re.fullmatch(".*".join(map(re.escape, shown.split("..."))), actual) is not None
    return shown == actual


def lines_match(shown: list[str], actual: list[str]) -> bool:
    """Whether `actual` is what `shown` shows, under the module's conventions."""
    if not shown:
        return not actual
    if shown[0] == "...":
        return any(lines_match(shown[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and line_matches(shown[0], actual[0]) and lines_match(shown[1:], actual[1:])


# ----- running them -------------------------------------------------------------------------------

def to_port(text: str, port: int) -> str:
    """`text` (a command, or its shown output) with the README's server address (port 8000) replaced by the test
    server's."""
    return re.sub(rf"\b(localhost|127\.0\.0\.1):{README_PORT}\b", f"127.0.0.1:{port}", text)


def run_console(commands: list[Command], cwd: Path, port: int) -> tuple[list[list[str]], str]:
    """Run `commands` in one bash (so `cd` and variables carry over), each as shown but against the test's
    server; their output lines, one list per command, and bash's stderr."""
    script = ""
    for i, c in enumerate(commands):
        script += f"printf '\\n{MARK}{i}\\n'\n{to_port(COMMANDS.get(c.command, c.command), port)}\n"
    env = {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(cwd), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    parts = re.split(rf"\n{MARK}\d+\n", done.stdout)[1:]
    outputs = [[line.rstrip() for line in part.rstrip("\n").split("\n")] if part.strip("\n") else []
               for part in parts]
    return outputs, done.stderr


def run_doctest(block: Block, port: int) -> str:
    """Run a Python block as a doctest against the test's server; the failures' report ('' when none)."""
    test = doctest.DocTestParser().get_doctest(to_port(block.text, port), {}, "README.md", str(README), block.line - 1)
    report: list[str] = []
    doctest.DocTestRunner(verbose=False).run(test, out=report.append)
    return "".join(report)


def admin_key() -> str:
    """The demo's admin key, as the Makefile gives it to the server."""
    found = re.search(r"^DEMO_ADMIN_KEY \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert found, "the Makefile names no DEMO_ADMIN_KEY"
    return found[1]


@contextmanager
def demo_server(build: Path, log: Path) -> Iterator[int]:
    """`python -m server` on the demo's served copy with the Makefile's admin key, ready; yields its port."""
    with server_process(["--bundle", str(build / demo.SERVING), "--model", str(build / "backbone"), "--admin-key",
                         admin_key()], log, threads=2) as (_, url):
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def demo_build(request, tmp_path_factory) -> Path:
    """The demo of the default recipe, built once and kept in pytest's cache directory between runs."""
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("mhr-demo") if cache is not None else tmp_path_factory.mktemp("mhr-demo")
    return demo.build(root, progress=False, log=lambda _: None).root.resolve()


def mismatch(where: str, command: str, shown: list[str], actual: list[str]) -> str:
    return "\n".join([f"{where}: $ {command}", "  shown:", *(f"    {s}" for s in shown), "  got:",
                      *(f"    {a}" for a in actual)])


@pytest.mark.timeout(900)  # a first build included
def test_the_readme_shows_what_the_demo_gives(demo_build, tmp_path):
    assert shutil.which("curl"), "the README's examples need curl"
    work = tmp_path / "readme"
    (work / DEMO_DIR).parent.mkdir(parents=True)
    (work / DEMO_DIR).symlink_to(demo_build)
    (work / ".venv").symlink_to(sys.prefix)
    shutil.rmtree(demo_build / demo.SERVING, ignore_errors=True)  # a fresh served copy, as on a first run
    blocks = readme_blocks(README.read_text())
    assert [b.kind for b in blocks].count("console") >= 3 and "python" in {b.kind for b in blocks}
    failures = []
    with ExitStack() as stack:
        port = 0  # the server starts before the first block that queries it, after the build's block
        for block in blocks:
            if not port and f":{README_PORT}" in block.text:
                port = stack.enter_context(demo_server(demo_build, tmp_path / "server.log"))
            if block.kind == "python":
                if report := run_doctest(block, port):
                    failures.append(f"README.md:{block.line}: python block\n{report}")
                continue
            commands = console_commands(block.text)
            outputs, stderr = run_console(commands, work, port)
            assert len(outputs) == len(commands), f"README.md:{block.line}: bash stopped early: {stderr[-2000:]}"
            wrong = [mismatch(f"README.md:{block.line}", c.command, c.shown, out)
                     for c, out in zip(commands, outputs, strict=True)
                     if not lines_match([to_port(line, port) for line in c.shown], out)]
            failures += wrong + ([f"  (stderr of the block: {stderr[-2000:]})"] if wrong and stderr else [])
    assert not failures, "the README shows other outputs than the demo gives:\n\n" + "\n\n".join(failures)


def test_a_wrong_shown_output_fails():
    shown = ['{"id":"cmpl-1","created":1,"choices":[{"text":" ABADU"}]}']
    assert lines_match(shown, ['{"id":"cmpl-2","created":2,"choices":[{"text":" ABADU"}]}'])  # unstable fields
    assert not lines_match(shown, ['{"id":"cmpl-1","created":1,"choices":[{"text":" ABADV"}]}'])
    assert not lines_match(shown, ['{"id":"cmpl-1","created":1,"choices":[{"text":" ABADU"}],"mhr":{}}'])
    assert not lines_match(shown, [*shown, "more"]) and not lines_match(shown, [])
    assert lines_match(["a b ... z", "..."], ["a b c d z", "x", "y"]) and lines_match(["...", "z"], ["z"])
    assert not lines_match(["a b ... z"], ["a c z"]) and not lines_match(["mhr_tasks 19.0"], ["mhr_tasks 20.0"])


def test_console_blocks_split_into_commands_and_shown_output():
    blocks = readme_blocks("text\n```console\n$ curl a \\\n    -d b\n{}\n$ echo\nx\ny\n```\n```bash\n$ no\n```\n")
    assert [(b.kind, b.line) for b in blocks] == [("console", 3)]
    commands = console_commands(blocks[0].text)
    assert [(c.command, c.shown) for c in commands] == [("curl a \\\n    -d b", ["{}"]), ("echo", ["x", "y"])]

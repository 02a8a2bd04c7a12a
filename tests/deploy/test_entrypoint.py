"""The images run `mhr serve`: the `mhr` console script of this project with its `serve` subcommand,
the same CLI the server tests run.

`mhr` is `training.cli:main`, which adds the commands of the "mhr.commands" entry-point group; the
server package provides `serve` there. The checks of the registered command skip (with that reason)
until the project declares it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.deploy.dockerfile import parse

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILES = [ROOT / "deploy" / "docker" / "Dockerfile.cpu", ROOT / "deploy" / "docker" / "Dockerfile.cuda"]
GROUP = "mhr.commands"

# The settings the deployment files pass as MHR_<FIELD> variables, and the `mhr serve` option of each.
# A deployment file that sets any other MHR_ variable fails test_deploy_files_use_known_settings.
SETTINGS = {
    "MHR_BUNDLE": "--bundle", "MHR_MODEL": "--model", "MHR_DEVICE": "--device", "MHR_DTYPE": "--dtype",
    "MHR_HOST": "--host", "MHR_PORT": "--port", "MHR_API_KEY": "--api-key", "MHR_ADMIN_KEY": "--admin-key",
    "MHR_DRAIN_SECONDS": "--drain-seconds", "MHR_CPU_KERNEL": "--cpu-kernel",
}
DEPLOY_FILES = [*DOCKERFILES, ROOT / "deploy" / "docker" / "compose.yaml",
                *sorted((ROOT / "deploy" / "k8s").rglob("*.yaml"))]


def serve_entry_point() -> str | None:
    """`module:function` of the `serve` command as pyproject.toml declares it, or None."""
    declared = PYPROJECT["project"].get("entry-points", {}).get(GROUP, {})
    return declared.get("serve")


def test_console_script_is_the_mhr_cli():
    from training import cli

    assert PYPROJECT["project"]["scripts"]["mhr"] == "training.cli:main"
    # main() adds the commands of this group: that is how `serve` becomes `mhr serve`.
    assert cli.PLUGIN_GROUP == GROUP


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_names_the_console_script(dockerfile):
    entrypoint = [i for i in parse(dockerfile) if i.keyword == "ENTRYPOINT"][-1].exec_form()
    script, command = entrypoint
    assert script in PYPROJECT["project"]["scripts"], f"{script} is not a console script of the project"
    assert command == "serve"


def test_deploy_files_use_known_settings():
    for path in DEPLOY_FILES:
        used = set(re.findall(r"\bMHR_[A-Z_]+\b", path.read_text()))
        # MHR_MODELS_DIR / MHR_BUNDLES_DIR are compose's host paths, not server settings.
        used -= {"MHR_MODELS_DIR", "MHR_BUNDLES_DIR"}
        assert used <= set(SETTINGS), f"{path.relative_to(ROOT)}: unknown settings {sorted(used - set(SETTINGS))}"


def test_serve_command_is_registered():
    target = serve_entry_point()
    if target is None:
        pytest.skip(f'pyproject.toml declares no "serve" in [project.entry-points."{GROUP}"] yet')
    installed = {e.name: e.value for e in entry_points(group=GROUP)}
    assert installed.get("serve") == target, \
        ("the installed metadata differs from pyproject.toml: reinstall the project (pip install -e .); "
         "a stale mhr_serve.egg-info in the repository root also shadows it")
    assert target.startswith("server."), "`mhr serve` is provided by the server package"


def test_serve_command_takes_the_deployment_settings():
    """`mhr serve --help`, through the same `main` the console script runs, lists every option the
    deployment files set by environment variable."""
    if serve_entry_point() is None:
        pytest.skip(f'pyproject.toml declares no "serve" in [project.entry-points."{GROUP}"] yet')
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    run = subprocess.run([sys.executable, "-c", "from training.cli import main; main()", "serve", "--help"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    for option in SETTINGS.values():
        assert option in run.stdout, f"`mhr serve` has no {option}"

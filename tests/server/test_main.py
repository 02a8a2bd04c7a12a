"""`mhr serve`: the engine class is picked in one place, vLLM is imported only when chosen, and options reach
the settings' validation."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from server.engine.core import Engine
from server.main import choose_engine


def test_the_torch_engine_is_the_default_choice():
    assert choose_engine("torch") is Engine


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_fails_with_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "server", "--engine", "vllm", "--bundle", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and "--engine vllm needs vLLM" in lines[-1] and "mhr-serve[vllm]" in lines[-1]


@pytest.mark.parametrize(("flag", "value", "field"), [("--kv-dtype", "fp8", "kv_dtype"),
                                                       ("--prefix-cache-mb", "-1", "prefix_cache_mb"),
                                                       ("--max-prefill-tokens", "0", "max_prefill_tokens")])
def test_a_bad_setting_on_the_command_line_is_refused_by_name(tmp_path, flag, value, field):
    out = subprocess.run([sys.executable, "-m", "server", flag, value, "--bundle", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and field in out.stderr and value in out.stderr


def test_help_shows_what_applies_to_each_option_left_out():
    """Every option's row in `mhr serve --help` names its default (brackets would be eaten as markup)."""
    import typer
    from typer.testing import CliRunner

    from server.main import serve

    app = typer.Typer()
    app.command()(serve)
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400"})  # one row per option
    rows = {}
    for line in result.output.splitlines():
        names = [word for word in line.split() if word.startswith("--")]
        if line.startswith("│") and names:
            rows.setdefault(names[0], line)
    options = [p.opts[0] for p in typer.main.get_command(app).params
               if p.opts[0] not in ("--help", "--install-completion", "--show-completion")]
    assert len(options) > 20
    for option in options:
        assert "default: " in rows[option], rows[option]
    assert "(env MHR_BUNDLE" in rows["--bundle"] and "127.0.0.1" in rows["--host"] and "8000" in rows["--port"]


@pytest.mark.parametrize(("flags", "compile"), [([], False), (["--compile"], True), (["--no-compile"], False)])
def test_compile_flag_reaches_the_settings(tmp_path, monkeypatch, flags, compile):
    import typer
    from typer.testing import CliRunner

    import server.main

    chosen = []
    monkeypatch.setattr(server.main, "run", chosen.append)
    app = typer.Typer()
    app.command()(server.main.serve)
    result = CliRunner().invoke(app, [*flags, "--bundle", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert chosen[0].compile is compile

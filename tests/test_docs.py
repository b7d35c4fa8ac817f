"""The documentation site builds with `mkdocs build --strict`, its CLI reference holds every config field, every
command the README and the pages show exists in the CLI, and the README's links point at files that exist."""

from __future__ import annotations

import argparse
import html
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.cli import build_parser
from tuneloop.config import field_paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_strict_build_writes_every_page(site):
    for page in ("index.html", "cli/index.html", "api/index.html", "benchmarks/index.html",
                 "benchmarks-methods/index.html"):
        assert (site / page).is_file(), page
    assert (site / "report.png").is_file()
    assert not (site / "hooks").exists()  # the hook is build code, not a page


def test_cli_reference_holds_every_config_field_with_its_help_and_flags(site):
    page = html.unescape((site / "cli" / "index.html").read_text(encoding="utf-8"))
    text = re.sub(r"<[^>]+>", "", page)
    for path, f in field_paths().items():
        assert f"config-{path.replace('.', '-').replace('_', '-')}" in page, path  # its own anchor
        assert path in text, path
        assert f.metadata["help"].replace("`", "") in text.replace("`", ""), path
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for action in commands["train"]._actions:
        if not isinstance(action, argparse._HelpAction):
            for flag in action.option_strings:
                assert flag in text, flag
    for command in commands:
        assert f"tuneloop {command}" in text, command


def test_python_api_page_is_written_from_the_docstrings(site):
    from tuneloop import train

    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page)))
    assert train.__doc__.splitlines()[0] in text


def test_readme_is_short_and_its_relative_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local and all((ROOT / link).exists() for link in local), [l for l in local if not (ROOT / l).exists()]
    assert {"docs/cli.md", "docs/benchmarks.md", "docs/api.md"} <= set(local)


def shown_commands(text: str) -> list[list[str]]:
    """Every `tuneloop ...` command line in the ```bash blocks of a Markdown text, as argv (placeholders skipped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", line)[0].strip()
            if line.startswith(("tuneloop ", "python -m tuneloop ")) and "..." not in line and "[" not in line:
                argv = shlex.split(line)
                commands.append(argv[3:] if argv[0] == "python" else argv[1:])
    return commands


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_every_command_shown_exists_in_the_cli(page):
    commands = shown_commands((ROOT / page).read_text(encoding="utf-8"))
    for argv in commands:
        build_parser().parse_args(argv)  # an unknown command or option raises ConfigError
    if page == "README.md":
        assert {argv[0] for argv in commands} >= {"train", "eval", "predict", "report"}

"""pyproject.toml's ranges, the CI constraints and the lowest versions `make test-min` installs agree."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower()] = Version(spec.version)
    return pins


def _dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return {r.name.lower(): r for r in reqs}


def test_min_constraints_are_the_lower_bounds_of_the_core_libraries():
    deps, lowest = _dependencies(), _pins("constraints-min.txt")
    assert set(lowest) == {"torch", "transformers", "accelerate", "datasets"}
    for name, version in lowest.items():
        bounds = [Version(s.version) for s in deps[name].specifier if s.operator == ">="]
        assert bounds == [version], f"{name}: pyproject lower bound {bounds} vs constraints-min.txt {version}"


def test_torch_is_a_range_and_ci_pins_fall_inside_the_ranges():
    deps, ci = _dependencies(), _pins("constraints.txt")
    assert not any(s.operator == "==" for s in deps["torch"].specifier)  # a GPU box brings its own torch
    for name, req in deps.items():
        assert name in ci, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(ci[name], prereleases=True), f"{name}=={ci[name]} is outside {req.specifier}"


def test_make_and_ci_install_with_the_constraints():
    assert 'install -q -e ".[dev]" -c constraints.txt' in (ROOT / "Makefile").read_text()
    assert "constraints-min.txt" in (ROOT / "Makefile").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()

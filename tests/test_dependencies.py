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


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(extra: str) -> list[Requirement]:
    """The core dependencies plus those of `extra`, with extras that name tuneloop itself expanded."""
    project = _project()
    reqs, todo = [Requirement(r) for r in project["dependencies"]], [extra]
    while todo:
        for req in map(Requirement, project["optional-dependencies"][todo.pop()]):
            if req.name == "tuneloop":
                todo.extend(req.extras)
            else:
                reqs.append(req)
    return reqs


def test_min_constraints_are_the_lower_bounds_of_the_core_libraries():
    core = {r.name.lower(): r for r in map(Requirement, _project()["dependencies"])}
    lowest = _pins("constraints-min.txt")
    assert set(lowest) == {"torch", "transformers", "accelerate", "datasets"}
    for name, version in lowest.items():
        bounds = [Version(s.version) for s in core[name].specifier if s.operator == ">="]
        assert bounds == [version], f"{name}: pyproject lower bound {bounds} vs constraints-min.txt {version}"


def test_what_make_test_min_installs_allows_the_lowest_versions():
    lowest = _pins("constraints-min.txt")
    for req in _requirements("test"):
        if req.name.lower() in lowest:
            assert req.specifier.contains(lowest[req.name.lower()]), f"{req} excludes {lowest[req.name.lower()]}"
    assert "torchao" not in {r.name.lower() for r in _requirements("test")}  # it needs torch >= 2.11


def test_torch_is_a_range_and_ci_pins_fall_inside_the_ranges():
    reqs, ci = _requirements("dev"), _pins("constraints.txt")
    assert not any(s.operator == "==" for r in reqs if r.name == "torch" for s in r.specifier)  # a GPU box brings its own
    for req in reqs:
        name = req.name.lower()
        assert name in ci, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(ci[name], prereleases=True), f"{name}=={ci[name]} is outside {req.specifier}"


def test_make_and_ci_install_with_the_constraints():
    assert 'install -q -e ".[dev]" -c constraints.txt' in (ROOT / "Makefile").read_text()
    assert 'install -q -e ".[test]" -c constraints-min.txt' in (ROOT / "Makefile").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()

"""The dependency locks: exact pins that satisfy pyproject.toml, and the environment they built."""

import importlib.metadata
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from runner import REPO

LOCKS = {"cpu": REPO / "requirements" / "cpu.lock", "cuda": REPO / "requirements" / "cuda.lock"}
# The environments each lock is made for (scripts/lock): where its markers must pick one pin.
PYTHONS = {"cpu": ["3.11"], "cuda": ["3.10", "3.11", "3.12", "3.13"]}


def pins(lock: Path) -> list[Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in lock.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def environment(python: str) -> dict:
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython")
    return env


def chosen(lock: str, python: str) -> dict[str, Version]:
    """What installing the lock on Linux x86_64 with this Python gives: name -> version."""
    env = environment(python)
    found = {}
    for pin in pins(LOCKS[lock]):
        if pin.marker is None or pin.marker.evaluate(env):
            name = canonicalize_name(pin.name)
            assert name not in found, f"{lock}.lock pins {name} twice for Python {python}"
            found[name] = Version(next(iter(pin.specifier)).version)
    return found


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["test"], *extras["kernels"], *extras["eval"]]]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_line_is_an_exact_pin(lock):
    for pin in pins(LOCKS[lock]):
        specifiers = list(pin.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{lock}.lock: {pin} is not an exact pin"


@pytest.mark.parametrize("lock, python", [(lock, python) for lock in sorted(LOCKS) for python in PYTHONS[lock]])
def test_lock_satisfies_pyproject(lock, python):
    versions = chosen(lock, python)
    env = environment(python)
    for requirement in project_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        name = canonicalize_name(requirement.name)
        assert name in versions, f"{lock}.lock has no pin for {requirement} (Python {python})"
        assert requirement.specifier.contains(versions[name], prereleases=True), (
            f"{lock}.lock pins {name}=={versions[name]}, outside pyproject.toml's {requirement}")


def test_each_lock_has_its_own_torch_build():
    assert chosen("cpu", "3.11")["torch"].local == "cpu"
    assert all(chosen("cuda", python)["torch"].local is None for python in PYTHONS["cuda"])


def test_this_environment_is_the_lock():
    # Only an environment that scripts/venv-run built from the cpu lock (as CI's) must match it.
    if not list(Path(sys.prefix).glob(".finetune-installed-*")):
        pytest.skip(reason="not an environment built by scripts/venv-run")
    locked = chosen("cpu", f"{sys.version_info.major}.{sys.version_info.minor}")
    # The environment's own packages: setuptools puts its vendored copies (other versions) on
    # sys.path once something imports it.
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version)
                 for d in importlib.metadata.distributions(path=site)}
    different = {name: (str(version), str(installed.get(name))) for name, version in locked.items()
                 if installed.get(name) != version}
    assert different == {}, f"installed packages differ from requirements/cpu.lock (locked, installed): {different}"

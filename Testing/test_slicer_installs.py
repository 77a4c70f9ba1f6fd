"""Installing the worker's packages from the Slicer panel, without Slicer: one requirement list,
PyTorch's build chosen from the machine, pip never touched, background and cancellable until pip
installs."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

import pytest

from MedDIFTLib.core.errors import CancelledError
from MedDIFTLib.slicer import installs

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_reads_the_one_requirement_list():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dependencies" not in project["project"] and "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["MedDIFTLib/requirements.txt"]
    assert installs.REQUIREMENTS_FILE == ROOT / "MedDIFTLib" / "requirements.txt"
    installed = {installs.requirement_name(r).lower() for r in importlib.metadata.requires("meddift") if ";" not in r}
    assert installed == {installs.requirement_name(r).lower() for r in installs.read_requirements()}


def test_missing_requirements_checks_names_and_versions_without_importing():
    versions = {"numpy": "1.20.0", "scipy": "1.11.0"}

    def version_of(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    assert installs.missing_requirements(["numpy>=1.24", "scipy>=1.10", "dask[distributed]>=2024.8"], version_of) == [
        "numpy>=1.24", "dask[distributed]>=2024.8"]
    assert installs.requirement_name("dask[distributed]>=2024.8,<2028") == "dask"


@pytest.mark.parametrize(("system", "driver", "index"), [
    ("Linux", (12, 9), "cu128"), ("Windows", (12, 6), "cu126"), ("Linux", (12, 4), "cu118"),
    ("Linux", (11, 4), "cpu"), ("Linux", None, "cpu"), ("Darwin", None, None),
])
def test_torch_build_follows_the_driver(system, driver, index):
    url = installs.torch_index_url(system, driver)
    assert url == (None if index is None else installs.TORCH_INDEX + index)


def test_driver_cuda_version_from_nvidia_smi():
    output = "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |"

    def run(command, **kwargs):
        return subprocess.CompletedProcess(command, 0, stdout=output)

    def missing(command, **kwargs):
        raise FileNotFoundError(command[0])

    assert installs.driver_cuda_version(run) == (12, 4)
    assert installs.driver_cuda_version(missing) is None


def test_install_commands_take_torch_from_its_index_and_never_touch_pip():
    commands = installs.install_commands("/opt/PythonSlicer", ["numpy>=1.24", "torch>=2.2", "monai>=1.4,<1.7"],
                                         installs.TORCH_INDEX + "cu128")
    assert commands == [
        ["/opt/PythonSlicer", "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
         "--index-url", installs.TORCH_INDEX + "cu128", "torch>=2.2"],
        ["/opt/PythonSlicer", "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
         "numpy>=1.24", "monai>=1.4,<1.7"],
    ]
    requirements = [argument for command in commands for argument in command[6:]]
    assert not [r for r in requirements if r.startswith(("pip", "light-the-torch", "--upgrade"))]
    assert installs.install_commands("py", ["numpy"], None) == [
        ["py", "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "numpy"]]


def _fake_pip(lines_before: list[str], lines_after: list[str], pause_s: float = 30.0) -> list[str]:
    """A child that prints pip-like lines, waits ``pause_s``, then prints the rest."""
    script = (
        "import sys, time\n"
        f"for line in {lines_before!r}: print(line, flush=True)\n"
        f"time.sleep({pause_s})\n"
        f"for line in {lines_after!r}: print(line, flush=True)\n"
    )
    return [sys.executable, "-c", script]


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_install_cancels_while_downloading():
    outcomes = []
    chain = installs.install_chain([_fake_pip(["Collecting torch"], []), _fake_pip([], ["never"])], outcomes.append)
    chain.start()
    _wait_for(lambda: chain.poll() and chain.status() == "Collecting torch")
    assert chain.cancellable
    chain.cancel()
    assert len(outcomes) == 1 and isinstance(outcomes[0], CancelledError) and not chain.poll()


def test_install_is_not_cancelled_once_pip_installs():
    outcomes = []
    chain = installs.install_chain(
        [_fake_pip(["Downloading numpy", "Installing collected packages: numpy"], ["Successfully installed"], 1.0)],
        outcomes.append,
    )
    chain.start()
    _wait_for(lambda: chain.poll() and not chain.cancellable)
    chain.cancel()
    assert outcomes == [] and chain.poll(), "installing goes on"
    _wait_for(lambda: not chain.poll())
    assert outcomes == [None] and chain.lines[-1] == "Successfully installed"

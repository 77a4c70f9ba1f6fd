"""The worker's Python packages: which are missing, and installing them in the background.

The requirements are read from ``MedDIFTLib/requirements.txt``, the list ``pyproject.toml`` reads
too (the extension ships it beside the library). They are installed by pip in child processes
(:func:`install_chain`): PyTorch first, from the PyTorch package index of this machine's build
(:func:`torch_index_url`: the newest CUDA build the NVIDIA driver runs, else the CPU build; PyPI's
wheels on macOS), then the others from PyPI. pip itself is never installed, upgraded or
downgraded, and nothing is imported into Slicer's process. pip downloads every package before it
installs any: a step can be cancelled until pip says "Installing collected packages", and from
then on it runs to its end, so a cancel never leaves a package half installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .background import ChildCommand, CommandChain, DoneCallback

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "requirements.txt"
TORCH = "torch"
TORCH_INDEX = "https://download.pytorch.org/whl/"
# PyTorch's CUDA builds, newest first: (CUDA major, minor) the driver must run, the index's name.
CUDA_BUILDS = (((12, 8), "cu128"), ((12, 6), "cu126"), ((11, 8), "cu118"))
INSTALLING_MARKER = "Installing collected packages"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_DRIVER_CUDA = re.compile(r"CUDA Version:\s*(\d+)\.(\d+)")


def read_requirements(path: str | Path = REQUIREMENTS_FILE) -> list[str]:
    """The requirement lines of ``path`` (comments and blank lines left out)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement (``dask[distributed]>=2024.8`` -> ``dask``)."""
    found = _NAME.match(requirement)
    if found is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return found.group(1)


def _satisfied(requirement: str, installed_version: str) -> bool:
    """True when ``installed_version`` meets the requirement's version range (when ``packaging``,
    which pip and most Pythons carry, can say; else any installed version does)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return True
    return Requirement(requirement).specifier.contains(installed_version, prereleases=True)


def missing_requirements(requirements: Sequence[str] | None = None,
                         version_of: Callable[[str], str] = importlib.metadata.version) -> list[str]:
    """The requirements not installed, or installed in a version out of their range (nothing is imported)."""
    missing = []
    for requirement in read_requirements() if requirements is None else requirements:
        try:
            installed = version_of(requirement_name(requirement))
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if not _satisfied(requirement, installed):
            missing.append(requirement)
    return missing


def driver_cuda_version(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> tuple[int, int] | None:
    """The CUDA version the NVIDIA driver supports (from ``nvidia-smi``), or None without one."""
    try:
        completed = run(["nvidia-smi"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    found = _DRIVER_CUDA.search(completed.stdout or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def torch_index_url(system: str, driver_cuda: tuple[int, int] | None) -> str | None:
    """The package index of the PyTorch build for this machine: the newest CUDA build that the
    driver's CUDA version runs, else the CPU build; None (PyPI) on macOS (``system`` as
    :func:`platform.system` gives it)."""
    if system == "Darwin":
        return None
    for needed, name in CUDA_BUILDS:
        if driver_cuda is not None and driver_cuda >= needed:
            return TORCH_INDEX + name
    return TORCH_INDEX + "cpu"


def install_commands(python_executable: str, requirements: Sequence[str], torch_index: str | None) -> list[list[str]]:
    """The pip commands that install ``requirements``: PyTorch from ``torch_index`` first, then the rest."""
    pip = [python_executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    torch = [requirement for requirement in requirements if requirement_name(requirement).lower() == TORCH]
    others = [requirement for requirement in requirements if requirement not in torch]
    commands = []
    if torch:
        commands.append(pip + ([] if torch_index is None else ["--index-url", torch_index]) + torch)
    if others:
        commands.append(pip + others)
    return commands


class PipInstall(ChildCommand):
    """One pip command; :attr:`cancellable` turns False once pip starts installing what it downloaded."""

    what = "package installation"

    def __init__(self, command: Sequence[str], on_done: DoneCallback,
                 environment: Mapping[str, str] | None = None) -> None:
        super().__init__(command, on_done, environment)
        self.cancellable = True

    def _read_line(self, line: str) -> bool:
        if line.startswith(INSTALLING_MARKER):
            self.cancellable = False
        return False

    def cancel(self) -> None:
        """Cancel while pip downloads; once it installs, it is left to finish (nothing half installed)."""
        if self.cancellable:
            super().cancel()


class InstallChain(CommandChain):
    """The pip commands one after another (:func:`install_chain`); :attr:`cancellable` says whether
    :meth:`cancel` can stop them now."""

    @property
    def cancellable(self) -> bool:
        return self.finished or getattr(self.current, "cancellable", True)

    def cancel(self) -> None:
        if self.cancellable:
            super().cancel()

    def status(self) -> str:
        """The current step's last output line (pip's "Collecting ...", "Downloading ...")."""
        lines = [] if self.current is None else self.current.output_lines()
        return lines[-1] if lines else ""


def install_chain(commands: Sequence[Sequence[str]], on_done: DoneCallback,
                  environment: Mapping[str, str] | None = None) -> InstallChain:
    """The pip ``commands`` (:func:`install_commands`) one after another; ``on_done(error)`` once.
    Call ``start``, then ``poll`` from a timer."""
    def step(command: Sequence[str]) -> Callable[[DoneCallback], PipInstall]:
        return lambda done: PipInstall(command, done, environment)

    return InstallChain([step(command) for command in commands], on_done)


def refresh_import_caches() -> None:
    """Let this process find the packages just installed."""
    importlib.invalidate_caches()

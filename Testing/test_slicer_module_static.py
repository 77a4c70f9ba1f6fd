"""Checks of the Slicer extension that run without Slicer.

Static: MedDIFT.py compiles and imports nothing heavy at top level; the .ui and the parameter
node agree; every file named in the CMake lists exists and every MedDIFTLib .py file is listed;
the .s4ext has its keys. Dynamic: MedDIFT.py's Logic and its self-test (MedDIFTTest) run against
Slicer's real MRML (``slicer-core``) and the real worker, with Slicer's Qt layer replaced by
stand-ins (Qt widgets cannot exist without the application).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import struct
import subprocess
import sys
import types
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_FILE = ROOT / "MedDIFT" / "MedDIFT.py"
PANEL_DIR = ROOT / "MedDIFT" / "MedDIFTPanel"
PANEL_FILES = sorted(PANEL_DIR.glob("*.py"))
UI_FILE = ROOT / "MedDIFT" / "Resources" / "UI" / "MedDIFT.ui"
ICON_FILE = ROOT / "MedDIFT" / "Resources" / "Icons" / "MedDIFT.png"
EXTENSION_ICON_FILE = ROOT / "Resources" / "MedDIFT.png"
S4EXT_FILE = ROOT / "MedDIFT.s4ext"
CATALOG_FILE = ROOT / "MedDIFT.json"
URL_PLACEHOLDER = "TO-BE-FILLED-IN-ON-PUBLICATION"
CMAKE_FILES = {
    "top": ROOT / "CMakeLists.txt",
    "module": ROOT / "MedDIFT" / "CMakeLists.txt",
    "library": ROOT / "MedDIFTLib" / "CMakeLists.txt",
    "testing": ROOT / "Testing" / "Python" / "CMakeLists.txt",
}
HEAVY_MODULES = ("torch", "monai", "SimpleITK", "scipy", "numpy", "einops")
NEVER_IN_SLICER = ("torch", "monai")
# Imported when Slicer loads the module, for the panel's defaults; imports neither torch nor numpy.
TOP_LEVEL_LIBRARY_MODULES = ("MedDIFTLib.core.options",)


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


def imported_modules(nodes) -> list[str]:
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
    return names


def top_level_statements(tree: ast.Module):
    """Statements run at import: the module body, including bodies of top-level if/try blocks."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            pending += node.body + node.orelse + getattr(node, "handlers", []) + getattr(node, "finalbody", [])
        elif isinstance(node, ast.ExceptHandler):
            pending += node.body


def module_classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    """Classes of the module body, including those defined under a top-level ``if`` (the version guard)."""
    return {node.name: node for node in top_level_statements(tree) if isinstance(node, ast.ClassDef)}


# ------------------------------------------------------------------------------------ MedDIFT.py


def test_module_file_compiles():
    compile(MODULE_FILE.read_text(), str(MODULE_FILE), "exec")


def test_nothing_heavy_is_imported_at_module_level(module_tree):
    top_level = imported_modules(top_level_statements(module_tree))
    library = [name for name in top_level if name.startswith("MedDIFTLib") and name not in TOP_LEVEL_LIBRARY_MODULES]
    heavy = [name for name in top_level if name.split(".")[0] in HEAVY_MODULES] + library
    assert heavy == [], f"MedDIFT.py imports {heavy} when Slicer loads it; import them where they are used"
    anywhere = imported_modules(ast.walk(module_tree))
    assert [name for name in anywhere if name.split(".")[0] in NEVER_IN_SLICER] == []
    script = (
        "import sys\n"
        f"for name in {TOP_LEVEL_LIBRARY_MODULES!r}: __import__(name)\n"
        f"print(sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert completed.stdout.strip() == "[]", completed.stdout + completed.stderr


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_library_modules_used_by_the_module_do_not_import_torch(module_tree):
    candidates = set()
    for node in ast.walk(module_tree):
        if isinstance(node, ast.Import):
            candidates |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            candidates |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    used = sorted(name for name in candidates if name.startswith("MedDIFTLib") and is_module(name))
    assert {"MedDIFTLib.slicer.session", "MedDIFTLib.slicer.scene_run", "MedDIFTLib.core.options"} <= set(used)
    script = (
        "import importlib, sys\n"
        f"for name in {used!r}: importlib.import_module(name)\n"
        f"loaded = sorted(name for name in {NEVER_IN_SLICER!r} if name in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr


def test_module_category_is_translated_where_slicer_translates_categories(module_tree):
    init = next(node for node in module_classes(module_tree)["MedDIFT"].body if isinstance(node, ast.FunctionDef))
    categories = [
        ast.unparse(node.value) for node in ast.walk(init)
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "self.parent.categories"
    ]
    assert categories == ["[translate('qSlicerAbstractCoreModule', 'Registration')]"]


def test_no_deprecated_slice_orientation_call():
    sources = [MODULE_FILE, *sorted((ROOT / "MedDIFTLib" / "slicer").glob("*.py"))]
    assert [path.name for path in sources if "GetOrientationString" in path.read_text()] == []


def test_module_defines_the_slicer_classes(module_tree):
    classes = module_classes(module_tree)
    expected_bases = {
        "MedDIFT": "ScriptedLoadableModule",
        "MedDIFTWidget": "ScriptedLoadableModuleWidget",
        "MedDIFTLogic": "ScriptedLoadableModuleLogic",
        "MedDIFTTest": "ScriptedLoadableModuleTest",
    }
    for name, base in expected_bases.items():
        assert name in classes, f"MedDIFT.py lacks class {name}"
        assert base in [ast.unparse(b) for b in classes[name].bases]
    test_methods = [n.name for n in classes["MedDIFTTest"].body if isinstance(n, ast.FunctionDef)]
    assert "runTest" in test_methods and any(name.startswith("test_") for name in test_methods)


# ------------------------------------------------------------------------------------ parameter node and .ui


def parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Fields of the @parameterNodeWrapper class: name -> annotation source."""
    wrapped = [
        node
        for node in module_classes(tree).values()
        if any(ast.unparse(decorator) == "parameterNodeWrapper" for decorator in node.decorator_list)
    ]
    assert len(wrapped) == 1, "MedDIFT.py needs exactly one @parameterNodeWrapper class"
    return {
        node.target.id: ast.unparse(node.annotation)
        for node in wrapped[0].body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def enum_names(tree: ast.Module) -> set[str]:
    return {name for name, node in module_classes(tree).items() if "enum.Enum" in [ast.unparse(b) for b in node.bases]}


@pytest.fixture(scope="module")
def ui_root() -> ElementTree.Element:
    return ElementTree.parse(UI_FILE).getroot()


def ui_widgets(root: ElementTree.Element) -> dict[str, ElementTree.Element]:
    return {widget.get("name"): widget for widget in root.iter("widget")}


def widget_property(widget: ElementTree.Element, name: str) -> ElementTree.Element | None:
    return next((prop for prop in widget.findall("property") if prop.get("name") == name), None)


def bound_widgets(root: ElementTree.Element) -> dict[str, ElementTree.Element]:
    """SlicerParameterName -> widget."""
    bound = {}
    for widget in root.iter("widget"):
        prop = widget_property(widget, "SlicerParameterName")
        if prop is not None:
            name = prop.findtext("string")
            assert name not in bound, f"two widgets are bound to {name}"
            bound[name] = widget
    return bound


# Parameter node fields that the backbone section writes (the backbone combo box and the option rows are
# built from the backbone catalogue, so no .ui widget is bound to them).
SET_BY_CODE = {"backbone", "backboneOptions"}


def test_every_ui_parameter_is_a_parameter_node_field_and_vice_versa(module_tree, ui_root):
    fields = set(parameter_fields(module_tree))
    bound = set(bound_widgets(ui_root))
    assert bound - fields == set(), f"the .ui binds names the parameter node lacks: {sorted(bound - fields)}"
    assert fields - bound == SET_BY_CODE, f"parameter node fields without a widget: {sorted(fields - bound)}"
    backbone_section = (PANEL_DIR / "backbone.py").read_text()
    assert all(f"parameterNode.{name} =" in backbone_section for name in SET_BY_CODE)


WIDGETS_FOR_TYPE = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "ctkDoubleSlider"},
    "enum": {"QComboBox", "ctkComboBox"},
    "node": {"qMRMLNodeComboBox"},
}


def test_each_bound_widget_can_show_its_parameter_type(module_tree, ui_root):
    enums = enum_names(module_tree)
    for name, annotation in parameter_fields(module_tree).items():
        if name in SET_BY_CODE:
            continue
        widget = bound_widgets(ui_root)[name]
        base = annotation.removeprefix("Annotated[").split(",")[0].rstrip("]")
        kind = "node" if base.startswith("vtkMRML") else "enum" if base in enums else base
        assert kind in WIDGETS_FOR_TYPE, f"{name}: no known widget for type {annotation}"
        assert widget.get("class") in WIDGETS_FOR_TYPE[kind], f"{name} ({annotation}) bound to {widget.get('class')}"
        if widget.get("class") == "ctkSliderWidget":
            assert "WithinRange(" in annotation, f"{name}: a ctkSliderWidget needs a WithinRange bound"
        if kind == "node":
            node_types = widget_property(widget, "nodeTypes")
            assert node_types is not None and base in [s.text for s in node_types.iter("string")]


def test_widgets_used_in_code_exist_in_the_ui(ui_root):
    used = {name for path in (MODULE_FILE, *PANEL_FILES) for name in re.findall(r"self\.ui\.(\w+)", path.read_text())}
    missing = used - set(ui_widgets(ui_root))
    assert missing == set(), f"MedDIFT.py uses widgets the .ui lacks: {sorted(missing)}"


def test_ui_custom_widgets_and_scene_connections(ui_root):
    declared = {custom.findtext("class") for custom in ui_root.iter("customwidget")}
    used_classes = {widget.get("class") for widget in ui_root.iter("widget")}
    undeclared = {name for name in used_classes if not name.startswith("Q")} - declared
    assert undeclared == set(), f"custom widget classes not declared: {sorted(undeclared)}"
    widgets = ui_widgets(ui_root)
    connections = ui_root.iter("connection")
    receivers = {c.findtext("receiver") for c in connections if "mrmlSceneChanged" in c.findtext("signal")}
    assert receivers <= set(widgets)
    scene_widgets = {name for name, w in widgets.items() if w.get("class") in ("qMRMLNodeComboBox",
                                                                                "qSlicerMarkupsPlaceWidget")}
    assert scene_widgets <= receivers, f"widgets that never get the scene: {sorted(scene_widgets - receivers)}"


# ------------------------------------------------------------------------------------ CMake and .s4ext


CMAKE_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()"]+')
MACRO_KEYWORDS = {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"}


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``(command, arguments)`` of a CMakeLists.txt; quoted arguments keep their quotes."""
    lines = [re.sub(r'^([^"#]*(?:"[^"]*"[^"#]*)*)#.*$', r"\1", line) for line in path.read_text().splitlines()]
    tokens = CMAKE_TOKEN.findall("\n".join(lines))
    commands, position = [], 0
    while position < len(tokens):
        name = tokens[position]
        assert tokens[position + 1] == "(", f"{path}: expected '(' after {name}"
        depth, arguments, position = 1, [], position + 2
        while depth:
            token = tokens[position]
            depth += {"(": 1, ")": -1}.get(token, 0)
            if depth and token not in "()":
                arguments.append(token)
            position += 1
        commands.append((name.lower(), arguments))
    return commands


def cmake_variables(commands) -> dict[str, list[str]]:
    variables: dict[str, list[str]] = {}
    for name, args in commands:
        if name == "set" and args:
            values = [re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [])), v) for v in args[1:]]
            variables[args[0]] = [v.strip('"') for v in values]
    return variables


def listed_files(path: Path) -> list[str]:
    """Files given to slicerMacroBuildScriptedModule (SCRIPTS and RESOURCES), relative to the folder."""
    commands = cmake_commands(path)
    variables = cmake_variables(commands)
    files = []
    for name, args in commands:
        if name == "slicermacrobuildscriptedmodule":
            section = None
            for arg in args:
                if arg in MACRO_KEYWORDS:
                    section = arg
                elif section in ("SCRIPTS", "RESOURCES"):
                    reference = re.fullmatch(r"\$\{(\w+)\}", arg)
                    files += variables[reference.group(1)] if reference else [arg]
    return files


def test_every_file_named_in_cmake_exists():
    for path in CMAKE_FILES.values():
        assert path.is_file(), f"{path} is missing"
        if path.parent.name in ("MedDIFT", "MedDIFTLib"):
            assert listed_files(path), f"{path.relative_to(ROOT)} lists no files"
        for name in listed_files(path):
            assert (path.parent / name).is_file(), f"{path.relative_to(ROOT)} lists {name}, which does not exist"
        for command, args in cmake_commands(path):
            if command == "add_subdirectory":
                assert (path.parent / args[0] / "CMakeLists.txt").is_file(), f"no CMakeLists.txt in {args[0]}"
    unittest_scripts = [
        args[1] for command, args in cmake_commands(CMAKE_FILES["testing"]) if command == "slicer_add_python_unittest"
    ]
    assert unittest_scripts == ["${MedDIFT_SOURCE_DIR}/MedDIFT/MedDIFT.py"]
    assert MODULE_FILE.is_file()


def test_every_library_file_is_installed_with_the_extension():
    tomllib = pytest.importorskip("tomllib")
    library = ROOT / "MedDIFTLib"
    listed = set(listed_files(CMAKE_FILES["library"]))
    python_files = {p.relative_to(library).as_posix() for p in library.rglob("*.py") if "__pycache__" not in p.parts}
    assert python_files - listed == set(), f"add these to MedDIFTLib/CMakeLists.txt: {sorted(python_files - listed)}"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    data_files = {p.relative_to(library).as_posix() for pattern in package_data.get("MedDIFTLib", [])
                  for p in library.glob(pattern)}
    unlisted = sorted(data_files - listed)
    assert unlisted == [], f"add these resources to MedDIFTLib/CMakeLists.txt: {unlisted}"


def test_build_macros_and_extension_dependencies():
    module_commands = dict(cmake_commands(CMAKE_FILES["module"]))
    assert "WITH_GENERIC_TESTS" in module_commands["slicermacrobuildscriptedmodule"]
    library_commands = dict(cmake_commands(CMAKE_FILES["library"]))
    assert "WITH_SUBDIR" in library_commands["slicermacrobuildscriptedmodule"]
    top = cmake_commands(CMAKE_FILES["top"])
    assert ("project", ["MedDIFT"]) in top
    subdirectories = [args[0] for command, args in top if command == "add_subdirectory"]
    assert subdirectories[:2] == ["MedDIFTLib", "MedDIFT"]
    assert cmake_variables(top)["EXTENSION_DEPENDS"] == ["NA"], "no extension dependency (PyTorch comes from pip)"


def read_s4ext() -> dict[str, str]:
    entries = {}
    for line in S4EXT_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            entries[key] = value.strip()
    return entries


def test_s4ext_has_the_required_keys_and_agrees_with_cmake():
    entries = read_s4ext()
    required = ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "enabled")
    assert [key for key in required if not entries.get(key)] == []
    assert entries["category"] == "Registration"
    assert entries["depends"] == "NA"
    variables = {k: " ".join(v) for k, v in cmake_variables(cmake_commands(CMAKE_FILES["top"])).items()}
    for key, variable in (("homepage", "EXTENSION_HOMEPAGE"), ("category", "EXTENSION_CATEGORY"),
                          ("description", "EXTENSION_DESCRIPTION"), ("iconurl", "EXTENSION_ICONURL"),
                          ("contributors", "EXTENSION_CONTRIBUTORS"), ("screenshoturls", "EXTENSION_SCREENSHOTURLS"),
                          ("depends", "EXTENSION_DEPENDS")):
        assert entries.get(key, "") == variables[variable], f".s4ext {key} differs from CMake {variable}"


def test_no_repository_url_is_invented():
    """Until the repository is published its URLs are a stated placeholder, and the icon URL names
    the extension icon in Resources/; no screenshot is named while none exists."""
    entries = read_s4ext()
    for key in ("scmurl", "homepage"):
        assert entries[key] == URL_PLACEHOLDER or entries[key].startswith("https://"), key
    assert entries["iconurl"].endswith("/" + EXTENSION_ICON_FILE.relative_to(ROOT).as_posix())
    assert entries["iconurl"].startswith((URL_PLACEHOLDER + "/", "https://"))
    assert "on publication" in S4EXT_FILE.read_text() and "on publication" in CMAKE_FILES["top"].read_text()
    for path in (S4EXT_FILE, CMAKE_FILES["top"]):
        assert "meddift/SlicerMedDIFT" not in path.read_text(), f"{path.name} names an invented repository"
    screenshots = entries.get("screenshoturls", "").split()
    for url in screenshots:
        assert url.startswith(URL_PLACEHOLDER + "/Resources/"), url
        assert (ROOT / url.removeprefix(URL_PLACEHOLDER + "/")).is_file(), f"{url} names a file that does not exist"


def test_extensions_index_catalog_entry_agrees_with_the_s4ext():
    """The Extensions Index (Slicer 5.8+) takes a JSON catalog entry: schema v1.0.1 keys only
    (the schema allows no others), the same category, dependencies and revision as the .s4ext,
    and the repository URL stated as to be filled in on publication; a LICENSE at the root."""
    entry = json.loads(CATALOG_FILE.read_text())
    s4ext = read_s4ext()
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
               "scm_url", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/")
    assert entry["category"] == s4ext["category"]
    assert "build_dependencies" not in entry and s4ext["depends"] == "NA"
    assert entry["scm_revision"] == s4ext["scmrevision"] and entry["build_subdirectory"] == s4ext["build_subdirectory"]
    assert entry["scm_url"] == s4ext["scmurl"] == URL_PLACEHOLDER
    assert (ROOT / "LICENSE").is_file()


def panel_source() -> str:
    return "\n".join(path.read_text() for path in (MODULE_FILE, *PANEL_FILES))


def test_weights_and_installs_never_run_on_the_gui_thread(module_tree):
    """``logProcessOutput(..., logCallback=...)`` exists only from Slicer 5.12 and blocks the GUI, and
    ``pip_install`` blocks it too: weights and packages go through background chains polled by timers."""
    source = panel_source()
    assert "logCallback" not in source and "pip_install" not in source and "launchConsoleProcess" not in source
    assert "weights_chain(" in source and "install_chain(" in source


def test_torch_comes_from_pip_and_is_never_imported_in_slicer(module_tree):
    """No PyTorch extension (PyTorchUtils' installTorch() ends with ``import torch``), no light-the-torch
    (it needs an older pip than Slicer 5.12 ships): pip with PyTorch's index, in child processes."""
    source = panel_source()
    for absent in ("installTorch", "PyTorchUtils", "light_the_torch", "light-the-torch"):
        assert absent not in source
    for path in PANEL_FILES:
        assert "torch" not in imported_modules(ast.walk(ast.parse(path.read_text()))), path.name
    assert "torch" not in imported_modules(ast.walk(module_tree))
    assert "PyTorch" not in (S4EXT_FILE.read_text() + CATALOG_FILE.read_text()).replace("PyTorch included", "")


def test_no_backbone_name_or_option_in_the_module(module_tree):
    """Backbones and their options come from the catalogue (MedDIFTLib.core.backbones), never the module."""
    from MedDIFTLib.core.backbones import PANEL_BACKBONES

    names = {backbone.name for backbone in PANEL_BACKBONES}
    options = {option.name for backbone in PANEL_BACKBONES for option in backbone.options}
    strings = {node.value for path in (MODULE_FILE, *PANEL_FILES) for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert strings & (names | options) == set()


def test_landmark_callback_takes_no_index_for_batched_edits():
    """VTK calls PointModifiedEvent observers without call data for batched edits: the index defaults to None."""
    live = module_classes(ast.parse((PANEL_DIR / "live.py").read_text()))["LiveSection"]
    method = next(
        node for node in live.body if isinstance(node, ast.FunctionDef) and node.name == "onLandmarkModified"
    )
    assert [ast.unparse(default) for default in method.args.defaults] == ["None"]
    assert "MovedPoints" in (PANEL_DIR / "live.py").read_text()


def test_every_section_forgets_the_closed_scene():
    """Close Scene calls reset() on every section; each section with state or timers defines it."""
    source = MODULE_FILE.read_text()
    assert "for section in self.sections:\n            section.reset()" in source
    for path in PANEL_FILES:
        for name, node in module_classes(ast.parse(path.read_text())).items():
            methods = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
            holds_state = "QTimer" in ast.unparse(node) or "self._rows" in ast.unparse(node)
            if name.endswith("Section") and holds_state and name != "RunSection":
                assert {"reset", "cleanup"} & methods, f"{name} keeps state across Close Scene"


@pytest.mark.parametrize("icon", [ICON_FILE, EXTENSION_ICON_FILE], ids=["module", "extension"])
def test_icon_is_a_128_pixel_png(icon):
    data = icon.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


# ------------------------------------------------------------------------------------ logic on slicer-core


def stand_in_modules() -> dict[str, types.ModuleType]:
    """Stand-ins for the parts of Slicer that need the Qt application; MRML and slicer.util stay real."""

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    class SelfTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget"):
        setattr(scripted, name, type(name, (Base,), {}))
    scripted.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (Base,),
                                                {"getParameterNode": lambda self: None})
    scripted.ScriptedLoadableModuleTest = SelfTest
    def parameter_node_wrapper(cls):
        """Instances hold the fields' defaults (the real wrapper keeps them in a MRML node)."""
        def __init__(self, node=None):
            for name in cls.__annotations__:
                setattr(self, name, getattr(cls, name, None))

        cls.__init__ = __init__
        return cls

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameter_node_wrapper
    wrapper.WithinRange = lambda minimum, maximum: (minimum, maximum)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    modules = {name: mock.MagicMock(name=name) for name in ("qt", "ctk")}
    modules.update({module.__name__: module for module in (scripted, wrapper, i18n)})
    return modules


def load_module(monkeypatch):
    """MedDIFT.py loaded against slicer-core's MRML and a fresh scene; returns (module, scene)."""
    pytest.importorskip("slicer_core", reason="slicer-core (Slicer's MRML without Qt) is not installed")
    import slicer
    import slicer_core

    scene = slicer_core.vtkMRMLScene()
    for name, module in stand_in_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.syspath_prepend(str(MODULE_FILE.parent))  # Slicer puts a module's folder on sys.path
    spec = importlib.util.spec_from_file_location("MedDIFT", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, scene


def test_panel_defaults_are_the_library_defaults(monkeypatch, ui_root):
    from MedDIFTLib.core.options import RunSettings

    module, _scene = load_module(monkeypatch)
    assert module.MedDIFTLogic.runSettings(module.MedDIFTParameterNode) == RunSettings()
    own_defaults = {
        name: [prop.get("name") for prop in widget.findall("property") if prop.get("name") in ("value", "checked")]
        for name, widget in bound_widgets(ui_root).items()
    }
    assert {name: props for name, props in own_defaults.items() if props} == {}, "the parameter node holds defaults"


LOAD_WITHOUT_THE_CHECKOUT_ON_THE_PATH = """
import importlib.util, json, os, sys
root, testing = sys.argv[1], sys.argv[2]
# Forget how this environment finds MedDIFTLib (editable install, checkout on the path), as in Slicer.
sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
sys.path_hooks[:] = [hook for hook in sys.path_hooks if "editable" not in repr(hook).lower()]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and os.path.abspath(p or ".") != root]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("MedDIFTLib") is None
sys.path.insert(0, testing)
import test_slicer_module_static as static
sys.path.remove(testing)
import slicer, slicer_core
sys.modules.update(static.stand_in_modules())
slicer.mrmlScene = slicer_core.vtkMRMLScene()
sys.path.append(str(static.MODULE_FILE.parent))  # Slicer puts a module's folder on sys.path
spec = importlib.util.spec_from_file_location("MedDIFT", static.MODULE_FILE)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import MedDIFTLib.slicer.session
print(json.dumps({
    "library": MedDIFTLib.__file__,
    "root_on_path": root in [os.path.abspath(p or ".") for p in sys.path],
    "importable": [name for name in ("Testing", "benchmarks", "scripts") if importlib.util.find_spec(name)],
    "torch": "torch" in sys.modules,
}))
"""


def test_module_loads_the_library_by_its_path_without_exposing_the_checkout(tmp_path):
    pytest.importorskip("slicer_core", reason="slicer-core (Slicer's MRML without Qt) is not installed")
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_THE_CHECKOUT_ON_THE_PATH, str(ROOT), str(Path(__file__).parent)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report == {"library": str(ROOT / "MedDIFTLib" / "__init__.py"), "root_on_path": False, "importable": [],
                      "torch": False}


def test_self_test_runs_the_logic_on_slicer_core_with_the_real_worker(monkeypatch):
    pytest.importorskip("torch")
    module, scene = load_module(monkeypatch)
    for step, check in (
        ("test_PackagesAndBackboneOptions", lambda: True),
        ("test_MatchShiftedVolume", lambda: scene.GetNodesByClass("vtkMRMLGridTransformNode").GetNumberOfItems() == 1
         and scene.GetFirstNodeByName("F in moving").GetNumberOfControlPoints() == 3),
        ("test_VisualQA", lambda: scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == 3),
        ("test_TrackLesions", lambda: scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems() == 1),
        ("test_TrackLesionSeries", lambda: scene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems() == 1
         and scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems() == 1),
        ("test_WeightsTransfersInBackground", lambda: True),
    ):
        result = unittest.TestResult()
        module.MedDIFTTest(step).run(result)
        assert result.wasSuccessful(), (step, result.failures + result.errors)
        assert check(), step


def test_module_refuses_cleanly_on_python_3_9(monkeypatch):
    """Slicer 5.6 and 5.8 run Python 3.9: the module loads, says which Slicer it needs, imports no library."""
    for name in [name for name in sys.modules if name.startswith(("MedDIFTLib", "MedDIFTPanel"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))
    module, _scene = load_module(monkeypatch)
    assert "3D Slicer 5.10 or later" in module.UNSUPPORTED_REASON
    assert not [name for name in sys.modules if name.startswith(("MedDIFTLib", "MedDIFTPanel"))]
    assert not hasattr(module, "MedDIFTParameterNode")
    with pytest.raises(RuntimeError, match="5.10"):
        module.MedDIFTLogic()
    result = unittest.TestResult()
    module.MedDIFTTest("test_MatchShiftedVolume").run(result)
    assert [reason for _, reason in result.skipped] == [module.UNSUPPORTED_REASON]


def test_a_missing_weights_error_runs_again_only_after_the_transfers():
    """Offering the weights starts transfers and returns: the job is run again from the chain's end only."""
    def calls(path: Path, cls: str, method: str) -> set[str]:
        body = next(node for node in module_classes(ast.parse(path.read_text()))[cls].body
                    if isinstance(node, ast.FunctionDef) and node.name == method)
        return {ast.unparse(node.func) for node in ast.walk(body) if isinstance(node, ast.Call)}

    assert "self.panel.weights.offer" in calls(PANEL_DIR / "run.py", "RunSection", "finishWithError")
    assert "self.startSceneRun" not in calls(PANEL_DIR / "run.py", "RunSection", "finishWithError")
    assert "then" not in calls(PANEL_DIR / "weights.py", "WeightsSection", "offer")
    assert "then" in calls(PANEL_DIR / "weights.py", "WeightsSection", "onTransfersDone")

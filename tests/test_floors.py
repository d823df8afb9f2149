"""The floors of docs/architecture.md hold: every module's imports, lazy ones inside functions included, go to
its own floor or below, and the runtime's third-party imports leave out the torch side.

The modules are read as source (ast), not imported, so an optional package that is not installed (TensorRT)
hides nothing.
"""

from __future__ import annotations

import ast
import glob
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Python 3.10 (JetPack 6's) has no tomllib; the floors are the same on every Python.
tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli",
                              reason="reading pyproject.toml needs Python >= 3.11's tomllib, or tomli")

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the floor of the longest prefix that names it.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ground: version, errors, native sources", ("medmamba_edge.errors", "medmamba_edge.plugins")),
    ("runtime: torch-free inference", ("medmamba_edge.runtime",)),
    ("torch side and exporters", ("medmamba_edge.model", "medmamba_edge.scan", "medmamba_edge.checkpoint",
                                  "medmamba_edge.torch_backend", "medmamba_edge.exporters")),
    ("commands", ("medmamba_edge.loaders", "medmamba_edge.evaluation", "medmamba_edge.comparison",
                  "medmamba_edge.benchmarking", "medmamba_edge.plots", "medmamba_edge.serving", "medmamba_edge.cli",
                  "medmamba_edge.__main__")),
)
# What the runtime must run without: a Jetson or CPU box has none of these.
TORCH_SIDE = ("torch", "onnxscript", "torchvision", "timm")


def floor_of(module: str) -> int:
    if module == "medmamba_edge":
        return 0
    best = None
    for level, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS here and to docs/architecture.md")
    return best[0]


def all_modules() -> dict[str, Path]:
    """Every module of every folder pyproject maps into the ``medmamba_edge`` namespace."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = {}
    for name in mapping:
        package = importlib.import_module(name)
        found[name] = Path(package.__file__)
        for info in pkgutil.walk_packages(package.__path__, name + "."):
            origin = Path(importlib.util.find_spec(info.name).origin)
            if origin.suffix == ".py":  # compiled extensions import nothing of ours
                found[info.name] = origin
    return found


def imports_of(module: str, path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            names.add(base)
            # `from medmamba_edge.runtime import sources` imports a module, not a name.
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return names


MODULES = all_modules()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def declared(extra: str | None = None) -> set[str]:
    """The distributions `pip install '.[extra]'` asks for by name (the base install's for None), extras that name
    other extras of medmamba-edge resolved."""
    names = set()
    for requirement in PROJECT["dependencies"] + (PROJECT["optional-dependencies"][extra] if extra else []):
        name, extras = re.match(r"([A-Za-z0-9._-]+)\s*(?:\[([^]]*)])?", requirement).groups()
        if normalized(name) == "medmamba-edge":
            names |= {dependency for other in extras.split(",") for dependency in declared(other.strip())}
        else:
            names.add(normalized(name))
    return names


def third_party(module: str, path: Path) -> set[str]:
    """The top-level names of the packages outside Python and this project that the file imports."""
    return {name.split(".")[0] for name in imports_of(module, path)} - set(sys.stdlib_module_names) - {
        "medmamba_edge", "tests"}


def with_what_metapackages_install(allowed: set[str], providers: dict[str, list[str]]) -> set[str]:
    """``allowed`` and, for each installed distribution among them that ships no module of its own (a metapackage:
    cuda-python now, whose cuda.bindings is cuda-bindings'), the distributions it requires, so on down."""
    shipping = {normalized(d) for names in providers.values() for d in names}
    found, pending = set(), list(allowed)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        if name not in shipping:
            pending += [normalized(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requires if "extra ==" not in r]
    return found


def undeclared(files: dict[str, Path], allowed: set[str], elsewhere: dict[str, str]) -> dict[str, list[str]]:
    """Import name -> the files importing it, for each package that no distribution in ``allowed`` provides."""
    providers = importlib.metadata.packages_distributions()
    allowed = with_what_metapackages_install(allowed, providers)
    missing = {}
    for module, path in sorted(files.items()):
        for name in third_party(module, path):
            provided_by = {normalized(d) for d in providers.get(name, [elsewhere.get(name, name)])}
            if not provided_by & allowed:
                missing.setdefault(name, []).append(path.name)
    return missing


def test_the_serve_venv_is_refused_in_a_line_on_a_python_without_numpy_1_wheels(tmp_path):
    """PyTriton pins numpy < 2, which has no wheels for Python 3.13 or later: make serve-setup (which make test runs)
    on such a python3 made the venv and left pip building numpy 1.26.4 from its sdist for minutes, then failing."""
    candidates = [shutil.which("python3.13"), *glob.glob(str(Path.home() / ".pyenv/versions/3.1[3-9]*/bin/python3"))]
    found = [p for p in candidates if p and subprocess.run([p, "-c", "import sys; assert sys.version_info >= (3, 13)"],
                                                           capture_output=True).returncode == 0]
    if not found or not shutil.which("make"):
        pytest.skip("needs make and a Python >= 3.13")
    venv = tmp_path / "serve"
    with subprocess.Popen(["make", "-C", str(ROOT), "serve-setup", f"PYTHON={found[0]}", f"SERVE_VENV={venv}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as make:
        try:
            out, err = make.communicate(timeout=60)
        finally:
            if make.poll() is None:  # pip on its way to the sdist: stopped, with what it started
                os.killpg(make.pid, signal.SIGKILL)
    assert make.returncode != 0 and not venv.exists()
    assert "serve-setup: the serve venv needs Python 3.10 to 3.12" in err.splitlines()[0], err


def test_every_package_folder_is_walked():
    assert {"medmamba_edge.runtime.backends.tensorrt.runner", "medmamba_edge.runtime.sources",
            "medmamba_edge.exporters.onnx_export", "medmamba_edge.cli"} <= set(MODULES)


def test_every_package_folder_is_in_the_wheel():
    # An editable install finds a sub-package that pyproject's list leaves out; a wheel, `pip install .` on a
    # Jetson, does not, and the runtime breaks there alone.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    listed = set(setuptools["packages"])
    assert on_disk <= listed
    # The rest are folders of data (assets, C sources, the plugin's sources and scripts), listed so that setuptools
    # ships them without a warning.
    mapping = setuptools["package-dir"]
    for name in listed - on_disk:
        base = max((prefix for prefix in mapping if name.startswith(prefix + ".")), key=len)
        folder = ROOT / mapping[base] / Path(*name[len(base) + 1:].split("."))
        assert folder.is_dir() and not (folder / "__init__.py").exists(), f"{name}: no such data folder ({folder})"


def test_the_sdist_holds_what_the_build_needs_and_no_tests(tmp_path):
    # The sdist's file list is egg_info's SOURCES.txt (written to tmp_path, nothing in the checkout).
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    shipped = set((tmp_path / "medmamba_edge.egg-info" / "SOURCES.txt").read_text().splitlines())
    needed = {"LICENSE", "README.md", "pyproject.toml", "setup.py"} | {
        str(path.relative_to(ROOT)) for pattern in ("runtime/csrc/*.[ch]", "plugins/selective_scan/*.c[up]*",
                                                    "plugins/selective_scan/*.h", "plugins/selective_scan/CMakeLists.txt",
                                                    "medmamba_edge/assets/**/*.*") for path in ROOT.glob(pattern)}
    assert needed <= shipped, f"missing from the sdist: {sorted(needed - shipped)}"
    assert not [name for name in shipped if name.startswith("tests/")]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_level(module):
    level = floor_of(module)
    upward = sorted(f"{name} ({FLOORS[floor_of(name)][0]})" for name in imports_of(module, MODULES[module])
                    if name.split(".")[0] == "medmamba_edge" and floor_of(name) > level)
    assert not upward, f"{module} ({FLOORS[level][0]}) imports from above: {', '.join(upward)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if floor_of(m) <= 1))
def test_runtime_needs_no_torch(module):
    heavy = sorted(name for name in imports_of(module, MODULES[module]) if name.split(".")[0] in TORCH_SIDE)
    assert not heavy, f"{module} imports {', '.join(heavy)}: the runtime must run where torch is not installed"


# Import names of packages the development venv cannot hold, so that importlib.metadata cannot say whose they are:
# TensorRT and cuda-python need an NVIDIA GPU and driver, PyTriton (with its tritonclient) numpy < 2.
ELSEWHERE = {"tensorrt": "tensorrt", "cuda": "cuda-python", "pytriton": "nvidia-pytriton", "tritonclient": "tritonclient"}


def test_every_package_the_code_imports_is_declared():
    # A package that comes only as another's dependency (protobuf through onnx) goes when that one stops needing it.
    anywhere = declared().union(*(declared(extra) for extra in PROJECT["optional-dependencies"]))
    missing = undeclared(MODULES, anywhere, ELSEWHERE)
    assert not missing, f"imported but declared by no extra in pyproject.toml: {missing}"


def test_the_tests_import_only_what_the_dev_extra_installs():
    # `pip install -e '.[dev]'` is all a test venv gets: from Python 3.12 on, a new venv has no setuptools either.
    tests = {f"tests.{path.stem}": path for path in (ROOT / "tests").glob("*.py")}
    missing = undeclared(tests, declared("dev"), {})
    assert not missing, f"imported by the tests but not installed by the dev extra: {missing}"


def test_a_metapackage_stands_for_what_it_installs(tmp_path, monkeypatch):
    # `pip install tensorrt cuda-python` (docs/tensorrt.md): cuda-python ships no module, its cuda.bindings comes from
    # cuda-bindings, which the tensorrt extra does not name; a package's own dependency (protobuf, onnx's) still
    # counts as undeclared.
    for name, requires, files in (("cuda_python", "Requires-Dist: cuda-bindings~=13.0.0\n", []),
                                  ("cuda_bindings", "", ["cuda/bindings/__init__.py"])):
        info = tmp_path / f"{name}-13.0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 13.0.0\n{requires}")
        (info / "RECORD").write_text("".join(f"{file},,\n" for file in [*files, f"{info.name}/METADATA"]))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "compat.py"
    module.write_text("from cuda.bindings import runtime\nfrom google.protobuf.message import EncodeError\n")
    assert undeclared({"compat": module}, {"cuda-python", "onnx"}, {}) == {"google": ["compat.py"]}


# The onnxscript release that first ships each API module a torch release imports (onnxscript/_framework_apis/).
ONNXSCRIPT_API_SINCE = {"torch_2_8": "0.3.1", "torch_2_9": "0.4.0", "torch_2_11": "0.6.0"}


def release(version: str) -> tuple[int, ...]:
    """"0.6" as (0, 6, 0), to compare with "0.6.0"."""
    numbers = tuple(map(int, version.split(".")))
    return numbers + (0,) * (3 - len(numbers))


def test_the_export_extra_asks_for_the_onnxscript_that_torch_imports():
    # torch.onnx's exporter imports onnxscript._framework_apis.torch_2_N by name: with an older onnxscript, which
    # pip keeps as satisfying a lower floor, `medmamba-edge export` dies inside the trace.
    try:
        lazy_import = importlib.metadata.distribution("torch").locate_file("torch/onnx/_internal/_lazy_import.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch is not installed")
    api = re.search(r"onnxscript\._framework_apis\.(torch_\w+)", Path(lazy_import).read_text()).group(1)
    assert api in ONNXSCRIPT_API_SINCE, f"torch imports onnxscript's {api}: add the onnxscript release that ships it"
    floor = next(re.fullmatch(r"onnxscript>=([\d.]+)", r) for r in PROJECT["optional-dependencies"]["export"]
                 if r.startswith("onnxscript"))
    assert release(floor.group(1)) >= release(ONNXSCRIPT_API_SINCE[api]), (
        f"the export extra allows onnxscript {floor.group(1)}, without the {api} that torch imports")

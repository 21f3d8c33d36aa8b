"""Build the wheel, install it (not editable) into a fresh venv and drive the stock ``tune`` CLI by name.

The venv is created without pip: a ``.pth`` path line appends the running interpreter's site-packages
(torch, torchtune, pip, ...) AFTER the venv's own, so ``longlora_tune`` resolves to the installed wheel
while the heavy dependencies are reused (that parent path is not a site dir, so its own .pth files,
e.g. an editable install of this repo, are not run). Commands run from an unrelated folder with
PYTHONPATH cleared, so the source tree cannot leak in. An editable install (the README's) and a venv
without torchtune are checked too.

A throwaway probe recipe and config are added to the COPY of the sources that the wheel is built from
(never to the package itself): they make ``tune run`` observable (the probe prints where it runs from and
its arguments) whatever real recipes exist yet.
"""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROBE = "packaging_probe_distributed"
PROBE_CONFIG = "packaging_probe/tiny"
PROBE_SOURCE = """import os
import sys

# One write() per line: two ranks share the pipe, and a single write below PIPE_BUF is never interleaved.
line = " ".join(["PROBE", os.path.abspath(__file__), os.environ.get("RANK", "-"), *sys.argv[1:]])
os.write(1, (line + "\\n").encode())
"""


def _copy_sources(dest: Path) -> None:
    """Copy what a source distribution holds: top-level files, the package, recipes/ and configs/."""
    dest.mkdir()
    for entry in REPO.iterdir():
        if entry.is_file():
            shutil.copy2(entry, dest / entry.name)
    for folder in ("longlora_tune", "recipes", "configs"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))


def _make_venv(venv: Path, env: dict[str, str], parent_site_packages: bool) -> tuple[Path, Path]:
    """Create a pip-less venv; optionally append this interpreter's site-packages after its own."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent, env=env)
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(_run([str(python), "-c", code], cwd=venv.parent, env=env).stdout.strip())
    if parent_site_packages:
        parents = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
        (purelib / "zz_parent_site_packages.pth").write_text("\n".join(parents) + "\n", encoding="utf-8")
    return python, purelib


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    _copy_sources(src)
    (src / "recipes" / f"{PROBE}.py").write_text(PROBE_SOURCE, encoding="utf-8")
    probe_cfg = src / "configs" / f"{PROBE_CONFIG}.yaml"
    probe_cfg.parent.mkdir(parents=True, exist_ok=True)
    probe_cfg.write_text(f"# recipe: {PROBE}\nvalue: 1\n", encoding="utf-8")

    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")
    }
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PYTHONDONTWRITEBYTECODE="1")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    _run([*build, "-w", str(root / "dist"), str(src)], cwd=root, env=env)
    (wheel,) = (root / "dist").glob("longlora_tune-*.whl")

    venv = root / "venv"
    python, purelib = _make_venv(venv, env, parent_site_packages=True)
    pip_install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    _run([*pip_install, str(wheel)], root, env)
    # What pip writes for torchtune's console script, pointed at this venv's interpreter.
    tune = venv / "bin" / "tune"
    tune.write_text(f"#!{python}\nimport sys\nfrom torchtune._cli.tune import main\nsys.exit(main())\n")
    tune.chmod(0o755)

    work = root / "elsewhere"
    work.mkdir()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return SimpleNamespace(
        root=root, src=src, wheel=wheel, venv=venv, python=python, purelib=purelib, work=work, env=env,
        package=purelib / "longlora_tune",
    )  # fmt: skip


def _tune(
    inst: SimpleNamespace, *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return _run(["tune", *args], cwd=cwd or inst.work, env=inst.env, timeout=timeout)


def _real_recipes(package: Path) -> list[str]:
    names = (p.stem for p in (package / "recipes").glob("*.py") if not p.name.startswith("_"))
    return sorted(n for n in names if n != PROBE)


def test_wheel_contents_and_installed_copy(installed: SimpleNamespace) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    hook = {"longlora_tune_hook.pth", "_longlora_tune_hook.py", "longlora_tune/config/tune_registry.py"}
    assert hook <= names
    assert not any(n.split("/")[0] in ("recipes", "configs", "tests") for n in names)
    # What the wheel holds, folder by folder: the library, its recipes and configs, nothing of the
    # benchmarks or the GPU-machine harness (they stay in the repository).
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"longlora_tune", "longlora_tune_hook.pth", "_longlora_tune_hook.py"}
    folders = {n.split("/")[1] for n in names if n.startswith("longlora_tune/") and n.count("/") >= 2}
    library = {"modules", "models", "hf", "data", "training", "config", "quickstart", "plan", "eval"}
    assert folders == library | {"recipes", "configs"}
    assert not any("bench" in n or "gpu_" in n or n.endswith(".sh") for n in names), sorted(names)
    packaged = [p.relative_to(installed.src).as_posix() for p in (installed.src / "longlora_tune").rglob("*")]
    packaged = [p for p in packaged if p.endswith((".py", ".yaml"))]
    # The top-level recipes/ and configs/ travel inside the package.
    for folder in ("recipes", "configs"):
        files = (installed.src / folder).rglob("*")
        packaged += [f"longlora_tune/{p.relative_to(installed.src).as_posix()}" for p in files if p.is_file()]
    assert set(packaged) <= names, sorted(set(packaged) - names)

    code = (
        "import sys, importlib.util, longlora_tune, _longlora_tune_hook\n"
        "print(longlora_tune.__file__); print(_longlora_tune_hook.__file__)\n"
        "for name in ('recipes', 'configs'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(spec and spec.origin)\n"
    )
    out = _run([str(installed.python), "-c", code], installed.work, installed.env).stdout.split("\n")
    assert Path(out[0]) == installed.package / "__init__.py"
    assert Path(out[1]) == installed.purelib / "_longlora_tune_hook.py"
    # torchtune's wheel ships a top-level `recipes`; none of ours may be (or shadow) one.
    for origin in out[2:4]:
        assert origin == "None" or not Path(origin).is_relative_to(installed.venv), origin


def test_startup_is_torch_free_and_hook_installed(installed: SimpleNamespace) -> None:
    code = (
        "import sys\n"
        "hooked = any(getattr(f, '_longlora_tune_registry_hook', False) for f in sys.meta_path)\n"
        "print(hooked, 'torch' in sys.modules, 'torchtune' in sys.modules, 'longlora_tune' in sys.modules)\n"
    )
    out = _run([str(installed.python), "-c", code], installed.work, installed.env)
    assert out.stdout.split() == ["True", "False", "False", "False"]
    assert out.stderr == ""


def test_hook_is_inert_without_torchtune(installed: SimpleNamespace) -> None:
    bare_python, purelib = _make_venv(installed.root / "bare", installed.env, parent_site_packages=False)
    zipfile.ZipFile(installed.wheel).extractall(purelib)  # the wheel alone, no torch/torchtune beside it
    code = (
        "import importlib.util, sys\n"
        "hooked = any(getattr(f, '_longlora_tune_registry_hook', False) for f in sys.meta_path)\n"
        "print(hooked, importlib.util.find_spec('torchtune') is None)\n"
        "import torchtune\n"
    )
    out = subprocess.run([str(bare_python), "-c", code], cwd=installed.work, env=installed.env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.stdout.split() == ["True", "True"]
    assert out.stderr.strip().splitlines()[-1] == "ModuleNotFoundError: No module named 'torchtune'"
    assert "longlora_tune" not in out.stderr


def test_tune_ls_lists_plugin_recipes_and_configs(installed: SimpleNamespace) -> None:
    rows = [line.split() for line in _tune(installed, "ls").stdout.splitlines()[1:]]
    recipes = {row[0] for row in rows if len(row) == 2}
    listed_configs = {row[-1] for row in rows}
    assert {"lora_finetune_distributed", "llama2/7B_lora"} <= recipes | listed_configs  # torchtune's own
    assert [PROBE, PROBE_CONFIG] in rows
    assert set(_real_recipes(installed.package)) <= recipes
    configs_dir = installed.package / "configs"
    packaged = {p.relative_to(configs_dir).with_suffix("").as_posix() for p in configs_dir.rglob("*.yaml")}
    assert packaged <= listed_configs, sorted(packaged - listed_configs)


def test_tune_cp_copies_the_installed_recipe(installed: SimpleNamespace) -> None:
    name = "longlora_distributed"
    if not (installed.package / "recipes" / f"{name}.py").is_file():
        name = PROBE  # the training recipe is not written yet
    dest = installed.work / f"cp_{name}"
    dest.mkdir()
    _tune(installed, "cp", name, ".", cwd=dest)  # the README's form: `tune cp longlora_distributed .`
    assert (dest / f"{name}.py").read_bytes() == (installed.package / "recipes" / f"{name}.py").read_bytes()


def test_tune_run_resolves_names_to_installed_files(installed: SimpleNamespace) -> None:
    recipe = installed.package / "recipes" / f"{PROBE}.py"
    config = installed.package / "configs" / f"{PROBE_CONFIG}.yaml"

    single = _tune(installed, "run", PROBE, "--config", PROBE_CONFIG, "value=2").stdout
    assert f"PROBE {recipe} - --config {config} value=2" in single.splitlines()

    dist = _tune(
        installed, "run", "--nproc_per_node", "2", PROBE, "--config", PROBE_CONFIG, timeout=180
    ).stdout
    assert {line for line in dist.splitlines() if line.startswith("PROBE")} == {
        f"PROBE {recipe} 0 --config {config}",
        f"PROBE {recipe} 1 --config {config}",
    }


def test_tune_run_path_forms_still_work(installed: SimpleNamespace) -> None:
    config = installed.package / "configs" / f"{PROBE_CONFIG}.yaml"
    local_config = installed.work / "mine.yaml"
    shutil.copy(config, local_config)
    # A dotted-path recipe runs as a module of the installed package; a config path is passed through.
    out = _tune(installed, "run", f"longlora_tune/recipes/{PROBE}.py", "--config", "mine.yaml").stdout
    assert f"PROBE {installed.package / 'recipes' / f'{PROBE}.py'} - --config mine.yaml" in out.splitlines()


def test_editable_install_registers_from_the_source_tree(installed: SimpleNamespace) -> None:
    # The README installs with `pip install -e .`: the .pth must reach site-packages there too.
    python, purelib = _make_venv(installed.root / "editable", installed.env, parent_site_packages=True)
    pip_install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    _run([*pip_install, "--no-build-isolation", "-e", str(installed.src)], installed.root, installed.env)
    assert (purelib / "longlora_tune_hook.pth").read_text() == "import _longlora_tune_hook\n"
    code = (
        "import sys\n"
        "print('torch' in sys.modules)\n"
        "from torchtune._recipe_registry import get_all_recipes\n"
        f"(probe,) = [r for r in get_all_recipes() if r.name == {PROBE!r}]\n"
        "print(probe.file_path); print(probe.configs[0].file_path)\n"
    )
    out = _run([str(python), "-c", code], installed.work, installed.env).stdout.split()
    assert out == [
        "False",
        str(installed.src / "recipes" / f"{PROBE}.py"),
        str(installed.src / "configs" / f"{PROBE_CONFIG}.yaml"),
    ]


def test_training_recipe_by_name_fails_cleanly_without_weights(installed: SimpleNamespace) -> None:
    if not (installed.package / "recipes" / "longlora_distributed.py").is_file():
        pytest.skip("training recipe not written yet")
    missing = installed.root / "no_weights_here"
    out = subprocess.run(
        ["tune", "run", "longlora_distributed", "--config", "llama2_7b_100k",
         f"checkpoint_dir={missing}", f"output_dir={installed.root / 'out'}"],
        cwd=installed.work, env=installed.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("longlora_tune: error:")]
    assert len(errors) == 1, out.stderr
    assert str(missing / "config.json") in errors[0] and "tune download" in errors[0]


def test_copied_recipe_trains_from_an_unrelated_folder(installed: SimpleNamespace) -> None:
    # The torchtune workflow: copy the recipe and a config, edit them, run the copy by path.
    from longlora_tune.quickstart import tiny

    work = installed.root / "my_project"
    work.mkdir()
    _tune(installed, "cp", "longlora_distributed", ".", cwd=work)
    _tune(installed, "cp", "tiny_demo", "my_config.yaml", cwd=work)
    base = tiny.make_hf_checkpoint(installed.root / "copied_base")
    corpus = tiny.make_text_corpus(installed.root / "copied_corpus.jsonl", n_docs=24)
    out = _tune(
        installed, "run", "longlora_distributed.py", "--config", "my_config.yaml",
        f"checkpoint_dir={base}", f"dataset.data_files={corpus}", f"output_dir={work / 'out'}",
        "max_steps=2", "global_batch_size=2", "export_formats=[adapter]", cwd=work, timeout=300,
    )  # fmt: skip
    assert (work / "out" / "adapter" / "trainable.safetensors").is_file(), out.stderr[-3000:]
    assert "Step 2 | loss:" in next((work / "out" / "logs").glob("*.txt")).read_text()

"""patholite as a package: what the wheel ships, what it depends on, how it reads its configs, the modes of
what it writes, and ``debug=fast`` with every model option."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools
import torch
from hydra.core.global_hydra import GlobalHydra
from setuptools.config.pyprojecttoml import read_configuration

from patholite.artifacts.torch_float import save_float_artifact
from patholite.config import options
from patholite.errors import ConfigError
from patholite.io import current_umask, write_json
from patholite.pipelines.preflight import check_run
from patholite.records import RunRecord
from patholite.train import main as train_main
from patholite.train import run_job
from tests.conftest import REPO, job_config

# read by setuptools itself, as the build reads it (tomllib is Python 3.11+)
PYPROJECT = read_configuration(REPO / "pyproject.toml", expand=False)
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
MODEL_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
# imported under another name than the distribution's, and not installed here (optional extras)
MODULE_DISTRIBUTIONS = {"pynvml": "nvidia-ml-py", "torch_npu": "torch-npu"}
# needed by an import without being imported: OpenSlide's library, tifffile's JPEG codec, and what
# onnxruntime.quantization's MatMulNBitsQuantizer (ptq mixed_int4) imports without declaring it
UNIMPORTED_DEPENDENCIES = {"openslide-bin", "imagecodecs", "onnx-ir"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _copy_sources(root: Path) -> Path:
    """What a source distribution holds: enough to build the wheel, away from the checkout's build/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    return root


def build_wheel(out: Path) -> Path:
    """The wheel of this checkout, built offline with this environment's setuptools."""
    source = _copy_sources(out / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
         "."],
        cwd=source, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("patholite-*.whl")
    return wheel


# ---------------------------------------------------------------------------------------------- packaging


def test_every_package_under_src_and_every_config_folder_are_listed():
    conf = [
        "patholite.conf",
        *(f"patholite.conf.{p}" for p in setuptools.find_namespace_packages(REPO / "conf")),
    ]
    assert sorted(SETUPTOOLS["packages"]) == sorted([*setuptools.find_packages(REPO / "src"), *conf])
    assert SETUPTOOLS["package-dir"] == {"": "src", "patholite.conf": "conf"}


def test_the_wheel_ships_every_config_and_the_typed_marker(tmp_path):
    wheel = zipfile.ZipFile(build_wheel(tmp_path))
    names = set(wheel.namelist())
    configs = {
        f"patholite/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")
    }
    assert configs and configs <= names, sorted(configs - names)
    assert {"patholite/py.typed", "patholite/conf/__init__.py", "patholite/train.py"} <= names
    sources = {f"patholite/{p.relative_to(REPO / 'src' / 'patholite').as_posix()}" for p in
               (REPO / "src" / "patholite").rglob("*.py")}  # fmt: skip
    assert sources <= names, sorted(sources - names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = wheel.read(entry_points).decode()
    for entry in ("train", "bench", "slide", "compare"):
        assert f"patholite-{entry} = patholite.{entry}:main" in scripts


def test_a_checkout_composes_from_its_own_conf():
    assert options.CONF_DIR == REPO / "conf"
    assert (options.CONF_DIR / "train.yaml").is_file()


def test_dependencies_are_what_src_imports():
    """Every third-party package src/ imports is declared (default or an extra); every default is used."""
    project = PYPROJECT["project"]
    declared = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    installed = importlib.metadata.packages_distributions()
    imported: dict[str, str] = {}
    for path in (REPO / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "patholite":
                    continue
                dist = MODULE_DISTRIBUTIONS.get(top) or (installed.get(top) or [top])[0]
                imported[_name(dist)] = str(path.relative_to(REPO))
    missing = {d: where for d, where in imported.items() if d not in declared | extras}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    unused = declared - set(imported) - UNIMPORTED_DEPENDENCIES
    assert not unused, f"declared but never imported by src/: {sorted(unused)}"
    assert "onnxscript" not in declared  # torch.onnx.export(dynamo=False) never needs it


def test_build_requirements_know_the_spdx_license_string():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    (setuptools_req,) = [r for r in PYPROJECT["build-system"]["requires"] if _name(r) == "setuptools"]
    assert int(re.search(r">=(\d+)", setuptools_req).group(1)) >= 77  # PEP 639 license strings


# ------------------------------------------------------------------------------------- bad config input


@pytest.fixture
def capsys(capsys, monkeypatch):
    """pytest's capsys, with sys.argv restored after the entry point rewrote it."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    return capsys


def _train_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        train_main(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def _option(folder: Path, group: str, text: str) -> Path:
    path = folder / group / "mine.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


SCHEMA_LINE = (
    "defaults:\n  - /schema/model/timm@_here_\n  - _self_\nname: mine\ntimm_name: vit_tiny_patch16_224\n"
)


def test_a_missing_config_dir_is_one_error_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flags in (
        ["--config-dir", str(tmp_path / "nope")],
        [f"--config-dir={tmp_path / 'nope'}"],
        ["-cd", "nope"],
    ):
        err = _train_error(capsys, *flags, "debug=fast")
        assert err.count("\n") == 1 and "no such folder" in err and "nope" in err, err
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("entry", ["bench", "slide"])
def test_every_hydra_entry_point_checks_its_config_dir(entry, tmp_path, capsys, monkeypatch):
    main = importlib.import_module(f"patholite.{entry}").main
    monkeypatch.setattr(sys, "argv", [f"patholite-{entry}", "--config-dir", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "key", "says"),
    [
        (SCHEMA_LINE + "kwarg:\n  embed_dim: 32\n", "model.kwarg", "Key 'kwarg' not in 'ModelConfig'"),
        (SCHEMA_LINE + "pretrained: maybe\n", "model.pretrained", "not a valid bool"),
        (SCHEMA_LINE + "smt:\n  grid: x\n", "model.smt.grid", "could not be converted to Integer"),
        (SCHEMA_LINE + "smt:\n  topk: 2\n", "model.smt.topk", "'top_k'"),  # the keys it could have meant
        ("name: mine\ntimm_name: vit_tiny_patch16_224\nnum_clases: 3\n", "model.num_clases", "num_classes"),
    ],
)
def test_a_schema_error_in_a_users_option_names_the_file_and_the_key(tmp_path, capsys, text, key, says):
    path = _option(tmp_path / "mine", "model", text)
    err = _train_error(capsys, "--config-dir", str(tmp_path / "mine"), "model=mine")
    assert err.count("\n") == 1, err
    assert f"{path}: {key}: " in err and says in err, err


def test_a_users_valid_options_pass_and_others_are_left_to_hydra(tmp_path):
    folder = tmp_path / "mine"
    _option(folder, "model", SCHEMA_LINE + "kwargs:\n  embed_dim: 32\n  depth: 1\n  num_heads: 2\n")
    _option(folder, "experiment", "# @package _global_\nmodel:\n  name: x\nseed: 3\n")
    _option(folder, "notagroup", "anything: 1\n")
    options.check_config_dir(["--config-dir", str(folder), "model=mine"])
    options.check_config_dir(["model=vit_micro"])  # no flag, nothing to check


# -------------------------------------------------------------------------------------------------- modes


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_follow_the_umask(tmp_path, umask):
    assert current_umask() == umask
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    record = RunRecord(run_dir=str(tmp_path / "run"), config={})
    record.write()
    write_json(tmp_path / "out" / "x.json", {"a": 1})
    files = save_float_artifact(torch.nn.Linear(2, 2), tmp_path / "art", {"model": {"name": "linear"}})
    written = [record.path, tmp_path / "out" / "x.json", *(tmp_path / "art" / f for f in files)]
    assert {p: oct(_mode(p)) for p in written} == {p: oct(file_mode) for p in written}
    assert {oct(_mode(p.parent)) for p in written} == {oct(dir_mode)}
    record.finish("ok")  # replacing keeps the mode too
    assert _mode(record.path) == file_mode
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------ debug=fast, every model


def _fast(model: str) -> list[str]:
    spec = (REPO / "conf" / "model" / f"{model}.yaml").read_text()
    slides = re.search(r"^family: smt$", spec, re.M) is not None
    return ["debug=fast", f"model={model}", "logger=csv", *(["dataset=smt_synthetic"] if slides else [])]


@pytest.mark.parametrize("model", MODEL_OPTIONS)
def test_debug_fast_composes_and_passes_the_checks_with_every_model(model, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # not the user's real one
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = job_config(_fast(model), tmp_path / "run", cache_dir)
    try:
        if cfg.model.get("hub"):  # a foundation model's weights: offline and absent, named before any work
            with pytest.raises(
                ConfigError, match=f"{cfg.model.hub.removeprefix('hf-hub:')} is not in the Hugging"
            ):
                check_run(cfg)
        else:
            check_run(
                cfg
            )  # every check short of reading data, SMT's start epochs against max_epochs included
    finally:
        GlobalHydra.instance().clear()
    assert cfg.trainer.max_epochs == 1
    if cfg.model.family == "smt":
        assert max(cfg.model.smt.start_epochs) < cfg.trainer.max_epochs
        assert cfg.dataset.width <= 2048 and sum(cfg.dataset.slides_per_split) <= 6


def test_debug_fast_leaves_runs_without_it_alone(tmp_path, cache_dir):
    cfg = job_config(["model=smt", "dataset=smt_synthetic"], tmp_path / "run", cache_dir)
    GlobalHydra.instance().clear()
    assert list(cfg.model.smt.start_epochs) == [0, 2, 5] and cfg.dataset.width == 4096


def test_an_slide_model_on_tile_data_still_says_which_data_it_needs(tmp_path, cache_dir):
    cfg = job_config(["debug=fast", "model=smt", "logger=csv"], tmp_path / "run", cache_dir)
    try:
        with pytest.raises(Exception, match="smt_synthetic"):
            check_run(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["debug=fast", "model=vit_nano", "logger=csv"],
        ["debug=fast", "model=smt_micro", "dataset=smt_synthetic", "logger=csv"],
        ["debug=fast", "model=smt", "dataset=synthetic_slides", "logger=csv"],  # issue 15's failing command
    ],
    ids=["vit_nano", "smt_micro", "smt-synthetic_slides"],
)
def test_debug_fast_runs_the_small_models(overrides, tmp_path, cache_dir):
    cfg = job_config(overrides, tmp_path / "run", cache_dir)
    try:
        assert run_job(cfg) == "ok"
    finally:
        GlobalHydra.instance().clear()
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "ok" and record["artifacts"][0]["name"].endswith("fp32")


# --------------------------------------------------------------------------------- installed, as users do


def _venv_reusing_this_environment(root: Path) -> Path:
    """A fresh venv whose dependencies are this environment's, patholite itself excluded.

    Offline and in seconds: no index is reachable and the dependencies are gigabytes. The venv's
    site-packages gets a .pth naming a folder of links to this environment's installed packages, minus any
    patholite (the checkout's own editable install) and minus .pth files (a linked folder's .pth files are
    not run, so none of them would leak the checkout onto sys.path anyway). onnxscript and pandas are left
    out too, so the run proves the package does not need them.
    """
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()))
    deps = root / "deps"
    deps.mkdir(parents=True)
    for entry in site.iterdir():
        if (
            entry.name.startswith(("patholite", "__editable__", "onnxscript", "pandas"))
            or entry.suffix == ".pth"
        ):
            continue
        (deps / entry.name).symlink_to(entry)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (venv_site,) = venv.glob("lib/python*/site-packages")
    (venv_site / "_patholite_deps.pth").write_text(f"{deps}\n")
    return venv


def _pip_into(venv: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
         "--no-index", "--no-build-isolation", "-q", *args],
        check=True, capture_output=True, text=True, timeout=300, env=_clean_env(venv),
    )  # fmt: skip


def _clean_env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PATHOLITE_ROOT", "VIRTUAL_ENV")}
    return {**env, "WANDB_MODE": "offline", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "HOME": str(cwd)}


@pytest.mark.slow
def test_an_installed_wheel_trains_from_an_empty_directory(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    venv = _venv_reusing_this_environment(tmp_path / "env")
    _pip_into(venv, str(wheel))
    for entry in ("train", "bench", "slide", "compare"):
        assert (venv / "bin" / f"patholite-{entry}").is_file()
    work = tmp_path / "empty"
    work.mkdir()
    env = _clean_env(work)
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import patholite.config.options as o; print(o.CONF_DIR)"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv), (
        where.stdout
    )  # the package's conf, not the checkout's
    done = subprocess.run(
        [str(venv / "bin" / "patholite-train"), "debug=fast", "model=vit_micro", "logger=csv",
         "compression.export.onnx=true"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = work.glob("outputs/runs/*/*/metrics.json")
    result = json.loads(record.read_text())
    assert result["status"] == "ok" and [a["name"] for a in result["artifacts"]] == ["fp32", "onnx_fp32"]
    for entry in ("bench", "slide", "compare"):  # every entry point starts and finds its configs
        helped = subprocess.run(
            [str(venv / "bin" / f"patholite-{entry}"), "--help"],
            cwd=work, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert helped.returncode == 0, helped.stderr[-2000:]


@pytest.mark.slow
def test_an_editable_install_reads_the_checkout(tmp_path):
    source = _copy_sources(tmp_path / "checkout")
    venv = _venv_reusing_this_environment(tmp_path / "env")
    _pip_into(venv, "-e", str(source))
    work = tmp_path / "empty"
    work.mkdir()
    shown = subprocess.run(
        [str(venv / "bin" / "patholite-train"), "--cfg", "job", "debug=fast", "model=smt",
         "dataset=smt_synthetic"],
        cwd=work, env=_clean_env(work), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "start_epochs:\n    - 0\n    - 0\n    - 0" in shown.stdout

"""Weights from the Hugging Face hub (models/hub.py), with no network: every test builds a hub cache in a temp
folder (``models--<org>--<repo>/snapshots/<commit>/`` with timm's own ``save_for_hf`` export, ``refs/main``)
and points HF_HUB_CACHE at it; the gated-repo test answers as the hub does from a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from patholite.artifacts.load import load_artifact
from patholite.artifacts.torch_float import save_float_artifact
from patholite.errors import CheckpointError, ConfigError
from patholite.models.factory import build_model, classifier_keys
from patholite.models.hub import hub_source, resolve_layers, sidecar_model
from patholite.pipelines.cache import cache_inputs
from patholite.pipelines.context import RunContext
from patholite.pipelines.preflight import preflight
from patholite.train import run_job

REPO = "test-org/tiny-path-vit"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# vit_micro's geometry (conf/model/vit_micro.yaml), so the option's kwargs agree with the repo's
ARGS = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "img_size": 32}
MEAN, STD = [0.7, 0.6, 0.7], [0.21, 0.23, 0.18]


def hub_repo(
    cache: Path,
    repo: str = REPO,
    architecture: str = "vit_tiny_patch16_224",
    args: dict | None = None,
    files: tuple[str, ...] = ("config.json", "model.safetensors"),
    num_classes: int = 10,
    layers: dict | None = None,
    mean: list[float] = MEAN,
    std: list[float] = STD,
) -> Path:
    """A timm-format repo in the hub cache layout, from random weights; returns its snapshot folder.
    ``layers``: layer kwargs, written into config.json by name (as Virchow2's and H0-mini's are)."""
    classes = {k: resolve_layers({k: v})[k] for k, v in (layers or {}).items()}
    net = timm.create_model(architecture, num_classes=num_classes, **(args or {}), **classes)
    export = cache.parent / f"export-{repo.replace('/', '--')}"
    pickled = "pytorch_model.bin" in files
    model_args = {**(args or {}), **(layers or {})} or None
    safe = "both" if pickled else True
    timm.models.save_for_hf(net, str(export), model_args=model_args, safe_serialization=safe)
    config = json.loads((export / "config.json").read_text())
    config["pretrained_cfg"].update(mean=mean, std=std, license="cc-by-nc-nd-4.0")
    (export / "config.json").write_text(json.dumps(config))
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copy(export / name, snapshot / name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_weights_load_exactly_head_replaced_normalisation_wins(hub_cache, make_cfg):
    snapshot = hub_repo(hub_cache, args=ARGS)
    cfg = make_cfg(f"model.hub=hf-hub:{REPO}")
    checked = preflight(cfg)
    # the repo's normalisation replaced the dataset's, so the transforms normalise as the weights expect
    assert list(cfg.dataset.mean) == MEAN and list(cfg.dataset.std) == STD
    normalize = checked.datamodule.datasets["train"].transform.transforms[-1]
    assert list(normalize.mean) == MEAN and list(normalize.std) == STD
    net = build_model(cfg.model, checked.datamodule.num_classes, 32)
    saved = load_file(str(snapshot / "model.safetensors"))
    own = net.state_dict()
    head = set(classifier_keys(net))
    assert head == {"head.weight", "head.bias"}
    assert own["head.weight"].shape[0] == checked.datamodule.num_classes != saved["head.weight"].shape[0]
    assert set(own) - head == set(saved) - head
    for key in set(own) - head:
        assert torch.equal(own[key], saved[key]), key
    # a plain training from these weights is cached under their hash: another snapshot, another entry
    sha = hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
    assert cache_inputs(cfg, cfg.model)["hub_weights_sha256"] == sha
    plain = cache_inputs(cfg, make_cfg().model)
    assert "hub_weights_sha256" not in plain and "hub" not in plain["model"]  # older entries keep their keys


def test_layer_classes_named_in_the_hub_config_are_resolved(hub_cache, make_cfg):
    """Virchow2 and H0-mini name their MLP and activation (timm.layers.SwiGLUPacked, torch.nn.SiLU) in
    config.json; the network built from it takes the weights exactly."""
    layers = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
    snapshot = hub_repo(hub_cache, args=ARGS, layers=layers)
    config = json.loads((snapshot / "config.json").read_text())
    assert config["model_args"]["mlp_layer"] == layers["mlp_layer"]
    cfg = make_cfg(f"model.hub=hf-hub:{REPO}")
    net = build_model(cfg.model, preflight(cfg).datamodule.num_classes, 32)
    mlp = net.blocks[0].mlp
    assert isinstance(mlp, timm.layers.GluMlp) and isinstance(mlp.act, torch.nn.SiLU)
    saved = load_file(str(snapshot / "model.safetensors"))
    for key, value in net.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, saved[key]), key
    # the sidecar keeps the names (JSON), and its network rebuilds from them
    model, _ = sidecar_model(OmegaConf.to_container(cfg.model))
    assert model["kwargs"]["mlp_layer"] == layers["mlp_layer"] and model["hub"] is None


@pytest.mark.parametrize(
    "compression",
    [
        pytest.param(["compression=none"], id="float"),
        # a model derived from the hub weights (here INT8) carries the same record
        pytest.param(
            ["compression=ptq", "compression.ptq.methods=[dynamic]"], id="int8", marks=pytest.mark.slow
        ),
    ],
)
def test_hub_run_records_provenance_in_every_artifact(hub_cache, make_cfg, tmp_path, compression):
    snapshot = hub_repo(hub_cache, args=ARGS)
    weights = snapshot / "model.safetensors"
    cfg = make_cfg(f"model.hub=hf-hub:{REPO}", "model.mpp=0.5", *compression)
    assert run_job(cfg) == "ok"
    sidecars = sorted((tmp_path / "run").glob("artifacts/*/artifact.json"))
    assert len(sidecars) == (1 if compression == ["compression=none"] else 2), sidecars
    expected = {
        "hub": f"hf-hub:{REPO}",
        "revision": COMMIT,
        "file": "model.safetensors",
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "license": "cc-by-nc-nd-4.0",
        "mpp": 0.5,
        "how": "hub",
    }
    for path in sidecars:
        meta = json.loads(path.read_text())
        assert meta["weights_source"] == expected, path
        assert meta["mean"] == MEAN and meta["std"] == STD
        assert meta["model"]["hub"] is None and meta["model"]["timm_name"] == "vit_tiny_patch16_224"
    # an artifact rebuilds from its sidecar alone: the hub cache is not needed any more
    shutil.rmtree(hub_cache)
    for path in sidecars:
        net, meta = load_artifact(path.parent)
        assert net(torch.zeros(1, 3, 32, 32)).shape[-1] == len(meta["class_names"])


def test_missing_repo_fails_in_preflight_naming_cache_and_command(hub_cache, make_cfg):
    cfg = make_cfg("model.hub=hf-hub:nobody/absent-model")
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    message = str(err.value)
    for part in ("model.hub=hf-hub:nobody/absent-model", str(hub_cache), "hf download nobody/absent-model"):
        assert part in message
    assert "model.download=true" in message and "HF_HUB_OFFLINE" not in message
    # a revision that is not cached is named; the cached commit, pinned, loads
    hub_repo(hub_cache, args=ARGS)
    with pytest.raises(ConfigError, match=f"{REPO} at revision v2 is not in the Hugging Face cache"):
        preflight(make_cfg(f"model.hub=hf-hub:{REPO}", "model.revision=v2"))
    preflight(make_cfg(f"model.hub=hf-hub:{REPO}", f"model.revision={COMMIT}"))
    # asked to download while HF_HUB_OFFLINE=1: still nothing fetched, and the message says why
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        preflight(make_cfg("model.hub=hf-hub:nobody/absent-model", "model.download=true"))


def test_pickle_only_repo_is_refused(hub_cache, make_cfg):
    hub_repo(hub_cache, args=ARGS, files=("config.json", "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="only pytorch_model.bin .*safetensors"):
        preflight(make_cfg(f"model.hub=hf-hub:{REPO}"))


def test_shape_mismatch_names_the_tensor_before_work(hub_cache, make_cfg):
    hub_repo(hub_cache, args=ARGS)
    cfg = make_cfg(f"model.hub=hf-hub:{REPO}", "+model.kwargs.mlp_ratio=2")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight: \(256, 64\) vs \(128, 64\)"):
        preflight(cfg)


def test_model_normalisation_conflicting_with_the_hub_config_is_refused(hub_cache, make_cfg):
    hub_repo(hub_cache, args=ARGS)
    cfg = make_cfg(f"model.hub=hf-hub:{REPO}", "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]")
    with pytest.raises(ConfigError, match="contradict .*model.mean=null"):
        preflight(cfg)


def test_pretrained_refused_for_custom_sizes_and_bad_combinations(make_cfg):
    with pytest.raises(ConfigError, match="model=vit_micro is a custom size of vit_tiny_patch16_224"):
        preflight(make_cfg("model.pretrained=true"))
    with pytest.raises(ConfigError, match="both name weights"):
        preflight(make_cfg("model.pretrained=true", "model.checkpoint=/nowhere.safetensors"))
    with pytest.raises(ConfigError, match="hf-hub:<org>/<repo>"):
        preflight(make_cfg("model.hub=MahmoodLab/uni"))
    with pytest.raises(ConfigError, match="asks for none"):
        preflight(make_cfg("model.download=true"))


def test_pretrained_resolves_timms_tag_from_the_local_cache(hub_cache, make_cfg):
    """``model.pretrained=true`` reads timm's own repo (its pretrained cfg's hf_hub_id) from the cache: a
    locally built one here, with random weights of timm's tiny ``test_vit`` (its tag normalises with 0.5)."""
    deit = hub_source({"name": "deit_tiny", "timm_name": "deit_tiny_patch16_224", "pretrained": True})
    assert deit.repo_id == "timm/deit_tiny_patch16_224.fb_in1k"
    source = hub_source({"name": "t", "timm_name": "test_vit", "pretrained": True})
    assert source.repo_id == "timm/test_vit.r160_in1k"
    snapshot = hub_repo(hub_cache, repo=source.repo_id, architecture="test_vit")
    cfg = make_cfg("model=deit_tiny", "model.timm_name=test_vit", "model.pretrained=true")
    checked = preflight(cfg)
    assert list(cfg.dataset.mean) == [0.5] * 3 and list(cfg.dataset.std) == [0.5] * 3  # timm's tag's
    net = build_model(cfg.model, checked.datamodule.num_classes, 32)
    saved = load_file(str(snapshot / "model.safetensors"))
    for key, value in net.state_dict().items():
        if key not in ("head.weight", "head.bias", "pos_embed"):  # pos_embed: resampled to 32 px
            assert torch.equal(value, saved[key]), key
    assert net.state_dict()["pos_embed"].shape != saved["pos_embed"].shape
    _, provenance = sidecar_model(OmegaConf.to_container(cfg.model))
    assert provenance["hub"] == f"hf-hub:{source.repo_id}" and provenance["how"] == "pretrained"
    assert provenance["revision"] == COMMIT and provenance["license"] == "apache-2.0"  # timm's cfg says so


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers as the hub does: ``error_code`` (GatedRepo: a gated repo to a client without access;
    EntryNotFound: a file the repo does not have) with its status."""

    status, error_code = 401, "GatedRepo"

    def _answer(self) -> None:
        self.send_response(self.status)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("X-Error-Message", "from a test")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


class _MissingFileHub(_FakeHub):
    status, error_code = 404, "EntryNotFound"


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed, to ``online(handler)``'s local server (None: a port nobody listens on)."""
    servers = []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def start(handler: type | None) -> None:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler or _FakeHub)
        port = server.server_port
        if handler is None:
            server.server_close()
        else:
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_gated_repo_without_token_says_accept_the_licence_and_log_in(hub_cache, make_cfg, online):
    online(_FakeHub)
    with pytest.raises(ConfigError) as err:
        preflight(make_cfg("model.hub=hf-hub:gated-org/gated-model", "model.download=true"))
    message = str(err.value)
    assert "gated" in message and "https://huggingface.co/gated-org/gated-model" in message
    assert "hf auth login" in message and "HF_TOKEN" in message


def test_download_of_a_repo_without_safetensors_is_refused(hub_cache, make_cfg, online):
    hub_repo(hub_cache, args=ARGS, files=("config.json",))  # its weights are not on the hub as safetensors
    online(_MissingFileHub)
    with pytest.raises(CheckpointError, match="has no model.safetensors; patholite loads safetensors only"):
        preflight(make_cfg(f"model.hub=hf-hub:{REPO}", "model.download=true"))


@pytest.mark.slow  # huggingface_hub retries a refused connection 5 times with backoff (about 23 s)
def test_download_with_the_hub_unreachable_says_how_to_fetch_it(hub_cache, make_cfg, online):
    online(None)  # nothing listens: the hub cannot be reached
    with pytest.raises(ConfigError, match="cannot reach the hub to fetch config.json.*hf download"):
        preflight(make_cfg("model.hub=hf-hub:other-org/model", "model.download=true"))


@pytest.mark.parametrize("option", ["uni", "virchow2", "h_optimus_0", "h0_mini"])
def test_foundation_model_options_compose_and_ask_for_their_repo(option, hub_cache, make_cfg):
    cfg = make_cfg(f"model={option}", "dataset.image_size=224")
    assert cfg.model.hub.startswith("hf-hub:") and cfg.model.license and cfg.model.mpp == 0.5
    repo = cfg.model.hub[len("hf-hub:") :]
    with pytest.raises(ConfigError, match=f"{repo} is not in the Hugging Face cache"):
        preflight(cfg)


def test_a_model_started_from_a_hub_models_artifact_carries_its_record(make_cfg, tmp_path):
    """Fine-tuning (or pruning, quantizing) an artifact of hub weights keeps their record; old sidecars
    without one read as before."""
    record = {
        "hub": f"hf-hub:{REPO}",
        "revision": COMMIT,
        "file": "model.safetensors",
        "sha256": "ab" * 32,
        "license": "apache-2.0",
        "mpp": 0.5,
        "how": "hub",
    }
    cfg = make_cfg()
    checked = preflight(cfg)
    net = build_model(cfg.model, checked.datamodule.num_classes, 32)
    save_float_artifact(net, tmp_path / "hubbed", {"weights_source": record})
    save_float_artifact(net, tmp_path / "old", {})
    for folder, expected in (("hubbed", record), ("old", None)):
        tuned = make_cfg(f"model.checkpoint={tmp_path / folder / 'model.safetensors'}")
        ctx = RunContext(tuned, tmp_path / "run", preflight(tuned).datamodule, checked.accelerator)
        assert ctx.artifact_meta().get("weights_source") == expected


def test_a_hub_teacher_is_checked_in_preflight_and_must_share_the_students_normalisation(hub_cache, make_cfg):
    kd = ["compression=kd", "compression.teacher.model=h_optimus_0"]
    with pytest.raises(ConfigError, match="bioptimus/H-optimus-0 is not in the Hugging Face cache") as err:
        preflight(make_cfg(*kd))
    assert "compression.teacher.download=true" in str(err.value)
    # the teacher's own download key reaches the fetch (which the offline hub then refuses)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        preflight(make_cfg(*kd, "compression.teacher.download=true"))
    h_optimus = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "h_optimus_0.yaml")
    hub_repo(  # H-optimus-0's layout and normalisation, at vit_micro's size
        hub_cache,
        repo="bioptimus/H-optimus-0",
        args={**ARGS, "init_values": 1e-5},
        mean=list(h_optimus.mean),
        std=list(h_optimus.std),
    )
    with pytest.raises(ConfigError, match="expects mean .*0.707223.*set model.mean and model.std"):
        preflight(make_cfg(*kd))
    mean, std = (f"[{','.join(str(v) for v in h_optimus[k])}]" for k in ("mean", "std"))
    checked = preflight(make_cfg(*kd, f"model.mean={mean}", f"model.std={std}"))
    assert checked.teacher is not None


def test_bench_times_a_hub_architecture_with_random_weights_that_load_without_the_cache(hub_cache, tmp_path):
    from tests.test_bench import bench_job

    snapshot = hub_repo(hub_cache, args=ARGS)
    assert bench_job([f"model.hub=hf-hub:{REPO}", "variants=[fp32]"], tmp_path / "b") == "ok"
    directory = tmp_path / "b" / "artifacts" / "fp32"
    sidecar = json.loads((directory / "artifact.json").read_text())
    assert sidecar["random_weights"] and sidecar["model"]["hub"] is None  # the architecture, written out
    hub = load_file(snapshot / "model.safetensors")
    shutil.rmtree(hub_cache)
    net, _ = load_artifact(directory)  # no hub cache needed
    ours = net.state_dict()
    assert {k for k in hub if not k.startswith("head.")} <= set(ours)  # the hub's architecture
    assert not torch.equal(ours["blocks.0.attn.qkv.weight"], hub["blocks.0.attn.qkv.weight"])  # random


def test_a_foundation_model_teaches_without_labels_with_its_own_normalisation_and_licence(
    hub_cache, make_cfg, tmp_path
):
    h_optimus = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "h_optimus_0.yaml")
    snapshot = hub_repo(
        hub_cache,
        repo="bioptimus/H-optimus-0",
        args={**ARGS, "init_values": 1e-5},
        mean=list(h_optimus.mean),
        std=list(h_optimus.std),
    )
    # unlike kd, the student keeps its own normalisation: each network sees the tiles its own way
    cfg = make_cfg("compression=feature_kd", "compression.teacher.model=h_optimus_0")
    assert run_job(cfg) == "ok"
    artifacts = tmp_path / "run" / "artifacts"
    teacher = json.loads((artifacts / "teacher_fp32" / "artifact.json").read_text())
    student = json.loads((artifacts / "student_fp32" / "artifact.json").read_text())
    assert teacher["mean"] == list(h_optimus.mean) and student["mean"] != teacher["mean"]
    assert teacher["encoder"] == {"embed_dim": 64} and teacher["weights_source"]["revision"] == COMMIT
    # the teacher is the hub's trunk, headless
    hub = load_file(str(snapshot / "model.safetensors"))
    recorded = load_file(str(artifacts / "teacher_fp32" / "model.safetensors"))
    assert not any(k.startswith("head.") for k in recorded)
    torch.testing.assert_close(recorded["blocks.0.attn.qkv.weight"], hub["blocks.0.attn.qkv.weight"])
    # the student carries its teacher's provenance and is bound by its licence
    assert student["distilled_from"][0]["weights_source"] == teacher["weights_source"]
    assert student["licence"] == teacher["weights_source"]["license"]

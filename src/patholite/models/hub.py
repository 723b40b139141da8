"""Weights from the Hugging Face hub: opt-in, safetensors only, offline unless the user asks.

A model option asks for hub weights in one of two ways:

- ``model.pretrained=true``: timm's own pretrained weights of ``model.timm_name`` (its default tag, or the
  tag in the name, e.g. ``deit_tiny_patch16_224.fb_in1k``), from the repo timm names (``hf_hub_id``);
- ``model.hub=hf-hub:<org>/<repo>``: any repo in timm's hub format (``config.json`` with ``architecture``,
  ``model_args`` and ``pretrained_cfg``, and ``model.safetensors``), e.g. a pathology foundation model.

Files are read from the local hub cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``). Nothing is downloaded unless ``model.download=true``, and not even then under
``HF_HUB_OFFLINE=1``; preflight fetches ``config.json`` and ``model.safetensors`` before any work. Pickled
weights (``pytorch_model.bin``) are refused: loading them would run code from the file.

Every artifact of a model whose weights came from the hub records where they came from (``provenance``):
the hub id, the snapshot's commit, the sha256 of the weights file, the licence and the mpp they expect.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import timm
import timm.layers
import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import nn

from patholite.config.checks import HUB_PREFIX, split_hub_name
from patholite.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# What a repo may hold instead of safetensors: pickles, which patholite never loads
PICKLED_FILES = ("pytorch_model.bin", "pytorch_model.pth", "model.pth", "open_clip_pytorch_model.bin")
# timm keyword arguments that take a layer class; a string names one in timm.layers or torch.nn (model
# cards pass classes, which a yaml or a hub config.json can only name)
_LAYER_KWARGS = ("mlp_layer", "act_layer", "norm_layer", "block_fn", "embed_layer")
_LAYER_MODULES = {"timm.layers": timm.layers, "torch.nn": nn}
# Keyword arguments that do not change which tensors the network has or their shapes (beyond the position
# embedding, resampled on load): a model option may set them and still take timm's pretrained weights
_SHAPE_FREE_KWARGS = (
    "img_size",
    "dynamic_img_size",
    "drop_rate",
    "drop_path_rate",
    "attn_drop_rate",
    "proj_drop_rate",
    "pos_drop_rate",
    "global_pool",
    "fused_attn",
)


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def wants_hub(model_cfg: Any) -> bool:
    """Whether the model's weights come from the hub (``model.pretrained`` or ``model.hub``)."""
    cfg = _plain(model_cfg)
    return bool(cfg.get("hub")) or bool(cfg.get("pretrained"))


def hub_cache_dir() -> Path:
    """The hub cache this process reads, from the environment at call time (tests and users set it late)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value: no request leaves the machine, even with model.download."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _is_layer(value: Any) -> bool:
    # a class, or a class with arguments bound (timm.layers.SwiGLUPacked is a functools.partial)
    return isinstance(value, type) or (isinstance(value, partial) and isinstance(value.func, type))


def resolve_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with layer names (``SwiGLUPacked``, ``timm.layers.SwiGLUPacked``, ``torch.nn.SiLU``)
    turned into the classes timm expects; only timm.layers and torch.nn are searched (nothing imported)."""
    out = dict(kwargs)
    for key in _LAYER_KWARGS:
        name = out.get(key)
        if not isinstance(name, str):
            continue
        module_name, _, attr = name.rpartition(".")
        modules = [_LAYER_MODULES[module_name]] if module_name in _LAYER_MODULES else _LAYER_MODULES.values()
        found = next((getattr(m, attr) for m in modules if _is_layer(getattr(m, attr, None))), None)
        if found is None and module_name:
            raise ConfigError(
                f"model.kwargs.{key}={name!r}: name a class of timm.layers or torch.nn "
                "(e.g. SwiGLUPacked, SiLU)"
            )
        if found is not None:  # otherwise a name timm resolves itself (act_layer="silu")
            out[key] = found
    return out


# ------------------------------------------------------------------------------------------- where from
@dataclass(frozen=True)
class HubSource:
    """Where a model option's hub weights come from, resolved from the config alone (no file read)."""

    key: str  # what the user set, for messages: "model.hub=hf-hub:org/repo"
    repo_id: str
    revision: str | None  # asked for; None: main
    filename: str
    timm_cfg: dict[str, Any] = field(default_factory=dict)  # timm's pretrained cfg (model.pretrained)

    @property
    def hub(self) -> str:
        return HUB_PREFIX + self.repo_id

    @property
    def needs_config(self) -> bool:
        """A ``model.hub`` repo's architecture is its config.json's; timm's tags name their architecture."""
        return not self.timm_cfg


def hub_source(model_cfg: Any) -> HubSource | None:
    """The hub repo ``model_cfg`` takes its weights from (None: no hub weights); ConfigError when the
    option cannot have any (no timm pretrained tag, or model.kwargs change timm's architecture)."""
    cfg = _plain(model_cfg)
    if cfg.get("hub"):
        repo, revision = split_hub_name(str(cfg["hub"]))
        return HubSource(f"model.hub={cfg['hub']}", repo, cfg.get("revision") or revision, WEIGHTS_FILE)
    if not cfg.get("pretrained"):
        return None
    name = str(cfg["timm_name"])
    key = f"model.pretrained=true (model={cfg.get('name')}, timm {name})"
    pretrained = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    if pretrained is None or not pretrained.hf_hub_id:
        tags = timm.list_pretrained(name.split(".")[0] + "*")
        raise ConfigError(
            f"{key}: timm has no pretrained weights on the hub for {name}"
            + (f" (its tags: {', '.join(tags[:5])})" if tags else "")
            + "; set model.pretrained=false to train from random weights, or model.hub=hf-hub:<org>/<repo> "
            "for a hub model"
        )
    changed = _changed_tensors(name, cfg.get("kwargs") or {})
    if changed:
        custom = sorted(set(cfg.get("kwargs") or {}) - set(_SHAPE_FREE_KWARGS))
        raise ConfigError(
            f"{key}: model={cfg.get('name')} is a custom size of {name} (model.kwargs {custom}), which timm "
            f"has no pretrained weights for ({changed[0]}); set model.pretrained=false, or pick an "
            "option of a standard size (e.g. model=deit_tiny)"
        )
    repo, _, revision = pretrained.hf_hub_id.partition("@")
    filename = pretrained.hf_hub_filename or WEIGHTS_FILE
    if not filename.endswith(".safetensors"):
        raise ConfigError(
            f"{key}: timm's weights for {name} are {filename} (pickled); patholite loads safetensors only; "
            "set model.pretrained=false"
        )
    return HubSource(key, repo, cfg.get("revision") or revision or None, filename, pretrained.to_dict())


def _changed_tensors(name: str, kwargs: dict[str, Any]) -> list[str]:
    """Tensors whose presence or shape ``kwargs`` change in timm's ``name`` (built on the meta device)."""
    shaped = {k: v for k, v in kwargs.items() if k not in _SHAPE_FREE_KWARGS}
    if not shaped:
        return []
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
        try:
            own = timm.create_model(name, pretrained=False, num_classes=0, **resolve_layers(shaped))
            own = own.state_dict()
        except (TypeError, RuntimeError, AssertionError, ValueError) as err:
            raise ConfigError(f"timm could not build {name} with model.kwargs={kwargs}: {err}") from err
    keys = sorted(set(ref) | set(own))
    return [
        f"{k} is {tuple(own[k].shape) if k in own else 'absent'}, timm's weights have "
        f"{tuple(ref[k].shape) if k in ref else 'none'}"
        for k in keys
        if k != "pos_embed" and (k not in ref or k not in own or ref[k].shape != own[k].shape)
    ]


# --------------------------------------------------------------------------------------- in the cache
@dataclass(frozen=True)
class HubWeights:
    """A hub model's files in the local cache and what its config says."""

    source: HubSource
    revision: str  # the snapshot's commit hash
    weights: Path
    config: dict[str, Any]  # config.json ({} when timm's tag names the architecture)

    @property
    def architecture(self) -> str:
        return str(self.config.get("architecture") or self.source.timm_cfg.get("architecture"))

    @property
    def model_args(self) -> dict[str, Any]:
        """config.json's timm keyword arguments, minus what patholite sets (image size, class count)."""
        args = dict(self.config.get("model_args") or {})
        for key in ("img_size", "num_classes", "pretrained_cfg", "pretrained_cfg_overlay"):
            args.pop(key, None)
        return args

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return dict(self.config.get("pretrained_cfg") or self.source.timm_cfg)

    def normalisation(self) -> tuple[list[float], list[float]] | None:
        cfg = self.pretrained_cfg
        if cfg.get("mean") is None or cfg.get("std") is None:
            return None
        return [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]

    def provenance(self, model_cfg: Any) -> dict[str, Any]:
        """The record every artifact of a model with these weights carries (``model_cfg``: the option,
        whose licence and mpp notes win over the hub config's)."""
        cfg = _plain(model_cfg)
        return {
            "hub": self.source.hub,
            "revision": self.revision,
            "file": self.source.filename,
            "sha256": file_sha256(self.weights),
            "license": cfg.get("license") or self.pretrained_cfg.get("license"),
            "mpp": cfg.get("mpp"),
            "how": "pretrained" if self.source.timm_cfg else "hub",
        }


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The file's sha256, computed once per process for an unchanged file (GB-sized foundation weights)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _cached(source: HubSource, filename: str, cache: Path) -> Path | None:
    found = try_to_load_from_cache(source.repo_id, filename, cache_dir=cache, revision=source.revision)
    return Path(found) if isinstance(found, str) else None


def _fetch_hint(source: HubSource, cache: Path) -> str:
    files = f"{CONFIG_FILE} {source.filename}" if source.needs_config else source.filename
    rev = f" --revision {source.revision}" if source.revision else ""
    return (
        f"fetch it once with `hf download {source.repo_id} {files}{rev} --cache-dir {cache}` (or python -c "
        f"\"from huggingface_hub import hf_hub_download; hf_hub_download('{source.repo_id}', "
        f"'{source.filename}', cache_dir='{cache}')\"), or let this run fetch it: model.download=true "
        f"(compression.teacher.download=true for a teacher){_gated_hint(source)}"
    )


def _gated_hint(source: HubSource) -> str:
    return (
        f"; a gated repo needs its licence accepted on https://huggingface.co/{source.repo_id} and a token "
        "(`hf auth login`, formerly `huggingface-cli login`, or HF_TOKEN)"
    )


def _download(source: HubSource, filename: str, cache: Path) -> Path:
    try:
        return Path(
            hf_hub_download(
                source.repo_id,
                filename,
                revision=source.revision,
                cache_dir=cache,
                endpoint=os.environ.get("HF_ENDPOINT") or None,  # read now: a mirror set after import counts
            )
        )
    except GatedRepoError as err:
        raise ConfigError(
            f"{source.key}: {source.repo_id} is gated and this machine has no access: accept its licence on "
            f"https://huggingface.co/{source.repo_id}, then log in with `hf auth login` (formerly "
            "`huggingface-cli login`) or set HF_TOKEN"
        ) from err
    except RevisionNotFoundError as err:
        raise ConfigError(
            f"{source.key}: {source.repo_id} has no revision {source.revision!r}; fix model.revision"
        ) from err
    except RepositoryNotFoundError as err:
        raise ConfigError(
            f"{source.key}: no repo {source.repo_id} on the hub, or it is private and needs a token "
            "(`hf auth login` or HF_TOKEN); check the name"
        ) from err
    except LocalEntryNotFoundError as err:  # the hub unreachable (it subclasses EntryNotFoundError: first)
        raise ConfigError(
            f"{source.key}: cannot reach the hub to fetch {filename} ({err}); {_fetch_hint(source, cache)}"
        ) from err
    except RemoteEntryNotFoundError as err:
        if filename == source.filename:
            raise CheckpointError(
                f"{source.key}: {source.repo_id} has no {filename}; patholite loads safetensors only (a repo "
                f"with only {PICKLED_FILES[0]} holds pickled weights, which can run code when loaded)"
            ) from err
        raise ConfigError(
            f"{source.key}: {source.repo_id} has no {filename}: it is not a timm model (timm repos have "
            f"{CONFIG_FILE} with an architecture); load its weights with model.checkpoint=<file> instead"
        ) from err
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code == 401:
            raise ConfigError(f"{source.key}: the hub refused access (401){_gated_hint(source)}") from err
        raise ConfigError(f"{source.key}: the hub answered {err}; try again, or fetch it by hand") from err
    except OSError as err:  # any other failure to connect or write the cache
        raise ConfigError(
            f"{source.key}: cannot reach the hub to fetch {filename} ({err}); {_fetch_hint(source, cache)}"
        ) from err


def locate_hub_weights(model_cfg: Any, download: bool | None = None) -> HubWeights | None:
    """The hub files of ``model_cfg`` (None: it wants none), from the cache, fetched first when
    ``download`` (default: ``model.download``) and the hub is not offline. One error per problem, naming
    the model, the cache and the fix."""
    source = hub_source(model_cfg)
    if source is None:
        return None
    cfg = _plain(model_cfg)
    download = bool(cfg.get("download")) if download is None else download
    cache = hub_cache_dir()
    needed = ([CONFIG_FILE] if source.needs_config else []) + [source.filename]
    paths: dict[str, Path] = {}
    for filename in needed:
        path = _cached(source, filename, cache)
        if path is None and download and not hub_offline():
            path = _download(source, filename, cache)
        if path is None:
            pickled = [p for p in PICKLED_FILES if _cached(source, p, cache) is not None]
            if filename == source.filename and pickled:
                raise CheckpointError(
                    f"{source.key}: the cached {source.repo_id} has only {pickled[0]} (pickled weights, "
                    f"which can run code when loaded); patholite loads {source.filename} only: use a repo "
                    "with safetensors weights, or convert them and give model.checkpoint=<file>.safetensors"
                )
            at = f" at revision {source.revision}" if source.revision else ""
            why = " (HF_HUB_OFFLINE is set)" if download and hub_offline() else ""
            raise ConfigError(
                f"{source.key}: {source.repo_id}{at} is not in the Hugging Face cache {cache} (no {filename})"
                f"{why}; {_fetch_hint(source, cache)}"
            )
        paths[filename] = path
    config: dict[str, Any] = {}
    if source.needs_config:
        try:
            config = json.loads(paths[CONFIG_FILE].read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{source.key}: cannot read {paths[CONFIG_FILE]}: {err}") from err
        if not isinstance(config, dict) or not config.get("architecture"):
            raise ConfigError(
                f"{source.key}: {paths[CONFIG_FILE]} names no timm architecture; it is not a timm model "
                "(load its weights with model.checkpoint=<file> on a model option of its architecture)"
            )
        if not timm.is_model(str(config["architecture"])):
            raise ConfigError(
                f"{source.key}: its architecture {config['architecture']!r} is not in this timm "
                f"({timm.__version__}); upgrade timm"
            )
    weights = paths[source.filename]
    return HubWeights(source, weights.parent.name, weights, config)


def network_spec(model_cfg: Any) -> tuple[str, dict[str, Any]]:
    """The timm name and keyword arguments (layer names not yet resolved) of ``model_cfg``'s network: a
    ``model.hub`` repo's architecture and ``model_args`` (from the cached config.json) under the option's own
    ``model.kwargs``; otherwise ``timm_name`` and ``kwargs``."""
    cfg = _plain(model_cfg)
    kwargs = dict(cfg.get("kwargs") or {})
    if not cfg.get("hub"):
        return str(cfg["timm_name"]), kwargs
    weights = locate_hub_weights(cfg, download=False)
    return weights.architecture, {**weights.model_args, **kwargs}


def weights_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as ``meta`` tensors of their shapes: a fit check without reading
    GBs of weights."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # noqa: BLE001 - a corrupt or truncated file is one user problem
        raise CheckpointError(f"cannot read the safetensors header of {path}: {err}") from err


def sidecar_model(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A run's model config as its artifacts store it, and the provenance of its hub weights (None: none).

    An artifact rebuilds its network from the sidecar alone, on any machine, so a hub model's architecture
    is written out (timm name and keyword arguments) and the hub keys cleared: its weights are the
    artifact's own."""
    weights = locate_hub_weights(model, download=False) if wants_hub(model) else None
    if weights is None:
        return model, None
    name, kwargs = network_spec(model)
    plain = {**model, "timm_name": name, "kwargs": kwargs, "hub": None, "revision": None}
    plain.update(pretrained=False, download=False)
    return plain, weights.provenance(model)


def model_normalisation(model_cfg: Any, weights: HubWeights | None) -> tuple[list[float], list[float]] | None:
    """The normalisation the model's weights expect: ``model.mean``/``model.std`` as the option notes them,
    else the hub config's (or timm's pretrained cfg's); None: the model has none of its own. An option whose
    notes contradict its hub config is refused (one of them is wrong)."""
    cfg = _plain(model_cfg)
    theirs = weights.normalisation() if weights is not None else None
    if cfg.get("mean") is None and cfg.get("std") is None:
        return theirs
    if cfg.get("mean") is None or cfg.get("std") is None:
        raise ConfigError("model.mean and model.std go together: set both (3 values each) or neither")
    ours = [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]
    pairs = zip(ours[0] + ours[1], theirs[0] + theirs[1], strict=True) if theirs is not None else ()
    if any(abs(a - b) > 1e-4 for a, b in pairs):
        raise ConfigError(
            f"model={cfg.get('name')}: model.mean/std {ours[0]}/{ours[1]} contradict "
            f"{weights.source.key}'s own {theirs[0]}/{theirs[1]}; set model.mean=null model.std=null to use "
            "the weights' normalisation"
        )
    return ours

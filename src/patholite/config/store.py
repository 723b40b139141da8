"""Every schema in Hydra's ConfigStore, so each group option's YAML can name its own
(``/schema/<group>/<name>@_here_``) and the entry configs compose onto typed, struct-mode nodes."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from patholite.config.compression import CompressionConfig
from patholite.config.schema import (
    TILE_DATASET_SCHEMAS,
    AcceleratorConfig,
    BenchConfig,
    BenchRunConfig,
    CallbacksConfig,
    DatasetConfig,
    LoggerConfig,
    ModelConfig,
    PathsConfig,
    TrainConfig,
    TrainerConfig,
)
from patholite.config.slide_schema import SLIDE_DATASET_SCHEMAS, SlideRunConfig

DATASET_SCHEMAS: dict[str, type[DatasetConfig]] = {**TILE_DATASET_SCHEMAS, **SLIDE_DATASET_SCHEMAS}


def tasks_per_node(num_nodes: Any, devices: Any, gpus_per_node: Any) -> int:
    """SLURM tasks per node for a training job (``hydra/launcher=slurm``): one per device across several
    nodes, where srun starts every rank; one on a single node, whose task spawns its ranks (ddp_spawn)."""
    if int(num_nodes or 1) <= 1:
        return 1
    if isinstance(devices, int) and devices >= 1:
        return devices
    if devices in ("auto", -1, None):
        return int(gpus_per_node or 1)  # every GPU SLURM gives the node
    return len(list(devices))  # a list of ids


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent), and patholite's config resolvers."""
    if not OmegaConf.has_resolver("patholite.tasks_per_node"):
        OmegaConf.register_new_resolver("patholite.tasks_per_node", tasks_per_node)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="bench_schema", node=BenchRunConfig)
    cs.store(name="slide_schema", node=SlideRunConfig)
    for name, schema in DATASET_SCHEMAS.items():
        cs.store(group="schema/dataset", name=name, node=schema)
    cs.store(group="schema/model", name="timm", node=ModelConfig)
    cs.store(group="schema/compression", name="base", node=CompressionConfig)
    cs.store(group="schema/accelerator", name="base", node=AcceleratorConfig)
    cs.store(group="schema/logger", name="base", node=LoggerConfig)
    cs.store(group="schema/trainer", name="base", node=TrainerConfig)
    cs.store(group="schema/callbacks", name="base", node=CallbacksConfig)
    cs.store(group="schema/paths", name="base", node=PathsConfig)
    cs.store(group="schema/bench", name="base", node=BenchConfig)

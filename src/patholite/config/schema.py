"""Dataclass schemas of every config group, registered in Hydra's ConfigStore.

Each group option's YAML names its schema in its defaults list (``/schema/<group>/<name>@_here_``), so Hydra
composes the option onto a typed, struct-mode node: an unknown key or a value of the wrong type fails at
start, naming the key. Dataset and model options each have a schema class; options add fields by subclassing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------------------------- dataset
@dataclass
class AugmentConfig:
    """Training-time augmentation suited to histology: tissue has no orientation, stain varies by lab."""

    flips: bool = True
    rotate90: bool = True
    color_jitter: float = 0.1  # brightness/contrast/saturation strength; hue gets a quarter of it
    stain_jitter: float = 0.03  # sigma of the per-channel HED (haematoxylin, eosin, DAB) scale and shift


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str | None = None
    image_size: int = 224
    class_names: list[str] = field(default_factory=list)  # empty: discovered from the data
    batch_size: int = 32
    eval_batch_size: int | None = None  # None: same as batch_size
    num_workers: int = 0
    shuffle: bool = True  # training batches in random order; false: a fixed order (reproducibility checks)
    split_seed: int = 0  # seeds the splits of datasets without official ones
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    max_samples_per_split: int | None = None  # seeded, stratified subsample of every split (debug, smoke)
    # microns per pixel of the images as read, before the resize to image_size: the slide engine reads
    # tiles at this resolution (None: unknown; the family may know it, e.g. synthetic tiles)
    mpp: float | None = None
    verify_images: bool = True  # read every image file's header before training (format, mode, pages)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # classical stain normalisation of every split's images (data/stain_norm.py): null | macenko | reinhard,
    # toward stain_reference: an image file, or null for the training split's statistics
    stain_norm: str | None = None
    stain_reference: str | None = None


@dataclass
class StainShiftConfig:
    """A shifted staining of the synthetic test split only (another lab): both stain vectors turned about
    the grey axis of optical-density space (a hue shift) and each stain's density scaled."""

    rotate_deg: float = 0.0  # in [-60, 60]
    scale_h: float = 1.0  # haematoxylin density factor, in (0, 4]
    scale_e: float = 1.0  # eosin density factor, in (0, 4]


@dataclass
class SyntheticConfig(DatasetConfig):
    """Procedural H&E-like tiles of the four BACH classes, generated once into a cache."""

    name: str = "synthetic"
    train_per_class: int = 400
    val_per_class: int = 100
    test_per_class: int = 100
    tile_size: int = 96  # generated size; image_size resizes
    difficulty: float = 0.5  # 0: classes far apart, 1: heavily overlapping
    seed: int = 0
    cache_dir: str = "${paths.cache_dir}/synthetic"
    stain_shift: StainShiftConfig = field(default_factory=StainShiftConfig)  # test split only


@dataclass
class BachConfig(DatasetConfig):
    """ICIAR 2018 BACH microscopy photos: Photos/<class>/*.tif, 2048x1536 at 0.42 um/px."""

    name: str = "bach"
    mode: str = "resize"  # resize the whole photo, or "tile" it into tile_size squares
    tile_size: int = 512
    tile_stride: int | None = None  # None: tile_size (no overlap)


@dataclass
class Isic2018Config(DatasetConfig):
    """ISIC 2018 Task 3 (HAM10000): 7 classes of dermoscopy images, split by lesion."""

    name: str = "isic2018"
    lesion_groups_csv: str | None = None  # CSV with image and lesion_id columns; None: looked up under root


@dataclass
class MedmnistConfig(DatasetConfig):
    """A MedMNIST npz (train/val/test arrays, official splits)."""

    name: str = "medmnist"
    preset: str = "pathmnist"
    npz: str | None = None  # None: <root>/<preset>.npz


@dataclass
class CifarConfig(DatasetConfig):
    """CIFAR-10/100 python pickle batches (official test split)."""

    name: str = "cifar"
    variant: str = "cifar10"


@dataclass
class ImageFolderConfig(DatasetConfig):
    """One folder per class; optional train/val/test subfolders are used as official splits."""

    name: str = "image_folder"
    extensions: list[str] = field(
        default_factory=lambda: [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"]
    )


# ----------------------------------------------------------------------------------------------- model
@dataclass
class PyramidConfig:
    """R1's pyramid multi-scale head: pooled tokens of a shallow, middle and deep block, concatenated."""

    enabled: bool = False
    blocks: list[int] | None = None  # None: [depth // 4, depth // 2, depth - 1]


@dataclass
class SmtConfig:
    """R3's Self-reform Multilayer Transformer (``family: smt``): ``layers`` ViT encoders of S x S images cut
    into grid x grid patches; the top-K patches of each layer are re-read at ``grid`` times the
    magnification for the next. Inference reads 1 + K + K^2 regions per slide (3 layers)."""

    image_size: int = 256  # S
    grid: int = 16  # L: patches per side, and the magnification of each hop
    top_k: int = 4  # K: focused patches per image
    layers: int = 3
    start_epochs: list[int] = field(default_factory=lambda: [0, 20, 50])  # when each layer joins (R3)
    lrs: list[float] = field(default_factory=lambda: [0.002, 0.002, 0.01])  # per layer (R3), SGD
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 0.9  # temporal ensembling of the focusing score: S(e) = eps*S(e-1) + (1-eps)*g
    fwd_weight: float = 1.0  # L_cls and L_focus weights ramp to this
    bwd_weight: float = 0.1  # L_emb and L_ret weights ramp to this
    ramp_epochs: float = 5.0
    reform: list[str] = field(default_factory=lambda: ["ret", "emb"])  # backward reform; []: forward only
    emb_reduction: str = "mean"  # L_emb over the embedding: mean (scale-free) | sum (R3's literal squared L2)
    weak_negative: bool = True  # one lowest-score patch per image trains the next layer as a negative
    # slide probabilities from the last layer's images: mean | max | attention (a gated-attention head over
    # their embeddings, fitted on the training slides' walks after SMT trains, threshold set on validation)
    aggregate: str = "mean"
    attention_epochs: int = 40  # epochs of the attention head (aggregate=attention)
    # adaptive reads (issue 19): per image K in top_k..top_k_max. none: top_k; spread: the patches within
    # `spread` of the image's best focusing score; margin: top_k_max while the slide's positive probability
    # after the layer is within `margin` of 0.5
    top_k_max: int | None = None
    adaptive: str = "none"
    spread: float = 0.05
    margin: float = 0.25
    tissue_min: float = 0.0  # candidate patches with less tissue (low-res mask) are never read; 0: off
    too_small: str = "upsample"  # a slide smaller than image_size * grid^(layers-1): upsample | refuse
    # long side (px) of the low-resolution image the tissue box is found on; null: the tiler's 2048-px mask.
    # A bounding box needs no fine mask: 512 px costs ~0.07 s per 20k slide where 2048 costs ~1 s
    tissue_px: int | None = 512
    class_weights: str = "auto"  # auto: inverse class frequency of the training slides | none
    eval_depth: int | None = None  # layers walked in validation/test; None: the deepest trained so far
    # every encoder starts from these weights (head dropped): a tile classifier of the encoders' architecture
    # (its run folder, an artifact folder or weights file), e.g. one trained on the same slides' tiles
    encoder_checkpoint: str | None = None
    # fine-tuning a trained SMT (compression=qat): every layer trains from the first epoch at lrs times this
    finetune_lr_scale: float = 0.1


@dataclass
class ModelConfig:
    name: str = MISSING
    timm_name: str = MISSING
    family: str = "vit"  # vit | cnn | smt (timm_name/kwargs then describe each SMT encoder)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    # Weights from the Hugging Face hub (models/hub.py), opt-in: `pretrained` takes timm's pretrained weights
    # of timm_name; `hub` ("hf-hub:<org>/<repo>") any timm-format repo (architecture from its config.json).
    # Both read the local hub cache only, unless `download` is true (then preflight fetches config.json and
    # model.safetensors, never pickled weights). The classifier head is always new.
    pretrained: bool = False
    hub: str | None = None
    revision: str | None = None  # a branch, tag or commit of the hub repo; None: main
    download: bool = False
    # What the weights expect: normalisation (wins over dataset.mean/std; None: the hub config's / timm's),
    # the resolution in microns per pixel, and the weights' licence (recorded in every artifact's sidecar)
    mean: list[float] | None = None
    std: list[float] | None = None
    mpp: float | None = None
    license: str | None = None
    checkpoint: str | None = None  # local .safetensors / .pth / .pt / Lightning .ckpt
    checkpoint_skip_head: bool = False  # drop the checkpoint's classifier (foundation-model weights)
    num_classes: int | None = None  # None: the dataset's class count
    drop_path_rate: float = 0.0
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    smt: SmtConfig | None = None  # family smt only
    # R1's learnable stain front-end (models/stain.py) in front of the network: null (none) | learnable |
    # adaptive (also divides each image's H and E densities by that image's density statistic)
    # stain_vectors: 2 or 3 RGB optical-density rows (null: Ruifrok & Johnston's H&E/DAB)
    stain: str | None = None
    stain_vectors: list[list[float]] | None = None


# ----------------------------------------------------------------------------------------- accelerator
@dataclass
class AcceleratorConfig:
    name: str = MISSING
    accelerator: str = "cpu"  # cpu | gpu | npu (Ascend, through torch_npu) | auto
    devices: Any = 1  # a count, a list of ids, or "auto" (every one); more than one trains with DDP
    # machines training together, each with ``devices``: their processes are started by srun
    # (hydra/launcher=slurm) or torchrun, one per device (patholite.accelerators.cluster)
    num_nodes: int = 1
    # across nodes, ranks other than 0 wait this long for rank 0's next fit while it evaluates, exports and
    # benchmarks between fits (and for it to join at the start)
    rank_wait_min: int = 1440
    strategy: str = "auto"  # one device: Lightning's; several: ddp_spawn (safe under Hydra -m)
    find_unused_parameters: bool = False  # DDP: needed only when some trained parameter gets no gradient
    precision: str = "32-true"  # "auto": bf16-mixed where the GPU supports it, else 16-mixed
    threads: int | None = None  # torch intra-op threads; None: torch's default
    int8_engine: str = "auto"  # torch.ao engine for CPU INT8; auto: x86 (fbgemm), qnnpack on ARM
    pin_memory: bool = False


# -------------------------------------------------------------------------------------- the rest
@dataclass
class TrainerConfig:
    max_epochs: int = 10
    # Lightning's meaning: a float is a fraction of the batches (1.0: all), an int a batch count (1: one)
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    limit_test_batches: int | float = 1.0
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    deterministic: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    label_smoothing: float = 0.0


@dataclass
class WandbConfig:
    project: str = "patholite"
    entity: str | None = None
    mode: str = "offline"  # offline (default: no key, no network) | online | disabled
    group: str | None = None  # None: the sweep directory's name (or the run's, outside sweeps)
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    name: str = MISSING
    wandb: WandbConfig | None = None  # None: no W&B run
    csv: bool = True  # a training's metrics as CSV (csv/ in the run folder)
    log_model: bool = False  # upload every artifact's files to W&B as a model artifact (bytes: opt in)


@dataclass
class CallbacksConfig:
    monitor: str = "val/macro_f1"
    monitor_mode: str = "max"
    early_stopping_patience: int | None = None
    progress_bar: str = "rich"  # rich | tqdm | none
    extra: dict[str, Any] = field(default_factory=dict)  # name -> {_target_: ..., ...} Lightning callbacks


@dataclass
class PathsConfig:
    root_dir: str = "${oc.env:PATHOLITE_ROOT,.}"
    data_dir: str = "${paths.root_dir}/data"
    output_dir: str = "${hydra:runtime.output_dir}"
    cache_dir: str = "${paths.root_dir}/outputs/cache"


@dataclass
class ProbeConfig:
    """How an encoder is judged (as kaiko's eva does): its embeddings of the labelled splits, a linear probe
    (logistic regression, L2 chosen on val by balanced accuracy) and kNN (cosine)."""

    l2_grid: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    max_iter: int = 200  # L-BFGS iterations per probe fit
    knn_k: int = 20
    knn_temperature: float = 0.07  # neighbours' votes weighted by exp(cos / T) (DINO's kNN)
    label_fraction: float = 1.0  # the share of train labels the probes fit on (stratified, seeded)
    stain_sigma: float = 0.1  # stain robustness: the test tiles re-stained (HED jitter) at this strength


@dataclass
class BenchConfig:
    """Cost measurement of each artifact; presets ``bench=quick`` (records) and ``bench=paper`` (R2)."""

    warmup: int = 10
    iters: int = 30
    repeats: int = 3
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    threads: int | None = None  # None: the accelerator's thread count
    # "child": latency timed in a fresh child process (alternating, as the benchmark does) and peak memory in
    # another fresh child per artifact; "process": both in the job's own process (fast, but the memory figure
    # is the job's peak so far, training included): what debug=fast uses
    isolation: str = "child"


@dataclass
class TrainConfig:
    dataset: Any = MISSING
    model: Any = MISSING
    compression: Any = MISSING
    accelerator: Any = MISSING
    logger: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 42
    task_name: str = "train"
    tags: list[str] = field(default_factory=list)
    resume: str | None = None  # a run dir: continue it from its last checkpoint
    rerun: str | None = None  # a run dir whose saved overrides this run started from


@dataclass
class BenchRunConfig:
    """``python -m patholite.bench``: cost of artifacts, or of a ``model=`` option with random weights."""

    model: Any = MISSING
    accelerator: Any = MISSING
    logger: Any = MISSING
    bench: BenchConfig = field(default_factory=BenchConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    image_size: int = 224
    artifacts: list[str] = field(
        default_factory=list
    )  # artifact dirs; empty: build model= with random weights
    variants: list[str] = field(
        default_factory=lambda: ["fp32", "int8_dynamic"]
    )  # of the random-weight model
    seed: int = 0
    task_name: str = "bench"
    tags: list[str] = field(default_factory=list)


TILE_DATASET_SCHEMAS: dict[str, type[DatasetConfig]] = {
    "synthetic": SyntheticConfig,
    "bach": BachConfig,
    "isic2018": Isic2018Config,
    "medmnist": MedmnistConfig,
    "cifar": CifarConfig,
    "image_folder": ImageFolderConfig,
}

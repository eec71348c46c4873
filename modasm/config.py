"""Recipe schema: typed dataclasses, strict YAML loading, dotted overrides.

A recipe is one YAML file = one experiment. Every key is declared here with its type and a help
string; an unknown key (in the file or in an override such as ``incubate.epochs=2``) is an error
that names the key and suggests the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError


def _f(default, help: str, **kw):
    """A dataclass field with a help string (the schema documents itself)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class RunConfig:
    name: str = _f("run", "Run name; every output lives under <out_dir>/<name>/<phase>/.")
    out_dir: str = _f("runs", "Root directory of all runs (relative to the working directory).")
    seed: int = _f(0, "Seed for initialisation, data order and augmentation.")
    peak_tflops: float = _f(0.0, "Peak TFLOP/s per device that MFU (perf/mfu) is measured against; 0: the datasheet "
                            "table of modasm.perf by GPU name and training precision (on CPU: a matmul probe).")


@dataclass
class ModelConfig:
    embed_dim: int = _f(768, "Token width of every block (same in meta, hybrid and target).")
    num_heads: int = _f(12, "Attention heads per block.")
    patch_size: int = _f(16, "Patch size in pixels.")
    img_size: int = _f(224, "Input resolution (square).")
    in_chans: int = _f(3, "Input channels.")
    num_classes: int = _f(1000, "Classifier outputs.")
    mlp_ratio: float = _f(4.0, "MLP hidden width / embed_dim.")
    qkv_bias: bool = _f(True, "Bias in the qkv projection (the paper's ViT-H/14 has none).")
    norm_eps: float = _f(1e-6, "LayerNorm epsilon (the paper's ViT-H/14 uses 1e-5).")
    cls_token_init: str = _f("timm", "Initial class token: 'timm' (timm >= 0.9: normal, std 1e-6) or 'paper' (the "
                             "paper's vendored timm 0.3.2: truncated normal, std 0.02).")
    split: list = _f([3, 3, 3, 3], "Depth of each of the K modules; the target depth is their sum.")

    def __post_init__(self):
        if not self.split or any((not isinstance(d, int)) or d < 1 for d in self.split):
            raise UserError(f"model.split must be a non-empty list of positive ints, got {self.split!r}")
        if self.embed_dim % self.num_heads:
            raise UserError(f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            raise UserError(f"model.img_size={self.img_size} is not divisible by model.patch_size={self.patch_size}")
        if self.cls_token_init not in ("timm", "paper"):
            raise UserError(f"model.cls_token_init must be 'timm' or 'paper', got {self.cls_token_init!r}")

    @property
    def K(self) -> int:
        return len(self.split)


DATA_SOURCES = ("fashion-mnist", "imagefolder", "webdataset")
DATA_BACKENDS = ("pil", "nvjpeg", "dali")


@dataclass
class DataConfig:
    source: str = _f("fashion-mnist", "Where samples come from: 'fashion-mnist' (the embedded dataset), 'imagefolder' "
                     "(<root>/train/<class>/<image> and <root>/val/<class>/<image>) or 'webdataset' (tar shards "
                     "made by launch/make_shards.py, read as streams).")
    root: str = _f("/usr/share/datasets/fashion-mnist", "fashion-mnist: directory of the idx files; imagefolder: the "
                   "directory holding train/ and val/; webdataset: the directory of train-index.json, val-index.json "
                   "and classes.json (and of the shards unless data.train_shards / data.val_shards say otherwise).")
    train_shards: str = _f("", "webdataset: training shards as a brace pattern or pipe: URL, e.g. "
                           "'pipe:curl -s https://host/train-{000000..001281}.tar' (empty: the shards in data.root).")
    val_shards: str = _f("", "webdataset: validation shards, like data.train_shards (empty: the shards in data.root).")
    fraction: float = _f(1.0, "Train on this fraction of every class (e.g. 0.25): a deterministic subset chosen by a "
                         "hash of each sample's key, the same for every seed and source; 1.0: all.")
    train_limit: int = _f(0, "Use only the first N training samples of a seeded permutation (0: all).")
    eval_limit: int = _f(0, "Evaluate on only the first N validation samples (0: all; for quick tests).")
    eval_batch_size: int = _f(512, "Global batch size for evaluation.")
    num_workers: int = _f(0, "DataLoader worker processes per rank (webdataset: must divide data.stream_splits).")
    worker_start: str = _f("", "How loader workers start: 'fork', 'spawn' or 'forkserver' (the default on Linux from "
                           "Python 3.14); empty: Python's default.")
    stream_splits: int = _f(8, "webdataset: each rank reads its share of an epoch as this many contiguous streams "
                            "(dealt to its workers); the batch sequence depends on it, not on num_workers.")
    shuffle_buffer: int = _f(2000, "webdataset: samples held per stream to shuffle them (raw bytes, not decoded).")
    backend: str = _f("pil", "Who decodes and augments the image sources: 'pil' (the loader workers, on CPU, with PIL: "
                      "timm's transforms), 'nvjpeg' (the workers only read the bytes and draw each sample's augmentation "
                      "parameters; torchvision.io.decode_jpeg decodes a batch on the training device (nvJPEG on a GPU) "
                      "and crop, flip, RandAugment, normalise and erasing run there as tensor ops) or 'dali' (as "
                      "nvjpeg, with NVIDIA DALI decoding, cropping, resizing and flipping; pip install "
                      "nvidia-dali-cuda130). The parameters are the same in all three (same seeds, same draws); "
                      "the pixels differ by the resampling kernels (docs/method.md).")
    max_bad_fraction: float = _f(0.001, "Stop with an error when more than this fraction of the samples read so far "
                                 "(at least one epoch's worth; train or eval) was unreadable (truncated image, missing "
                                 "label); fewer are skipped and counted in the metrics (bad_samples).")

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            raise UserError(f"data.source={self.source!r} is not known; valid: {', '.join(DATA_SOURCES)}")
        if self.worker_start not in ("", "fork", "spawn", "forkserver"):
            raise UserError(f"data.worker_start must be 'fork', 'spawn', 'forkserver' or empty, got {self.worker_start!r}")
        if self.backend not in DATA_BACKENDS:
            raise UserError(f"data.backend={self.backend!r} is not known; valid: {', '.join(DATA_BACKENDS)}")
        if self.backend != "pil" and self.source == "fashion-mnist":
            raise UserError(f"data.backend={self.backend!r} decodes JPEG files: it applies to the imagefolder and "
                            "webdataset sources, not to fashion-mnist (in memory); use data.backend=pil")
        if not 0 < self.fraction <= 1:
            raise UserError(f"data.fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise UserError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        for k in ("stream_splits", "shuffle_buffer"):
            if getattr(self, k) < 1:
                raise UserError(f"data.{k} must be >= 1, got {getattr(self, k)}")


@dataclass
class AugConfig:
    """Training augmentation of the image sources (imagefolder, webdataset), all through timm.

    The defaults are plain (random-resized crop and flip, nothing else); the ImageNet recipes set the
    DeiT recipe. fashion-mnist keeps its own fixed transform; only mixup/cutmix apply to it (at batch level).
    """
    rand_augment: str = _f("", "timm auto-augment string, e.g. 'rand-m9-mstd0.5-inc1' (DeiT); empty: none.")
    color_jitter: float = _f(0.0, "Colour jitter strength (timm turns it off when RandAugment is on).")
    interpolation: str = _f("bicubic", "Resize interpolation for training crops and evaluation: 'bicubic', "
                            "'bilinear', 'random' (train only).")
    scale: list = _f([0.08, 1.0], "RandomResizedCrop area range (fraction of the image).")
    ratio: list = _f([0.75, 1.3333333333333333], "RandomResizedCrop aspect-ratio range.")
    hflip: float = _f(0.5, "Horizontal flip probability.")
    crop_pct: float = _f(0.875, "Evaluation: resize the short side to img_size / crop_pct, then centre-crop img_size.")
    re_prob: float = _f(0.0, "Random erasing probability (DeiT: 0.25).")
    re_mode: str = _f("pixel", "Random erasing fill: 'pixel' (per-pixel normal), 'rand' (per channel) or 'const'.")
    re_count: int = _f(1, "Random erasing: regions per image.")
    mixup: float = _f(0.0, "Mixup alpha (DeiT: 0.8); > 0 turns on soft targets and timm's SoftTargetCrossEntropy.")
    cutmix: float = _f(0.0, "CutMix alpha (DeiT: 1.0).")
    mixup_prob: float = _f(1.0, "Probability of applying mixup or cutmix to a batch.")
    mixup_switch_prob: float = _f(0.5, "Probability of cutmix instead of mixup when both are on.")
    mixup_mode: str = _f("batch", "timm Mixup mode: 'batch', 'pair' or 'elem'.")
    repeated_aug: int = _f(1, "Repeated augmentation: each drawn sample appears this many times per epoch with "
                           "different augmentations (DeiT: 3); the epoch length stays the dataset size.")

    def __post_init__(self):
        if self.mixup < 0 or self.cutmix < 0 or not 0 <= self.mixup_prob <= 1:
            raise UserError(f"aug.mixup/aug.cutmix must be >= 0 and aug.mixup_prob in [0, 1], got "
                             f"{self.mixup}/{self.cutmix}/{self.mixup_prob}")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise UserError(f"aug.mixup_mode must be 'batch', 'pair' or 'elem', got {self.mixup_mode!r}")
        if self.re_mode not in ("pixel", "rand", "const"):
            raise UserError(f"aug.re_mode must be 'pixel', 'rand' or 'const', got {self.re_mode!r}")
        if self.repeated_aug < 1:
            raise UserError(f"aug.repeated_aug must be >= 1, got {self.repeated_aug}")
        if not 0 < self.crop_pct <= 1:
            raise UserError(f"aug.crop_pct must be in (0, 1], got {self.crop_pct}")
        for k in ("scale", "ratio"):
            v = getattr(self, k)
            if len(v) != 2 or not all(isinstance(a, (int, float)) and a > 0 for a in v) or v[0] > v[1]:
                raise UserError(f"aug.{k} must be [low, high] with 0 < low <= high, got {v!r}")
        if self.rand_augment and not self.rand_augment.startswith(("rand", "augmix", "original", "v0", "3a")):
            raise UserError(f"aug.rand_augment={self.rand_augment!r} is not a timm auto-augment string, e.g. "
                             "'rand-m9-mstd0.5-inc1'")

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class PhaseConfig:
    """Optimisation of one phase (meta, incubate, assemble = fine-tune, e2e)."""
    epochs: int = _f(100, "Passes over the training data.")
    batch_size: int = _f(2048, "Global batch per optimizer step (micro-batch x accumulation x ranks; the paper's "
                         "batch_size x update_freq x GPUs).")
    micro_batch: int = _f(0, "Most images per rank per forward/backward (what fits in a GPU's memory); the "
                          "accumulation steps follow from batch_size, the ranks and this limit. 0: use accum_steps.")
    accum_steps: int = _f(1, "Micro-batches accumulated per optimizer step when micro_batch is 0.")
    lr: float = _f(5e-4, "Peak learning rate per 512 images; the used lr is lr * batch_size / 512 (DeiT).")
    min_lr: float = _f(1e-5, "Learning rate at the end of the cosine schedule.")
    warmup_epochs: float = _f(20.0, "Linear warm-up length in epochs (from warmup_lr to the peak).")
    warmup_lr: float = _f(1e-6, "Learning rate at the start of the warm-up (the paper's --warmup-lr).")
    lr_schedule: str = _f("epoch", "How timm's CosineLRScheduler is stepped: 'epoch' (the paper's code: once after "
                          "each epoch, so epoch e trains at the schedule's value for e-1; warm-up and cosine count "
                          "epochs, the cosine spans all of them including warm-up) or 'step' (the same curve "
                          "updated every optimizer step).")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to biases, norms and embeddings).")
    decay_tokens: bool = _f(False, "Apply weight decay to cls_token and pos_embed too. The paper's incubation of "
                            "module 0 does (it optimises a sub-module, which loses timm's no-weight-decay list); "
                            "its other phases and DeiT do not.")
    clip_grad: float = _f(0.0, "Clip the global gradient norm to this value (0: off).")
    drop_path: float = _f(0.1, "Stochastic depth rate, linear over the trained model's depth.")
    label_smoothing: float = _f(0.1, "Label smoothing of the cross-entropy loss (with aug.mixup/cutmix: of the "
                                "mixed soft targets).")
    eval_every_epochs: int = _f(1, "Evaluate every N epochs (and always after the last).")
    ckpt_every_steps: int = _f(0, "Save resume state every N optimizer steps (0: at epoch ends only).")
    keep_ckpts: int = _f(2, "Resume checkpoints kept per phase (older complete ones are removed).")
    log_every_steps: int = _f(20, "Print and log a training line every N optimizer steps.")
    max_nonfinite_steps: int = _f(0, "Optimizer steps with a non-finite loss or gradient norm that may be skipped (the "
                                  "weights left unchanged, as mixed-precision loss scalers do) in the whole phase; one "
                                  "more stops the phase at that step, saving nothing from it. 0: stop at the first.")

    def __post_init__(self):
        if self.max_nonfinite_steps < 0:
            raise UserError(f"max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        for k in ("epochs", "batch_size", "accum_steps", "eval_every_epochs", "keep_ckpts", "log_every_steps"):
            if getattr(self, k) < 1:
                raise UserError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.micro_batch < 0:
            raise UserError(f"micro_batch must be >= 0 (0: from accum_steps), got {self.micro_batch}")
        if self.micro_batch and self.accum_steps != 1:
            raise UserError(f"set micro_batch ({self.micro_batch}) or accum_steps ({self.accum_steps}), not both: "
                            "with micro_batch the accumulation steps are derived")
        if self.lr_schedule not in ("epoch", "step"):
            raise UserError(f"lr_schedule must be 'epoch' or 'step', got {self.lr_schedule!r}")


@dataclass
class IncubateConfig(PhaseConfig):
    """Incubation: the phase's optimisation plus how its K jobs are farmed out."""
    groups: int = _f(0, "Module groups the launch's ranks form (farm mode): group g incubates its share of "
                     "the K modules (longest first) on its own ranks. 0: as many as fit (the largest G <= K "
                     "dividing the number of ranks). Ignored with --module k (array mode).")

    def __post_init__(self):
        super().__post_init__()
        if self.groups < 0:
            raise UserError(f"incubate.groups must be >= 0 (0: automatic), got {self.groups}")


@dataclass
class FineTuneConfig(PhaseConfig):
    """A phase that trains the whole target (assemble, e2e); it may start from another run's target."""
    init_from: str = _f("", "Start from this target shard set (an assemble or e2e export/ directory, e.g. "
                        "runs/vit-b16/assemble/export) instead of the incubated modules (assemble) or a random init "
                        "(e2e). Its model must match the recipe's except model.img_size: at another resolution the "
                        "position embedding is resampled with timm's resample_abs_pos_embed (a high-resolution "
                        "fine-tune). Empty: the phase's usual start.")
    init_from_sha256: str = _f("", "The manifest_sha256 that init_from's manifest must have (a pin); empty: whatever "
                               "is there, recorded in this phase's manifest when the phase starts. Either way a "
                               "finished or resumable phase is refused when its init shard set has changed since.")

    def __post_init__(self):
        super().__post_init__()
        if self.init_from_sha256 and not self.init_from:
            raise ValueError("init_from_sha256 pins the shard set of init_from, which is empty; set both or neither")


@dataclass
class E2EConfig(FineTuneConfig):
    """The E2E baseline: the target trained from scratch; its length may follow the assembled path's budget."""
    budget: float = _f(0.0, "Give E2E this multiple of the assembled path's training compute: its epochs follow from the "
                       "counted training FLOPs of meta + all K incubations + fine-tune (modasm/perf.py's counter on "
                       "each phase's model, x the images each phase trains on), rounded to the nearest whole epoch "
                       "(at least 1), fixed before E2E starts (its lr schedule has that length). 1.0: budget-matched; "
                       "2.0: twice the budget; 0: e2e.epochs as given.")

    def __post_init__(self):
        super().__post_init__()
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0 (0: e2e.epochs as given), got {self.budget}")
        if self.budget and self.init_from:
            raise ValueError("budget sizes an E2E run from scratch against the assembled path; a fine-tune from "
                             "init_from has no such budget: set one or the other")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(0, "ZeRO stage 0-3.")
    precision: str = _f("fp32", "'fp32' or 'bf16' (DeepSpeed keeps fp32 master weights for bf16).")
    grad_accum_dtype: str = _f("fp32", "bf16 only: the dtype gradients are accumulated in across micro-batches "
                               "(DeepSpeed's data_types.grad_accum_dtype). 'fp32' (default): ZeRO-1 trains through "
                               "DeepSpeed's BF16_Optimizer, ZeRO-2/3 keep fp32 gradient partitions. 'bf16': DeepSpeed's "
                               "default, 8 mantissa bits per partial sum. DeepSpeed 0.19.8 cannot accumulate bf16 "
                               "gradients in fp32 without ZeRO: zero_stage 0 with bf16 needs 'bf16' here.")
    communication_dtype: str = _f("fp32", "bf16 only: the dtype gradients are all-reduced / reduce-scattered in "
                                  "(DeepSpeed's communication_data_type). 'fp32' (default): sums over many ranks keep "
                                  "24 mantissa bits, at twice the bytes of 'bf16'.")
    overlap_comm: Optional[bool] = _f(None, "Overlap gradient reduction with the backward pass (ZeRO >= 2, "
                                      "zero_optimization.overlap_comm); null: on with ZeRO-2/3.")
    contiguous_gradients: bool = _f(True, "Copy gradients into one contiguous buffer as they are produced (ZeRO >= 2; "
                                    "less fragmentation, faster reduce).")
    reduce_bucket_size: Optional[int] = _f(None, "Gradient elements per reduction bucket (ZeRO >= 2, "
                                           "zero_optimization.reduce_bucket_size); null: DeepSpeed's 5e8. With "
                                           "overlap_comm a bucket is reduced while the backward goes on, the last one "
                                           "after it: a model under 5e8 trainable parameters overlaps nothing at the "
                                           "default (launch/estimate.py).")

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"deepspeed.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.reduce_bucket_size is not None and self.reduce_bucket_size < 1:
            raise UserError(f"deepspeed.reduce_bucket_size must be a positive number of elements or null, got "
                            f"{self.reduce_bucket_size}")
        for k in ("grad_accum_dtype", "communication_dtype"):
            if getattr(self, k) not in ("fp32", "bf16"):
                raise UserError(f"deepspeed.{k} must be 'fp32' or 'bf16', got {getattr(self, k)!r}")
        if self.precision == "bf16" and self.zero_stage == 0 and self.grad_accum_dtype == "fp32":
            raise UserError("deepspeed.precision=bf16 with zero_stage=0: DeepSpeed 0.19.8 accumulates bf16 gradients "
                            "in fp32 only under ZeRO; set deepspeed.zero_stage=1 (on one rank it costs the memory of "
                            "stage 0), or deepspeed.grad_accum_dtype=bf16 to accept bf16 accumulation")


@dataclass
class SpeedConfig:
    """Fast paths (each gives the plain path's results, as tests/test_speed.py states per path). ``null`` =
    automatic: on with a GPU, off on CPU."""
    compile: Optional[bool] = _f(None, "torch.compile the model (in place: names and shards unchanged); null: on CUDA.")
    checkpointing: bool = _f(False, "Activation checkpointing per block (timm's set_grad_checkpointing, non-reentrant): "
                             "recompute block activations in the backward pass instead of storing them; only blocks "
                             "whose backward runs are recomputed (hybrid(k): module k and the blocks after it, never "
                             "the frozen blocks before it).")
    fused_optimizer: Optional[bool] = _f(None, "torch.optim.AdamW(fused=True) (one kernel for all parameters; also "
                                         "under DeepSpeed's ZeRO and bf16 optimizers); null: on CUDA.")
    fused_attention: bool = _f(True, "F.scaled_dot_product_attention in every attention block (timm's fused_attn: "
                               "flash / memory-efficient kernels on a GPU); false: timm's explicit softmax(q k^T) v.")
    uint8_batches: Optional[bool] = _f(None, "data.backend=pil: the loader yields uint8 images (timm's prefetcher "
                                       "layout, 4x fewer bytes to copy); normalise and random erasing run on the "
                                       "device, erasing at the boxes the sample's seed draws; null: on CUDA.")
    pin_memory: Optional[bool] = _f(None, "Pinned loader batches and non_blocking host-to-device copies; null: on CUDA.")


@dataclass
class WandbConfig:
    mode: str = _f("offline", "'offline' (default: local files only, sync later with `wandb sync`), 'online', "
                   "or 'disabled'. The WANDB_MODE environment variable takes precedence.")
    project: str = _f("modasm", "W&B project.")
    entity: str = _f("", "W&B entity (user or team); empty: your default entity.")
    group: str = _f("", "W&B group of this pipeline's runs; empty: run.name.")

    def __post_init__(self):
        if self.mode not in ("offline", "online", "disabled"):
            raise UserError(f"logging.wandb.mode must be 'offline', 'online' or 'disabled', got {self.mode!r}")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig, metadata={"help": "Weights & Biases"})
    progress: str = _f("auto", "'bar' (a live line), 'lines' (plain lines every log_every_steps), or 'auto': "
                       "bar on a terminal, lines otherwise.")

    def __post_init__(self):
        if self.progress not in ("auto", "bar", "lines"):
            raise UserError(f"logging.progress must be 'auto', 'bar' or 'lines', got {self.progress!r}")


def _phase(**overrides):
    return field(default_factory=lambda: PhaseConfig(**overrides), metadata={"help": "phase optimisation"})


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    meta: PhaseConfig = _phase(epochs=300)
    incubate: IncubateConfig = field(default_factory=lambda: IncubateConfig(epochs=100),
                                     metadata={"help": "phase optimisation + farming"})
    assemble: FineTuneConfig = field(default_factory=lambda: FineTuneConfig(epochs=100, warmup_epochs=0.0, clip_grad=1.0),
                                     metadata={"help": "phase optimisation + start"})
    e2e: E2EConfig = field(default_factory=lambda: E2EConfig(epochs=300),
                                metadata={"help": "phase optimisation + start"})
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PHASES = ("meta", "incubate", "assemble", "e2e")


# ---------------------------------------------------------------- loading


def _suggest(key: str, valid, prefix: str = "") -> str:
    valid = [f"{prefix}.{v}" if prefix else v for v in valid]
    key = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, tp, where: str):
    """Check (and gently coerce ints to floats) a YAML value against a field type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is list and isinstance(value, list):
        return value
    if tp in (int, str, bool, float) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise UserError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")


def _build(cls, data: dict, where: str, base=None):
    """Build ``cls`` from a mapping; keys not given keep ``base``'s values (or the defaults)."""
    if not isinstance(data, dict):
        raise UserError(f"{where or 'recipe'}: expected a mapping, got {data!r}")
    base = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise UserError(f"unknown recipe key '{path}'{_suggest(key, fields, where)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path, getattr(base, key))
        else:
            kwargs[key] = _coerce(value, tp, path)
    try:
        return dataclasses.replace(base, **kwargs)
    except ValueError as e:
        raise UserError(f"{where or 'recipe'}: {e}") from None


def _set_dotted(tree: dict, dotted: str, value, source: str):
    """Apply one override onto a nested dict, validating the path against the schema."""
    parts = dotted.split(".")
    cls = Recipe
    node = tree
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            prefix = ".".join(parts[:i])
            full = [f"{prefix}.{n}" if prefix else n for n in fields]
            raise UserError(f"unknown override key '{dotted}' ({source}){_suggest(dotted, full)}")
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise UserError(f"override '{dotted}' names a section; set one of its keys, e.g. {dotted}.{dataclasses.fields(tp)[0].name}=...")
            node[part] = value
        else:
            if not dataclasses.is_dataclass(tp):
                raise UserError(f"override '{dotted}': '{part}' is not a section")
            node = node.setdefault(part, {})
            cls = tp


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load a recipe file and apply ``a.b=c`` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file {path} does not exist")
    try:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections")
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"override {ov!r} must look like section.key=value")
        key, raw = ov.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw), "command line")
    try:
        return _build(Recipe, tree, "")
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def describe(cls=Recipe, prefix: str = "") -> list[str]:
    """One line per key: dotted name, default and help (used by --help-recipe)."""
    out = []
    inst = cls()
    for f in dataclasses.fields(cls):
        val = getattr(inst, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(val):
            out += describe(type(val), name + ".")
        else:
            out.append(f"{name} = {val!r}  # {f.metadata.get('help', '')}")
    return out


# ---------------------------------------------------------------- what a phase's result depends on

# Keys that never change what a phase computes (paths, logging, checkpoint cadence, loader tuning).
_INERT = {"run.out_dir", "run.name", "run.peak_tflops", "data.num_workers", "data.worker_start", "data.eval_batch_size",
          "data.train_shards", "data.val_shards", "data.max_bad_fraction",
          "deepspeed.overlap_comm", "deepspeed.contiguous_gradients"}  # (these two: when gradients move, not what they sum to)
_INERT_PHASE = {"log_every_steps", "keep_ckpts", "ckpt_every_steps", "eval_every_epochs",
                "max_nonfinite_steps",  # only decides whether a run stops; a re-run may raise it and resume
                "groups",  # how incubation is farmed out does not change a module's result
                "init_from"}  # where the init shard set lies; its content counts (init_from_sha256)
_UPSTREAM = {"meta": ("meta",), "incubate": ("meta", "incubate"),
             "assemble": ("meta", "incubate", "assemble"), "e2e": ("e2e",)}


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def fingerprint(recipe: dict, section: str) -> dict:
    """The recipe keys a phase's result depends on (its own and upstream sections, model, data, seed).

    Secrets from the environment are redacted (``$NAME``), as in every manifest and marker it goes into."""
    from .redact import redact
    recipe = redact(recipe)
    keep = {}
    for key, value in flatten(recipe).items():
        top, _, leaf = key.partition(".")
        if key in _INERT or top in ("logging", "speed") or (top in PHASES and (top not in _UPSTREAM[section] or leaf in _INERT_PHASE)):
            continue
        keep[key] = value
    return keep


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Keys whose values differ; a key one side lacks counts as its schema default (keys added later)."""
    defaults = flatten(Recipe().to_dict())
    unset = object()

    def get(fp, k):
        return fp.get(k, defaults.get(k, unset))
    show = lambda v: "(unset)" if v is unset else repr(v)  # noqa: E731
    return [f"{k}: {show(get(old, k))} -> {show(get(new, k))}"
            for k in sorted(set(old) | set(new)) if get(old, k) != get(new, k)]

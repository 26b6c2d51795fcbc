"""Typed training configuration: dataclass sections, YAML files, `a.b=value` overrides.

Every key is type-checked and every section validates itself in `__post_init__`, so an unknown key or a
bad value is refused (naming the key, suggesting the nearest valid one) before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastdino.errors import ConfigError, UserError  # ConfigError lives in errors.py; tests import it from here too

METHODS = ("dino", "sit")
"""The values of train.method; fastdino/methods/__init__.py maps each to its class."""


OPTIMIZERS = ("adamw", "sgd", "lars")
"""The values of optim.name; fastdino/engine/optim.py builds each."""

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {choices}", key)


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}", key)


VIT_ONLY_KEYS = ("patch_size", "img_size", "depth", "drop_path_rate", "attention", "pos_embed_interp",
                 "grad_checkpointing")
"""model.* keys of fastdino's ViT only; a convnet (torchvision or timm) is built as the official code builds it, and
refuses these at non-default values, naming the key."""


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = "vit_small"
    """The backbone (models/backbones.py): vit_tiny | vit_small | vit_base (fastdino's ViT), resnet18 | resnet34 |
    resnet50 | resnet101 | resnet152 (torchvision, `fc` replaced by an identity as the official code), or
    timm/<name> for any model timm builds (pooled features, `num_classes=0`; needs `pip install 'fastdino[timm]'`).
    The keys in VIT_ONLY_KEYS apply to the ViTs only: a convnet refuses them at non-default values."""
    patch_size: int = 16
    img_size: int = 224
    """Crop size the position embeddings are stored for; other sizes are interpolated."""
    depth: int = 0
    """Number of blocks; 0 keeps the architecture's 12."""
    drop_path_rate: float = 0.1
    """Stochastic depth in the student only (SPEC: 0.1)."""
    attention: str = "sdpa"
    """sdpa | xformers | math."""
    pos_embed_interp: str = "official"
    """How position embeddings are resized to other crop sizes: official (the official DINO code's bicubic
    resize by scale factor (grid + 0.1) / stored grid: what its checkpoints expect) | exact (bicubic to the
    exact grid size)."""
    compile: str = "none"
    """torch.compile of the student and teacher networks (engine/compile.py): none | default | reduce-overhead
    (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs. Static shapes: one graph per crop-size set,
    compiled in the first steps (minutes for a ViT-S), never again."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them (torch.utils.checkpoint):
    less memory for larger batches or patch 8, about one more forward pass of compute. Same gradients."""

    def __post_init__(self):
        from fastdino.models.attention import ATTENTION_IMPLS
        from fastdino.models.backbones import check_arch, is_vit
        from fastdino.models.vit import POS_EMBED_INTERP

        try:
            check_arch(self.arch)
        except (ValueError, UserError) as exc:  # an unknown name, or timm/... without timm
            raise ConfigError(f"model.arch={self.arch!r}: {exc}" if isinstance(exc, UserError)
                              else f"model.arch={exc}", "model.arch") from None
        if not is_vit(self.arch):
            defaults = ModelConfig.__dataclass_fields__
            for key in VIT_ONLY_KEYS:
                if getattr(self, key) != defaults[key].default:
                    raise ConfigError(
                        f"model.{key}={getattr(self, key)!r} applies to ViTs only; model.arch={self.arch!r} is a "
                        f"convnet: remove model.{key} (or leave it at {defaults[key].default!r})", f"model.{key}")
        _choice("model.compile", self.compile, COMPILE_MODES)
        _choice("model.attention", self.attention, ATTENTION_IMPLS)
        _choice("model.pos_embed_interp", self.pos_embed_interp, POS_EMBED_INTERP)
        _positive("model.patch_size", self.patch_size)
        _positive("model.depth", self.depth, allow_zero=True)
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"model.img_size={self.img_size} is not a multiple of model.patch_size={self.patch_size}",
                "model.img_size",
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate={self.drop_path_rate} must be in [0, 1)", "model.drop_path_rate")


@dataclass(kw_only=True)
class DinoConfig:
    out_dim: int = 65536
    """K, the number of prototypes of the head's last layer."""
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    """Fix the weight-norm gain of the last layer at 1 (more stable)."""
    head_bn: bool = False
    """BatchNorm in the head's hidden layers (official `use_bn_in_head`); SyncBatchNorm across CUDA processes.
    Off in the SPEC's recipe; the CPU demo needs it to keep its teacher from collapsing (docs/demo.md)."""
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    """Final teacher temperature (0.04-0.07)."""
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    """Momentum m of the center update; 1.0 keeps the center at 0 forever (no centering: an ablation that
    collapses to one dimension, SPEC: Centering)."""
    momentum_teacher: float = 0.996
    """Start of the cosine teacher-momentum schedule (ends at 1)."""
    freeze_last_layer_epochs: int = 1

    def __post_init__(self):
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "student_temp", "teacher_temp", "warmup_teacher_temp"):
            _positive(f"dino.{key}", getattr(self, key))
        _positive("dino.warmup_teacher_temp_epochs", self.warmup_teacher_temp_epochs, allow_zero=True)
        _positive("dino.freeze_last_layer_epochs", self.freeze_last_layer_epochs, allow_zero=True)
        if self.out_dim < 2:
            raise ConfigError(
                f"dino.out_dim={self.out_dim}: with fewer than 2 prototypes every softmax is 1 and the loss is "
                "trivially 0; use thousands (the paper: 65536)", "dino.out_dim"
            )
        for key in ("center_momentum", "momentum_teacher"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"dino.{key}={getattr(self, key)} must be in [0, 1]", f"dino.{key}")


@dataclass(kw_only=True)
class SitConfig:
    """SiT / GMML (Atito et al. 2021, arXiv 2104.03602; SPEC "SiT"): group-masked reconstruction plus a
    contrastive class token, selected by train.method=sit. Masks and corruption are made on the device
    (data/masking.py); the loss is alpha * L_recons + L_contr (losses/sit.py)."""

    mask_ratio: float = 0.5
    """Fraction of each view's patches covered by corrupted blocks, in (0, 1). Blocks are added until it is
    reached, so the cover overshoots by at most one block. The reference code's GMML draws 0.5-0.7."""
    max_block: float = 0.3
    """Largest block side as a fraction of the patch grid's side (reference: 0.3); at least min_block."""
    min_block: int = 1
    """Smallest block side in patches."""
    corruption: str = "noise,replace"
    """What fills a block, one drawn uniformly per block from this comma-separated list: noise (N(0, 1) in
    normalised pixels), replace (the same region of another image of the batch), zeros."""
    keep_prob: float = 0.1
    """Probability that a block is left unchanged (still reconstructed, as BERT's unchanged tokens)."""
    grey_prob: float = 0.0
    """Probability per view of one extra colour-drop block (greyscale); the reference code's v1 uses 1."""
    blur_prob: float = 0.0
    """Probability per view of one extra Gaussian-blurred block; the reference code's v1 uses 1."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Sigma range of the blurred block, in pixels."""
    recons_pixels: str = "masked"
    """L1 over the corrupted pixels (masked, the paper) or every pixel (all, the reference code)."""
    decoder: str = "mlp"
    """Reconstruction decoder on the patch tokens: linear | mlp | transformer (models/decoder.py)."""
    decoder_hidden_dim: int = 1024
    """Hidden width of the mlp decoder."""
    decoder_depth: int = 2
    """Transformer blocks of the transformer decoder."""
    proj_hidden_dim: int = 2048
    """Hidden width of the contrastive projection head; 0 makes it one linear layer (the reference code)."""
    proj_dim: int = 256
    """Output width of the contrastive projection head."""
    contrastive_target: str = "momentum"
    """momentum (targets from the EMA encoder on the clean views, the paper) | online (NT-Xent between the
    two student views, the reference code); the EMA teacher is kept either way and is what k-NN evaluates."""
    temperature: float = 0.2
    """InfoNCE temperature (the reference code's NT-Xent uses 0.5)."""
    alpha: float = 1.0
    """Weight of the reconstruction loss, >= 0 (the paper: larger on small data sets)."""
    momentum_teacher: float = 0.996
    """Start of the cosine EMA-momentum schedule (ends at 1)."""
    rotation: bool = False
    """The reference code's rotation prediction: each view turned by a random multiple of 90 degrees, a
    4-way head on the class token, cross-entropy added to the loss."""
    uncertainty_weights: bool = False
    """The reference code's learned per-task weights: sum of adj * exp(-s) * L + s / 2 over the tasks
    (adj 0.5 for L1, 1 otherwise), s learned; alpha is then unused."""

    def __post_init__(self):
        from fastdino.data.masking import CORRUPTION_KINDS
        from fastdino.models.decoder import DECODER_KINDS

        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"sit.mask_ratio={self.mask_ratio} must be in (0, 1)")
        if not 0.0 < self.max_block <= 1.0:
            raise ConfigError(f"sit.max_block={self.max_block} must be in (0, 1]")
        _positive("sit.min_block", self.min_block)
        kinds = [k.strip() for k in self.corruption.split(",")]
        for kind in kinds:
            if kind not in CORRUPTION_KINDS:
                raise ConfigError(f"sit.corruption={self.corruption!r}: unknown kind {kind!r}, use a comma-separated "
                                  f"list of {CORRUPTION_KINDS}")
        for key in ("keep_prob", "grey_prob", "blur_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"sit.{key}={getattr(self, key)} must be in [0, 1]")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"sit.blur_sigma={list(self.blur_sigma)} must satisfy 0 < low <= high")
        _choice("sit.recons_pixels", self.recons_pixels, ("masked", "all"))
        _choice("sit.decoder", self.decoder, DECODER_KINDS)
        _choice("sit.contrastive_target", self.contrastive_target, ("momentum", "online"))
        for key in ("decoder_hidden_dim", "decoder_depth", "proj_dim", "temperature"):
            _positive(f"sit.{key}", getattr(self, key))
        _positive("sit.proj_hidden_dim", self.proj_hidden_dim, allow_zero=True)
        _positive("sit.alpha", self.alpha, allow_zero=True)
        if not 0.0 <= self.momentum_teacher <= 1.0:
            raise ConfigError(f"sit.momentum_teacher={self.momentum_teacher} must be in [0, 1]")

    def corruption_kinds(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.corruption.split(","))


@dataclass(kw_only=True)
class DataConfig:
    path: str = ""
    """Folder of images (class sub-folders optional); `demo` generates the embedded demo set."""
    global_size: int = 224
    local_size: int = 96
    local_crops_number: int = 10
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range in output pixels (the paper's, for 224 px crops; scale it for tiny crops)."""
    color_strength: float = 1.0
    """Multiplies the paper's colour jitter (0.4, 0.4, 0.2, 0.1); hue is capped at 0.5."""
    batch_size: int = 64
    """Per process; the global batch is batch_size * world size."""
    num_workers: int = 8
    backend: str = "auto"
    """auto | cpu | torch_gpu | dali: where images are decoded and augmented (docs/data.md, "Backends"); auto
    takes dali when installed and training runs on a GPU, else torch_gpu on a GPU, else cpu."""

    def __post_init__(self):
        from fastdino.data.loader import DATA_BACKENDS

        _choice("data.backend", self.backend, DATA_BACKENDS)
        _positive("data.global_size", self.global_size)
        _positive("data.local_size", self.local_size)
        _positive("data.batch_size", self.batch_size)
        _positive("data.local_crops_number", self.local_crops_number, allow_zero=True)
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.color_strength", self.color_strength, allow_zero=True)
        for key in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, key)
            if not 0.0 < lo <= hi <= 1.0:
                raise ConfigError(f"data.{key}={[lo, hi]} must satisfy 0 < low <= high <= 1", f"data.{key}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(
                f"data.blur_sigma={list(self.blur_sigma)} must satisfy 0 < low <= high", "data.blur_sigma"
            )


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """The optimizer, as the official `--optimizer` (engine/optim.py): adamw (torch AdamW) | sgd (torch SGD, momentum
    0.9: the official ResNet-50 recipe, configs/resnet50.yaml) | lars (the official `utils.LARS`: momentum 0.9, trust
    ratio 0.001, no weight decay and no adaptation on 1-D parameters). Same lr / weight-decay schedules for all."""
    lr: float = 0.0005
    """Peak learning rate per 256 images of global batch (linear scaling rule)."""
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    """Per-parameter gradient-norm clip as the official code; 0 disables."""
    fused: bool = True
    """torch's fused AdamW / SGD kernel (CUDA and CPU): one launch for every parameter, and it skips a non-finite
    step on the device; false: torch's foreach implementation, which reads that flag on the host (one sync per
    step). LARS is fastdino's own foreach implementation, which skips on the device either way."""

    def __post_init__(self):
        _choice("optim.name", self.name, OPTIMIZERS)
        _positive("optim.lr", self.lr)
        for key in ("min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad"):
            _positive(f"optim.{key}", getattr(self, key), allow_zero=True)


@dataclass(kw_only=True)
class LossConfig:
    impl: str = "auto"
    """auto (Triton kernel on CUDA, PyTorch reference elsewhere) | triton | torch."""

    def __post_init__(self):
        from fastdino.losses.dino import LOSS_IMPLS

        _choice("loss.impl", self.impl, LOSS_IMPLS)


@dataclass(kw_only=True)
class EmaConfig:
    impl: str = "auto"
    """auto (Triton kernel on CUDA, torch._foreach elsewhere) | triton | foreach."""

    def __post_init__(self):
        _choice("ema.impl", self.impl, ("auto", "triton", "foreach"))


@dataclass(kw_only=True)
class TrainConfig:
    method: str = "dino"
    """The self-supervised method: dino | sit (methods/)."""
    epochs: int = 100
    max_steps: int = 0
    """Stop after this many iterations (schedules still span `epochs`); 0 runs every epoch."""
    output_dir: str = "runs/dino"
    resume: str = "auto"
    """auto (continue from output_dir/last.pt if present) | none | a checkpoint path."""
    init_from: str = ""
    """Start a fresh run (iteration 0, new optimizer) from a checkpoint's weights: fastdino or official DINO (full:
    student, teacher, center; backbone-only: both backbones), or a timm / transformers ViT (a model folder, a
    .safetensors file or a state dict: both backbones). Ignored when the run resumes. "" = off."""
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda."""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (with a GradScaler)."""
    engine: str = "ddp"
    """ddp (torchrun / DDP, and the single process) | deepspeed (ZeRO stage 1 or 2 from train.deepspeed_config;
    needs the `.[deepspeed]` extra). engine/backends/ holds one file per engine."""
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON (engine=deepspeed): ZeRO stage 1 or 2 and fp16 loss scaling; the batch sizes, precision,
    optimizer and clipping come from this config and must not be set there. A relative path is looked up in
    the working directory, then in the fastdino source tree."""
    log_every: int = 20
    ckpt_every: int = 500
    """Iterations between checkpoints (one is also written at each epoch end)."""
    dist_timeout: int = 600
    """Seconds a process waits in a collective (all-reduce, barrier) for the others before it stops with an error,
    when several processes train: a peer that died or hangs ends the run instead of blocking it forever."""
    knn_eval: bool = True
    """After training, k-NN top-1 of the random-init and trained teacher (needs labelled data.path/train, /val)."""
    allow_config_change: bool = False
    """Resume even when settings that change the run's trajectory (lr, temperatures, augmentation, ...) differ
    from the checkpoint's; they are listed in the log. A change of the global batch or of the image set is
    always refused (the place in the data order would not map)."""
    stop_signals: str = "SIGTERM,SIGUSR1"
    """Signals that stop the run cleanly (comma-separated; "" = none): the step in flight finishes, every process
    stops at the same iteration, last.pt is written there and the exit code is 128 + the signal's number (143 for
    SIGTERM, 138 for SIGUSR1). SLURM's `--signal`, Kubernetes and torchrun send them; docs/preemption.md."""
    knn_every: int = 0
    """Also a k-NN pass every this many epochs during training (logged, drawn in curves.png); 0 = off. Needs
    train.knn_eval. Does not change the training itself (the passes leave the RNG state as they found it)."""

    def __post_init__(self):
        _choice("train.method", self.method, METHODS)
        _positive("train.epochs", self.epochs)
        _positive("train.max_steps", self.max_steps, allow_zero=True)
        _positive("train.log_every", self.log_every)
        _positive("train.ckpt_every", self.ckpt_every)
        _positive("train.dist_timeout", self.dist_timeout)
        _positive("train.knn_every", self.knn_every, allow_zero=True)
        if self.knn_every and not self.knn_eval:
            raise ConfigError(f"train.knn_every={self.knn_every} needs train.knn_eval=true (or set train.knn_every=0)")
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        if not self.output_dir.strip():
            raise ConfigError("train.output_dir is empty: name the run's folder (e.g. runs/my_run)", "train.output_dir")
        if not self.resume.strip():
            raise ConfigError("train.resume is empty: use auto, none or a checkpoint path", "train.resume")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"train.seed={self.seed} must be in [0, 2**32)", "train.seed")
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("train.engine", self.engine, ("ddp", "deepspeed"))
        try:
            parse_stop_signals(self.stop_signals)
        except ValueError as exc:
            raise ConfigError(f"train.stop_signals={self.stop_signals!r}: {exc}", "train.stop_signals") from None


@dataclass(kw_only=True)
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 128

    def __post_init__(self):
        _positive("eval.knn_k", self.knn_k)
        _positive("eval.knn_temperature", self.knn_temperature)
        _positive("eval.batch_size", self.batch_size)


@dataclass(kw_only=True)
class HealthConfig:
    """Collapse and divergence watch (engine/health.py); signals are computed only on log steps."""

    enabled: bool = True
    """Compute the health signals on log steps, log them and watch them."""
    on_collapse: str = "warn"
    """warn (log a warning, go on) | stop (raise before the unhealthy state is checkpointed; last.pt stays)."""
    warn_every: int = 500
    """Iterations between repeated warnings of one kind while it holds."""
    patience: int = 2
    """Consecutive log steps a condition must hold before it is reported (one noisy step is not a collapse)."""
    grace_steps: int = 0
    """Iterations from the start of training during which collapse is not reported (divergence always is)."""
    uniform_entropy_ratio: float = 0.98
    """Collapse to uniform: mean teacher entropy above this fraction of log K."""
    one_dim_entropy_ratio: float = 0.1
    """Collapse to one dimension: entropy of the batch-mean teacher distribution below this fraction of log K."""
    feature_std_ratio: float = 0.05
    """Feature collapse: std of the L2-normalised features across the batch below this multiple of 1/sqrt(D)."""
    divergence_factor: float = 100.0
    """Divergence: loss or gradient norm above this multiple of its median over recent healthy log steps."""
    min_loss_scale: float = 1.0
    """Divergence under fp16: the GradScaler's scale fell below this (the step overflows again and again)."""

    def __post_init__(self):
        _choice("health.on_collapse", self.on_collapse, ("warn", "stop"))
        _positive("health.warn_every", self.warn_every)
        _positive("health.patience", self.patience)
        _positive("health.grace_steps", self.grace_steps, allow_zero=True)
        for key in ("uniform_entropy_ratio", "one_dim_entropy_ratio"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"health.{key}={getattr(self, key)} must be in (0, 1)", f"health.{key}")
        _positive("health.feature_std_ratio", self.feature_std_ratio, allow_zero=True)
        if self.divergence_factor <= 1.0:
            raise ConfigError(
                f"health.divergence_factor={self.divergence_factor} must be > 1", "health.divergence_factor"
            )
        _positive("health.min_loss_scale", self.min_loss_scale, allow_zero=True)


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    sit: SitConfig = field(default_factory=SitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def __post_init__(self):
        """Checks across sections; each names the key to change."""
        from fastdino.models.backbones import is_vit

        vit = is_vit(self.model.arch)
        if not vit and self.train.method != "dino":
            raise ConfigError(
                f"train.method={self.train.method!r} reads the ViT's patch tokens; model.arch={self.model.arch!r} is a "
                "convnet: use a ViT (vit_tiny | vit_small | vit_base) or train.method=dino",
                ("train.method", "model.arch"))
        patch = self.model.patch_size
        for key in ("global_size", "local_size") if vit else ():
            size = getattr(self.data, key)
            if size % patch or size < patch:
                near = max(patch, round(size / patch) * patch)
                raise ConfigError(
                    f"data.{key}={size} is not a multiple of model.patch_size={patch} (the patch embedding would "
                    f"drop {size % patch} pixel rows and columns): use {near}", (f"data.{key}", "model.patch_size")
                )
        if self.optim.name == "lars" and self.train.engine == "deepspeed":
            raise ConfigError(
                "optim.name=lars needs each parameter whole (its trust ratio is a per-parameter norm); train.engine="
                "deepspeed hands the optimizer flat ZeRO partitions: use optim.name=sgd or adamw, or train.engine=ddp",
                ("optim.name", "train.engine"))
        if self.train.init_from and self.train.method != "dino":
            raise ConfigError(
                f"train.init_from reads DINO checkpoints (fastdino or official); train.method={self.train.method!r} "
                "cannot start from one: leave train.init_from empty", ("train.init_from", "train.method")
            )


def schedule_errors(cfg: Config) -> list[ConfigError]:
    """Warm-ups longer than the run (train.epochs), which training refuses: one ConfigError each, naming both keys.

    Not a check of Config itself: load_config raises the first (unless schedules=False) and so does the Trainer,
    while `fastdino budget`, which asks how long train.epochs would take, only reports them."""
    out = []
    epochs = cfg.train.epochs
    if cfg.dino.warmup_teacher_temp_epochs > epochs:
        out.append(ConfigError(
            f"dino.warmup_teacher_temp_epochs={cfg.dino.warmup_teacher_temp_epochs} is longer than the run "
            f"(train.epochs={epochs}): the teacher would never reach dino.teacher_temp; shorten the warm-up",
            ("dino.warmup_teacher_temp_epochs", "train.epochs"),
        ))
    if cfg.optim.warmup_epochs > epochs:
        out.append(ConfigError(
            f"optim.warmup_epochs={cfg.optim.warmup_epochs} is longer than the run (train.epochs={epochs}): "
            "the learning rate would never reach optim.lr; shorten the warm-up",
            ("optim.warmup_epochs", "train.epochs"),
        ))
    return out


def schedule_warnings(cfg: Config, steps_per_epoch: int) -> list[str]:
    """Settings that are legal but keep a schedule from reaching its target, one line each naming the keys.

    Schedules span train.epochs (train.max_steps only stops early), so a short max_steps can end a run
    inside a warm-up."""
    out = []
    epochs, stop = cfg.train.epochs, cfg.train.max_steps
    if cfg.optim.warmup_epochs == epochs and epochs > 0:
        out.append(f"optim.warmup_epochs = train.epochs = {epochs}: the learning rate warms up for the whole run and "
                   "never decays to optim.min_lr")
    dino = cfg.train.method == "dino"  # the dino.* schedules mean nothing to another method
    if dino and cfg.dino.freeze_last_layer_epochs >= epochs:
        out.append(f"dino.freeze_last_layer_epochs={cfg.dino.freeze_last_layer_epochs} >= train.epochs={epochs}: the "
                   "head's last layer never trains")
    for key, warm in (("optim.warmup_epochs", cfg.optim.warmup_epochs),
                      ("dino.warmup_teacher_temp_epochs", cfg.dino.warmup_teacher_temp_epochs if dino else 0)):
        if stop and warm and stop < warm * steps_per_epoch:
            out.append(f"train.max_steps={stop} stops the run inside the {warm}-epoch {key} warm-up "
                       f"({warm * steps_per_epoch} iterations): its target is never reached")
    return out


# Signals that cannot stop a run: uncatchable ones, Ctrl-C's (KeyboardInterrupt, exit 130) and the ones the
# DataLoader, faults and the terminal use.
NOT_STOP_SIGNALS = ("SIGKILL", "SIGSTOP", "SIGINT", "SIGCHLD", "SIGPIPE", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL",
                    "SIGABRT", "SIGTTIN", "SIGTTOU", "SIGTSTP", "SIGCONT", "SIGWINCH")


def parse_stop_signals(text: str) -> tuple[signal.Signals, ...]:
    """train.stop_signals: 'SIGTERM,SIGUSR1' (or 'TERM,USR1', or '' for none) -> the signals; raises ValueError
    naming a bad one."""
    out = []
    for name in (n.strip().upper() for n in text.split(",") if n.strip()):
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal.Signals, name, None)
        if sig is None or name in NOT_STOP_SIGNALS:
            raise ValueError(f"{name} cannot be a stop signal (use e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGHUP)")
        if sig not in out:
            out.append(sig)
    return tuple(out)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, lists become tuples."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value!r} must be a finite number", key)
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
    else:
        raise TypeError(f"unsupported annotation {tp} for {key}")
    name = getattr(tp, "__name__", str(tp))
    quote = tp is str and isinstance(value, bool)
    hint = " (YAML reads off / on / yes / no as booleans: quote the word)" if quote else ""
    if tp is str and isinstance(value, (list, tuple)):
        hint = f" (a list given: write it as one comma-separated string, {key}={','.join(map(str, value))})"
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {name}{hint}", key)


def _unknown(key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint}", key)


def _build(cls: type, values: dict, prefix: str):
    if not isinstance(values, dict):
        section = prefix.rstrip(".") or None
        raise ConfigError(f"{section or 'config'} must be a mapping, got {values!r}", section)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise _unknown(prefix + str(name), [prefix + f for f in fields])
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f, tp in typing.get_type_hints(cls).items():
        keys += _all_keys(tp, f"{prefix}{f}.") if dataclasses.is_dataclass(tp) else [prefix + f]
    return keys


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings to a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict = {}
    valid = _all_keys()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: {item!r} is not of the form section.key=value")
        if key not in valid:
            raise ConfigError(f"command line: {_unknown(key, valid)}", key)
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise ConfigError(f"command line: {item!r}: the value is not valid YAML", key) from None
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently, so a
    second `model:` section would drop the first). Merge keys (`<<: *defaults`) work as in yaml.safe_load: the
    mapping's own keys override the merged ones."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # expanded by SafeConstructor.flatten_mapping
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one section", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, schedules: bool = True) -> Config:
    """YAML file (only what differs from the defaults) plus overrides -> a validated Config; raises ConfigError
    naming the key and where its value came from (the file or the command line).

    schedules=False leaves out schedule_errors (warm-ups longer than the run), for `fastdino budget`."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder: name a YAML file (e.g. configs/vit_small16.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text file: name a YAML file") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML{at}: {problem}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        # top-level `x-...` keys hold YAML anchors for merge keys (`x-optim: &o {...}`, then `<<: *o`), as in
        # docker-compose files: not settings
        values = {k: v for k, v in values.items() if not (isinstance(k, str) and k.startswith("x-"))}
    from_command_line = parse_overrides(list(overrides))
    try:
        cfg = _build(Config, _merge(values, from_command_line), "")
        if schedules and (errors := schedule_errors(cfg)):
            raise errors[0]
        return cfg
    except ConfigError as exc:
        # name where the offending value came from: the command line or the file
        keys = exc.key if isinstance(exc.key, tuple) else (exc.key,)
        if path is None or any(k is not None and _leaf(from_command_line, k) for k in keys):
            raise ConfigError(f"command line: {exc}", exc.key) from None
        raise ConfigError(f"{path}: {exc}", exc.key) from None


def _leaf(nested: dict, key: str) -> bool:
    """Whether `key` (a.b) is set in the nested dict."""
    node = nested
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML dumps and checkpoints."""

    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {
        f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
        for f in dataclasses.fields(cfg)
    }


def config_from_dict(values: dict) -> Config:
    return _build(Config, values, "")

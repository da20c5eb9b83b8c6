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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wartok_cli.errors import WartokError


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the images come from and how they are turned into shards."""

    source: Literal["bundled", "idx"] = Field(
        "bundled",
        description="Image source: 'bundled' (the Fashion-MNIST subset shipped with wartok) "
        "or 'idx' (MNIST-format IDX files named below).",
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
    max_train_images: Optional[int] = Field(None, ge=1, description="Use at most this many training images.")
    max_val_images: Optional[int] = Field(None, ge=1, description="Use at most this many validation images.")
    samples_per_shard: int = Field(1000, ge=1, description="Images per WebDataset shard.")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per training process.")
    shuffle_buffer: int = Field(1000, ge=1, description="Size of the sample shuffle buffer, in images.")
    num_classes: int = Field(10, ge=0, description="Number of class labels; 0 for unlabelled data.")


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

    width: int = Field(128, ge=8, description="Transformer width (embedding dimension).")
    depth: int = Field(4, ge=1, description="Number of transformer blocks.")
    heads: int = Field(4, ge=1, description="Attention heads; must divide the width.")
    mlp_ratio: float = Field(4.0, gt=0, description="Hidden size of the SwiGLU MLP relative to the width.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability inside the blocks.")
    class_dropout: float = Field(
        0.1, ge=0, le=1, description="Probability of replacing the class label by the null class during training."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "PriorConfig":
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
        return self


class ReconstructionConfig(Section):
    """Weights of the reconstruction objective, shared by pretraining and wAR-Tok."""

    mse_weight: float = Field(1.0, ge=0, description="Weight of the mean squared error.")
    l1_weight: float = Field(0.0, ge=0, description="Weight of the mean absolute error.")
    vq_weight: float = Field(1.0, ge=0, description="Weight of the VQ loss (codebook plus commitment).")


class TrainConfig(Section):
    """Settings of one training stage."""

    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Global batch size, split evenly over processes.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate of the cosine decay, relative to lr.")
    warmup_steps: int = Field(100, ge=0, description="Steps of linear learning-rate warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="Clip the global gradient norm to this; null disables.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast precision: 'no' (fp32), 'bf16' (CPU and GPU) or 'fp16' (GPU only)."
    )
    ema_decay: float = Field(0.999, ge=0, lt=1, description="Decay of the exponential moving average of the weights.")
    log_every: int = Field(50, ge=1, description="Steps between log lines and metric rows.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints to keep.")
    preview_every: int = Field(500, ge=1, description="Steps between preview image grids.")


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
    eval_batches: int = Field(20, ge=1, description="Validation batches for the gLoss reported during training.")


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
        if self.data.source == "idx":
            missing = [name for name in ("train_images", "val_images") if getattr(self.data, name) is None]
            if missing:
                raise ValueError(f"data.source 'idx' needs data.{' and data.'.join(missing)}")
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

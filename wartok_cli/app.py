"""The ``wartok`` command line: parses arguments, loads the recipe, calls a stage.

No training or data logic lives here. A ``WartokError`` (a mistake the user
can fix) becomes a short message and exit status 2, with no traceback.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from wartok_cli import __version__
from wartok_cli.errors import WartokError
from wartok_cli.logs import setup_logging
from wartok_cli.pipeline import Stage
from wartok_cli.recipe import Recipe, load_recipe

app = typer.Typer(
    name="wartok",
    help="Train discrete image tokenizers whose tokens an autoregressive prior predicts well (wAR-Tok).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Check, show and describe recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
stderr = Console(stderr=True)
log = logging.getLogger("wartok")

RecipeArgument = typer.Argument(..., help="Path of the YAML recipe.", show_default=False)
OptionalRecipeArgument = typer.Argument(
    None, help="Path of the YAML recipe; without it, the quickstart recipe shipped with wartok.", show_default=False
)
SetOption = typer.Option(
    [], "--set", "-s", help="Override a recipe field, e.g. --set pretrain.steps=200. Repeatable.", show_default=False
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wartok {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """wartok: wAR-Tok tokenizer training from YAML recipes."""
    setup_logging(verbose=verbose, quiet=quiet)


def _close_process_group() -> None:
    """Wait for every process, then close the process group of a multi-process launch.

    Without this, a rank that finishes first (evaluate leaves the metrics to the main process)
    exits while gloo threads still run, and the C++ runtime may abort it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def user_errors(function: Callable) -> Callable:
    """Turn a WartokError into a message on stderr and exit status 2."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            result = function(*args, **kwargs)
            _close_process_group()
            return result
        except WartokError as error:
            # The message quotes user input, so it is escaped: "[...]" in a path is not a style tag.
            stderr.print(f"[bold red]error:[/] {escape(str(error))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _load(recipe: Path, overrides: List[str]) -> Recipe:
    return load_recipe(recipe, overrides)


@app.command()
@user_errors
def prepare(
    recipe: Path = RecipeArgument,
    overrides: List[str] = SetOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Write the shards again even if they are complete."),
    download: bool = typer.Option(
        False,
        "--download",
        help="data.source 'cifar10' only: fetch cifar-10-python.tar.gz from its official address into data.path "
        "or the user cache when it is missing, and check the md5 of the file.",
    ),
) -> None:
    """Turn the recipe's image source into WebDataset shards and a manifest."""
    from wartok_cli.data.prepare import prepare as run_prepare

    run_prepare(_load(recipe, overrides), overwrite=overwrite, download=download)


@app.command("pretrain-tokenizer")
@user_errors
def pretrain_tokenizer(recipe: Path = RecipeArgument, overrides: List[str] = SetOption) -> None:
    """Train the tokenizer for reconstruction only (stage 1 of the baseline)."""
    from wartok_cli.train.pretrain import pretrain_tokenizer as run_stage

    run_stage(_load(recipe, overrides))


@app.command("train-prior")
@user_errors
def train_prior(recipe: Path = RecipeArgument, overrides: List[str] = SetOption) -> None:
    """Encode the shards with a tokenizer and train an AR prior on the tokens."""
    from wartok_cli.train.prior import train_prior as run_stage

    run_stage(_load(recipe, overrides))


@app.command("train-wartok")
@user_errors
def train_wartok(recipe: Path = RecipeArgument, overrides: List[str] = SetOption) -> None:
    """Fine-tune the tokenizer with the wAR-Tok prior-matching signal."""
    from wartok_cli.train.wartok import train_wartok as run_stage

    run_stage(_load(recipe, overrides))


@recipe_app.command("validate")
@user_errors
def recipe_validate(recipe: Path = RecipeArgument, overrides: List[str] = SetOption) -> None:
    """Check a recipe (and overrides) without running anything."""
    _load(recipe, overrides)
    typer.echo(f"{recipe}: valid")


@recipe_app.command("show")
@user_errors
def recipe_show(recipe: Path = RecipeArgument, overrides: List[str] = SetOption) -> None:
    """Print the resolved recipe as YAML, with base recipes merged and every default filled in."""
    typer.echo(_load(recipe, overrides).to_yaml(), nl=False)


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the JSON Schema of a recipe, for editors that validate YAML."""
    import json

    typer.echo(json.dumps(Recipe.model_json_schema(), indent=2))


@app.command()
@user_errors
def sample(recipe: Path = RecipeArgument, overrides: List[str] = SetOption) -> None:
    """Draw images from a trained prior, decoded by its tokenizer, into <output_dir>/samples/."""
    from wartok_cli.sample import sample as run_stage

    run_stage(_load(recipe, overrides))


@app.command()
@user_errors
def evaluate(recipe: Path = RecipeArgument, overrides: List[str] = SetOption) -> None:
    """Compute the recipe's evaluate.metrics (reconstruction, rFID, gFID, KID, IS, gLoss) into report.json."""
    from wartok_cli.evaluate.stage import evaluate as run_stage

    run_stage(_load(recipe, overrides))


@app.command()
@user_errors
def pipeline(
    recipe: Optional[Path] = OptionalRecipeArgument,
    overrides: List[str] = SetOption,
    first: Optional[Stage] = typer.Option(None, "--from", help="First stage to run.", show_default=False),
    last: Optional[Stage] = typer.Option(None, "--until", help="Last stage to run.", show_default=False),
) -> None:
    """Run every stage in order, skipping stages whose outputs are complete and resuming interrupted ones.

    With pipeline.baseline, the lambda = 0 baseline runs too and the two are compared in a table.
    On several GPUs: accelerate launch -m wartok_cli pipeline RECIPE.
    """
    from wartok_cli.pipeline import bundled_recipe, run_pipeline

    run_pipeline(_load(recipe if recipe is not None else bundled_recipe(), overrides), first, last)


@app.command()
@user_errors
def compare(
    recipe: Optional[Path] = OptionalRecipeArgument,
    overrides: List[str] = SetOption,
) -> None:
    """Print the lambda = 0 baseline and wAR-Tok side by side from their evaluate reports.

    Reads <output_dir>/evaluate-<pipeline.baseline_run_name> and evaluate-<wartok.run_name>, and writes
    <output_dir>/comparison.json and comparison.md, as `wartok pipeline` does at its end.
    """
    from wartok_cli.pipeline import bundled_recipe, compare_and_report

    compare_and_report(_load(recipe if recipe is not None else bundled_recipe(), overrides))


if __name__ == "__main__":  # pragma: no cover
    app()

"""`wartok pipeline` end to end on the tiny recipe: the chain, the baseline table, skips and resume.

Every stage is real: shards, a few training steps per stage, samples and evaluation. The
recipe leaves FID out of evaluate.metrics, because building the Inception network and
scoring the samples of two chains would take most of the test's time on two CPU cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import describe, invoke, launch_two, tiny_recipe

from wartok_cli.pipeline import bundled_recipe, comparison_rows

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 10  # a multiple of the 10 classes, as balanced labels need
VAL_IMAGES = 16
TRAINING_RUNS = ("tokenizer", "prior", "wartok", "baseline", "prior-wartok", "prior-baseline")
COMPARED = ("gloss", "psnr", "ssim", "codebook_usage", "perplexity")


def pipeline_recipe(output_dir: Path) -> dict:
    """Return the tiny recipe with the baseline on, bf16 training, 10 samples and no FID."""
    recipe = tiny_recipe(output_dir)
    recipe["data"]["max_val_images"] = VAL_IMAGES
    for section in ("pretrain", "train_prior", "wartok"):
        # bf16 training and fp32 evaluation in one process need a fresh Accelerate state per stage.
        recipe[section].update(mixed_precision="bf16", checkpoint_every=3)
    recipe["sample"] = {"num_samples": NUM_SAMPLES, "batch_size": NUM_SAMPLES, "preview": 0}
    recipe["evaluate"] = {"metrics": ["reconstruction", "gloss"], "batch_size": 16}
    recipe["pipeline"] = {"baseline": True}
    return recipe


def final_files(output_dir: Path) -> dict[Path, int]:
    """Return the mtime in nanoseconds of every final weights file, samples file and report."""
    paths = [path for run in TRAINING_RUNS for path in (output_dir / run / "final").glob("*.safetensors")]
    paths += list((output_dir / "samples").glob("*/samples.npz"))
    paths += list(output_dir.glob("evaluate-*/report.json"))
    return {path: path.stat().st_mtime_ns for path in paths}


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    """Point WARTOK_CACHE_DIR at a module folder, for the token caches of every run."""
    root = tmp_path_factory.mktemp("pipeline-command-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WARTOK_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def chain(token_cache, tmp_path_factory) -> dict:
    """Run the whole pipeline once, then record the mtimes of its final files."""
    root = tmp_path_factory.mktemp("pipeline-command")
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(pipeline_recipe(root / "runs"), sort_keys=False))
    result = invoke("pipeline", str(recipe_path))
    assert result.exit_code == 0, describe(result)
    output_dir = root / "runs"
    return {"recipe": recipe_path, "output_dir": output_dir, "result": result, "mtimes": final_files(output_dir)}


def rerun(chain: dict, *arguments: str):
    result = invoke("pipeline", str(chain["recipe"]), *arguments)
    assert result.exit_code == 0, describe(result)
    return result


def test_chain_writes_every_run(chain):
    output_dir = chain["output_dir"]
    for run in TRAINING_RUNS:
        assert (output_dir / run / "metrics.json").is_file(), run
    for run in ("evaluate-wartok", "evaluate-baseline"):
        assert (output_dir / run / "report.json").is_file(), run
    assert len(list((output_dir / "samples").glob("*/samples.npz"))) == 2


def test_chain_final_prior_on_wartok(chain):
    metrics = json.loads((chain["output_dir"] / "prior-wartok" / "metrics.json").read_text())
    assert Path(metrics["tokenizer"]).name == "wartok"


def test_chain_baseline_weight_zero(chain):
    resolved = yaml.safe_load((chain["output_dir"] / "baseline" / "recipe.resolved.yaml").read_text())
    assert resolved["wartok"]["weight"] == 0.0


def test_chain_baseline_same_steps(chain):
    resolved = yaml.safe_load((chain["output_dir"] / "baseline" / "recipe.resolved.yaml").read_text())
    assert resolved["wartok"]["steps"] == tiny_recipe(Path("x"))["wartok"]["steps"]


def test_chain_evaluates_own_prior(chain):
    report = json.loads((chain["output_dir"] / "evaluate-baseline" / "report.json").read_text())
    assert Path(report["prior"]["path"]).name == "prior-baseline"


def test_comparison_json_metrics(chain):
    comparison = json.loads((chain["output_dir"] / "comparison.json").read_text())
    for column in ("baseline", "wartok"):
        assert sorted(comparison[column]["metrics"]) == sorted(COMPARED), column


def test_comparison_sample_count(chain):
    comparison = json.loads((chain["output_dir"] / "comparison.json").read_text())
    assert comparison["num_samples"] == NUM_SAMPLES


def test_comparison_markdown_rows(chain):
    markdown = (chain["output_dir"] / "comparison.md").read_text()
    assert "| gLoss (nats/token) |" in markdown


def test_comparison_table_printed(chain):
    assert "baseline and wAR-Tok after 6 train-wartok steps each" in chain["result"].output


def test_second_run_skips_everything(chain):
    result = rerun(chain)
    assert final_files(chain["output_dir"]) == chain["mtimes"]
    assert "running" not in result.output


def test_from_until_selects_stages(chain):
    output_dir = chain["output_dir"]
    samples = min((output_dir / "samples").glob("prior-wartok-*"))
    shutil.rmtree(samples)
    report = output_dir / "evaluate-wartok" / "report.json"
    before = report.stat().st_mtime_ns
    result = rerun(chain, "--from", "sample", "--until", "sample")
    assert (samples / "samples.npz").is_file()
    assert report.stat().st_mtime_ns == before
    assert "train-prior" not in result.output.split("pipeline:", 2)[1].splitlines()[0]


def test_until_prepare_only(chain, tmp_path):
    result = invoke("pipeline", str(chain["recipe"]), "--until", "prepare", "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 0, describe(result)
    assert (tmp_path / "data" / "manifest.json").is_file()
    assert not (tmp_path / "tokenizer").exists()


def test_interrupted_stage_resumes(chain):
    output_dir = chain["output_dir"]
    run = output_dir / "prior-wartok"
    # An interruption after the checkpoint of step 3: no step-6 checkpoint, no final weights, no later stages.
    shutil.rmtree(run / "final")
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-0000006")
    for folder in (output_dir / "samples").glob("prior-wartok-*"):
        shutil.rmtree(folder)
    (output_dir / "evaluate-wartok" / "report.json").unlink()
    untouched = output_dir / "wartok" / "final" / "tokenizer.safetensors"
    before = untouched.stat().st_mtime_ns

    result = rerun(chain)
    assert "at step 3" in result.output
    assert (run / "final" / "prior.safetensors").is_file()
    assert len(list((output_dir / "samples").glob("prior-wartok-*/samples.npz"))) == 1
    assert (output_dir / "evaluate-wartok" / "report.json").is_file()
    assert untouched.stat().st_mtime_ns == before


def test_compare_command_rewrites_same_table(chain):
    path = chain["output_dir"] / "comparison.json"
    written = json.loads(path.read_text())
    path.unlink()
    result = invoke("compare", str(chain["recipe"]))
    assert result.exit_code == 0, describe(result)
    assert json.loads(path.read_text()) == written
    assert "baseline and wAR-Tok after 6 train-wartok steps each" in result.output


def test_compare_without_reports_names_file(chain, tmp_path):
    result = invoke("compare", str(chain["recipe"]), "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 2, describe(result)
    assert str(tmp_path / "evaluate-baseline" / "report.json") in result.output.replace("\n", "")


def test_from_after_until_rejected(chain):
    result = invoke("pipeline", str(chain["recipe"]), "--from", "sample", "--until", "prepare")
    assert result.exit_code == 2, describe(result)
    assert "--from sample comes after --until prepare" in result.output


def test_baseline_name_clash_rejected(chain):
    result = invoke("pipeline", str(chain["recipe"]), "--set", "pipeline.baseline_run_name=wartok")
    assert result.exit_code == 2, describe(result)
    assert "pipeline.baseline_run_name" in result.output


def test_compare_name_clash_rejected(chain):
    result = invoke("compare", str(chain["recipe"]), "--set", "pipeline.baseline_run_name=wartok")
    assert result.exit_code == 2, describe(result)
    assert "pipeline.baseline_run_name" in result.output


def test_bundled_recipe_matches_repository():
    assert bundled_recipe().read_text() == (REPO / "recipes" / "quickstart.yaml").read_text()


def test_no_recipe_runs_bundled(tmp_path):
    result = invoke(
        "pipeline", "--until", "prepare", "--set", f"output_dir={tmp_path}", "--set", "data.max_train_images=64",
        "--set", "data.max_val_images=16", "--set", "data.num_workers=0",
    )  # fmt: skip
    assert result.exit_code == 0, describe(result)
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["splits"]["train"]["count"] == 64


def test_comparison_rows_gfid_label():
    comparison = {
        "num_samples": 50,
        "metrics": ["gloss", "gfid"],
        "baseline": {"metrics": {"gloss": 3.0, "gfid": 20.0}},
        "wartok": {"metrics": {"gloss": 2.5, "gfid": 18.0}},
    }
    rows = comparison_rows(comparison)
    assert rows[1] == ("gFID (50 samples)", "20.0000", "18.0000", "-2.0000")


def test_comparison_rows_missing_metric():
    comparison = {
        "num_samples": 50,
        "metrics": ["gloss", "gfid"],
        "baseline": {"metrics": {"gloss": 3.0}},
        "wartok": {"metrics": {"gloss": 2.5}},
    }
    assert [row[0] for row in comparison_rows(comparison)] == ["gLoss (nats/token)"]


def test_two_processes_run_and_skip_the_chain(token_cache, tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(pipeline_recipe(tmp_path / "runs"), sort_keys=False))
    first = launch_two(["pipeline", str(recipe_path)], tmp_path, token_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    output_dir = tmp_path / "runs"
    for run in TRAINING_RUNS:
        assert (output_dir / run / "final").is_dir(), run
    report = json.loads((output_dir / "evaluate-wartok" / "report.json").read_text())
    assert report["processes"] == 2
    assert (output_dir / "comparison.json").is_file()
    mtimes = final_files(output_dir)

    # The main process finds every stage complete and sends that to the other rank, so both skip them all.
    second = launch_two(["pipeline", str(recipe_path)], tmp_path, token_cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert final_files(output_dir) == mtimes
    assert "pipeline: running" not in second.stdout + second.stderr


def test_compare_without_recipe_uses_bundled(tmp_path):
    result = invoke("compare", "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 2, describe(result)
    assert "evaluate-baseline" in result.output

"""The AR prior: causality, the key/value cache, presets, the token cache and train-prior on the bundled images."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import CODEBOOK_SIZE, RESOLUTION, describe, invoke, launch_two, tiny_recipe
from safetensors.torch import load_file

import wartok_cli
from wartok_cli.data.loader import make_loader
from wartok_cli.export import save_model, weights_hash
from wartok_cli.models import ARPrior, ConvTokenizer
from wartok_cli.models.prior import POSITION_MODES
from wartok_cli.recipe import load_recipe
from wartok_cli.train.prior import build_prior
from wartok_cli.train.tokens import cache_path, load_tokens

SEQ_LEN = 12
NUM_CLASSES = 4


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def make_prior(positions: str, seed: int = 0) -> ARPrior:
    torch.manual_seed(seed)
    prior = ARPrior(CODEBOOK_SIZE, SEQ_LEN, NUM_CLASSES, width=16, depth=2, heads=2, positions=positions)
    return prior.eval()


def random_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(CODEBOOK_SIZE, (3, SEQ_LEN), generator=generator)
    return tokens, torch.tensor([0, 3, -1])


# The model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", POSITION_MODES)
@pytest.mark.parametrize("changed", [0, 5, SEQ_LEN - 1])
def test_causal_earlier_logits_unchanged(positions, changed):
    # Position j predicts token j from tokens 0..j-1, so token t may only affect positions after t.
    prior = make_prior(positions)
    tokens, labels = random_batch()
    edited = tokens.clone()
    edited[:, changed] = (edited[:, changed] + 1) % CODEBOOK_SIZE
    with torch.no_grad():
        before, after = prior(tokens, labels), prior(edited, labels)
    assert torch.equal(before[:, : changed + 1], after[:, : changed + 1])


@pytest.mark.parametrize("positions", POSITION_MODES)
def test_causal_next_logits_change(positions):
    prior = make_prior(positions)
    tokens, labels = random_batch()
    edited = tokens.clone()
    edited[:, 4] = (edited[:, 4] + 1) % CODEBOOK_SIZE
    with torch.no_grad():
        before, after = prior(tokens, labels), prior(edited, labels)
    assert not torch.allclose(before[:, 5], after[:, 5])


@pytest.mark.parametrize("positions", POSITION_MODES)
def test_kv_cache_matches_forward(positions):
    prior = make_prior(positions)
    tokens, labels = random_batch()
    with torch.no_grad():
        full = prior(tokens, labels)
        cache = prior.new_cache(len(tokens))
        stepped = [prior.step(cache, labels=labels)]
        stepped += [prior.step(cache, tokens[:, position - 1]) for position in range(1, SEQ_LEN)]
    torch.testing.assert_close(torch.stack(stepped, dim=1), full, rtol=1e-5, atol=1e-5)


def test_step_full_cache_raises():
    prior = make_prior("rope")
    tokens, labels = random_batch()
    cache = prior.new_cache(len(tokens))
    with torch.no_grad():
        prior.step(cache, labels=labels)
        for position in range(1, SEQ_LEN):
            prior.step(cache, tokens[:, position - 1])
        with pytest.raises(ValueError, match="full"):
            prior.step(cache, tokens[:, -1])


def test_rope_has_no_position_table():
    assert not [name for name in make_prior("rope").state_dict() if "position" in name]


def test_rope_export_round_trip(tmp_path):
    prior = make_prior("rope")
    save_model(tmp_path / "final", "prior", prior)
    loaded = wartok_cli.load_prior(tmp_path)
    tokens, labels = random_batch()
    with torch.no_grad():
        assert torch.equal(loaded(tokens, labels), prior(tokens, labels))


def test_rope_odd_head_dim_rejected():
    with pytest.raises(ValueError, match="even head dimension"):
        ARPrior(CODEBOOK_SIZE, SEQ_LEN, width=18, heads=6, positions="rope")


# Presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "expected"), [("cifar10", (512, 13, 8)), ("gpt-b", (768, 12, 12))])
def test_preset_fills_architecture(preset, expected):
    prior = load_recipe(None, [f"prior.preset={preset}"]).prior
    assert (prior.width, prior.depth, prior.heads) == expected


def test_preset_explicit_field_wins():
    prior = load_recipe(None, ["prior.preset=gpt-b", "prior.depth=2"]).prior
    assert (prior.width, prior.depth, prior.heads) == (768, 2, 12)


def test_preset_builds_prior():
    prior = build_prior(load_recipe(None, ["prior.preset=tiny", "prior.positions=rope"]))
    assert (prior.config["width"], len(prior.blocks), prior.config["positions"]) == (64, 2, "rope")


def test_preset_unknown_is_user_error(tmp_path):
    recipe = tiny_recipe(tmp_path / "runs")
    recipe["prior"]["preset"] = "huge"
    result = invoke("recipe", "validate", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.exit_code == 2, describe(result)
    assert "prior.preset = 'huge'" in result.output


# The token cache ----------------------------------------------------------------------------


class CountedTokenizer:
    """A real tokenizer whose encode calls are counted."""

    def __init__(self, tokenizer: ConvTokenizer) -> None:
        self.tokenizer = tokenizer
        self.num_tokens = tokenizer.num_tokens
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        return self.tokenizer.encode(images)


def save_tokenizer(folder: Path, seed: int) -> ConvTokenizer:
    torch.manual_seed(seed)
    tokenizer = ConvTokenizer(resolution=RESOLUTION, channels=1, base_channels=8, channel_mult=(1, 2),
                              codebook_size=CODEBOOK_SIZE, code_dim=4).eval()  # fmt: skip
    save_model(folder / "final", "tokenizer", tokenizer)
    return tokenizer


@pytest.fixture
def token_env(prepared, tmp_path, monkeypatch):
    """Return a saved random tokenizer (counted), its run folder and the shards; the cache is under tmp_path."""
    monkeypatch.setenv("WARTOK_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "tokenizer"
    tokenizer = CountedTokenizer(save_tokenizer(run, seed=0))
    return tokenizer, run, prepared.shards_dir


def extract(tokenizer, run: Path, shards: Path, split: str = "val", flip: bool = False):
    """Return (tokens, labels, cache file) of a split, through the cache."""
    digest = weights_hash(run, "tokenizer")
    tokens, labels = load_tokens(tokenizer, digest, shards, split, 1, Accelerator(cpu=True), flip=flip)
    return tokens, labels, cache_path(digest, shards, split, "flip" if flip else "none")


def val_images(shards: Path) -> torch.Tensor:
    loader = make_loader(shards, "val", batch_size=1000, channels=1, train=False)
    return torch.cat([batch["images"] for batch in loader])


def test_token_cache_reuse_keeps_file(token_env):
    _, _, path = extract(*token_env)
    written = path.stat().st_mtime_ns
    extract(*token_env)
    assert path.stat().st_mtime_ns == written


def test_token_cache_reuse_skips_encoder(token_env):
    tokenizer = token_env[0]
    extract(*token_env)
    calls = tokenizer.calls
    extract(*token_env)
    assert calls > 0
    assert tokenizer.calls == calls


def test_token_cache_rebuilt_new_weights(token_env):
    tokenizer, run, shards = token_env
    _, _, first = extract(*token_env)
    calls = tokenizer.calls
    changed = CountedTokenizer(save_tokenizer(run, seed=1))
    _, _, second = extract(changed, run, shards)
    assert second != first
    assert second.is_file()
    assert changed.calls > 0
    assert tokenizer.calls == calls


def test_token_cache_matches_encoder(token_env):
    tokenizer, _, shards = token_env
    tokens, _, _ = extract(*token_env)
    with torch.no_grad():
        expected = tokenizer.tokenizer.encode(val_images(shards)).indices
    assert torch.equal(tokens, expected)


def test_flip_cache_key_differs(token_env):
    _, _, plain = extract(*token_env)
    _, _, flipped = extract(*token_env, flip=True)
    assert flipped != plain


def test_flip_stores_original_sequences(token_env):
    plain, _, _ = extract(*token_env)
    both, _, _ = extract(*token_env, flip=True)
    assert torch.equal(both[0::2], plain)


def test_flip_stores_mirrored_sequences(token_env):
    tokenizer, _, shards = token_env
    both, _, _ = extract(*token_env, flip=True)
    with torch.no_grad():
        mirrored = tokenizer.tokenizer.encode(val_images(shards).flip(-1)).indices
    assert torch.equal(both[1::2], mirrored)


def test_flip_doubles_labels(token_env):
    _, plain_labels, _ = extract(*token_env)
    _, labels, _ = extract(*token_env, flip=True)
    assert torch.equal(labels, plain_labels.repeat_interleave(2))


# train-prior --------------------------------------------------------------------------------


def prior_recipe(root: Path, pipeline, **train_prior) -> dict:
    """Return the tiny recipe writing into root, reading the session's shards and pretrained tokenizer."""
    recipe = tiny_recipe(root / "runs")
    recipe["data"]["shards_dir"] = str(pipeline.shards_dir)
    recipe["train_prior"].update(tokenizer=str(pipeline.output_dir / "tokenizer"), **train_prior)
    return recipe


LEARN_STEPS = 60
LEARN_LOG_EVERY = 20


@pytest.fixture(scope="module")
def learned(pipeline, tmp_path_factory):
    """Train a one-block prior for 60 steps on the cached tokens of the session's tokenizer."""
    root = tmp_path_factory.mktemp("learned")
    recipe = prior_recipe(root, pipeline, steps=LEARN_STEPS, batch_size=16, lr=3e-3, warmup_steps=5,
                          log_every=LEARN_LOG_EVERY, eval_batches=1, run_name="learned")  # fmt: skip
    path = write_recipe(root / "recipe.yaml", recipe)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WARTOK_CACHE_DIR", str(pipeline.cache_dir))
        result = invoke("train-prior", str(path))
    return {"result": result, "run": root / "runs" / "learned", "pipeline": pipeline}


def test_learned_exits_zero(learned):
    assert learned["result"].exit_code == 0, describe(learned["result"])


def test_learned_gloss_below_uniform(learned):
    # Measured here, on tokens encoded by the test, not read from the run's metrics.
    pipeline = learned["pipeline"]
    tokenizer = wartok_cli.load_tokenizer(pipeline.output_dir / "tokenizer")
    prior = wartok_cli.load_prior(learned["run"])
    loader = make_loader(pipeline.shards_dir, "val", batch_size=1000, channels=1, train=False)
    batch = next(iter(loader))
    with torch.no_grad():
        gloss = prior.loss(tokenizer.encode(batch["images"]).indices, batch["labels"]).item()
    assert gloss < 0.75 * math.log(CODEBOOK_SIZE), gloss


def test_learned_metrics_json_agree(learned):
    metrics = json.loads((learned["run"] / "metrics.json").read_text())
    validation = metrics["validation"]
    assert validation["bits_per_token"] == pytest.approx(validation["gloss"] / math.log(2))
    assert 0 < validation["top1_accuracy"] <= 1
    assert metrics["train"]["gloss"] < metrics["uniform_baseline"]


def test_learned_csv_columns(learned):
    header = (learned["run"] / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    for split in ("train", "val"):
        for name in ("gloss", "bits_per_token", "top1_accuracy"):
            assert f"{split}_{name}" in header, header


def test_learned_csv_rows_filled(learned):
    lines = (learned["run"] / "logs" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [int(row["step"]) for row in rows] == list(range(LEARN_LOG_EVERY, LEARN_STEPS + 1, LEARN_LOG_EVERY))
    assert all(row["val_gloss"] for row in rows)


# Resume -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed(pipeline, tmp_path_factory):
    """Train 6 steps with a checkpoint at step 3, then delete what came after it and run again."""
    root = tmp_path_factory.mktemp("resume")
    recipe = prior_recipe(root, pipeline, steps=6, checkpoint_every=3, log_every=3, eval_batches=1,
                          run_name="resume")  # fmt: skip
    recipe["prior"]["dropout"] = 0.1  # the resumed run must also restore the dropout's random stream
    path = write_recipe(root / "recipe.yaml", recipe)
    run = root / "runs" / "resume"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WARTOK_CACHE_DIR", str(pipeline.cache_dir))
        first = invoke("train-prior", str(path))
        uninterrupted = load_file(str(run / "final" / "prior.safetensors"))
        shutil.rmtree(run / "checkpoints" / "step-0000006")
        shutil.rmtree(run / "final")
        second = invoke("train-prior", str(path))
    resumed_weights = load_file(str(run / "final" / "prior.safetensors"))
    return {"first": first, "second": second, "uninterrupted": uninterrupted, "resumed": resumed_weights}


def test_resume_runs_exit_zero(resumed):
    assert resumed["first"].exit_code == 0, describe(resumed["first"])
    assert resumed["second"].exit_code == 0, describe(resumed["second"])


def test_resume_starts_at_checkpoint(resumed):
    assert "at step 3" in resumed["second"].output


def test_resume_weights_bitwise_equal(resumed):
    uninterrupted, again = resumed["uninterrupted"], resumed["resumed"]
    assert sorted(again) == sorted(uninterrupted)
    differing = [name for name in uninterrupted if not torch.equal(uninterrupted[name], again[name])]
    assert differing == []


# Two processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_tokens(pipeline, tmp_path_factory):
    """Extract tokens on one process (here) and on two (accelerate launch) into separate caches."""
    root = tmp_path_factory.mktemp("tokens2")
    recipe = prior_recipe(root, pipeline, steps=2, log_every=1, eval_batches=1, run_name="two")
    path = write_recipe(root / "recipe.yaml", recipe)
    tokenizer_run = pipeline.output_dir / "tokenizer"
    tokenizer = wartok_cli.load_tokenizer(tokenizer_run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the launched processes run one thread each; keep the same numerics
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WARTOK_CACHE_DIR", str(root / "one"))
            for split in ("train", "val"):
                load_tokens(tokenizer, weights_hash(tokenizer_run, "tokenizer"), pipeline.shards_dir, split, 1,
                            Accelerator(cpu=True))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    result = launch_two(["train-prior", str(path)], root, root / "two")
    return {"result": result, "one": root / "one" / "tokens", "two": root / "two" / "tokens"}


def test_two_process_run_exits_zero(two_process_tokens):
    result = two_process_tokens["result"]
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_process_encodes_once(two_process_tokens):
    stderr = two_process_tokens["result"].stderr
    assert stderr.count("encoded 256 train token sequences (augmentation none) on 2 process(es)") == 1, stderr
    assert stderr.count("encoded 64 val token sequences (augmentation none) on 2 process(es)") == 1, stderr


def test_two_process_cache_files_match(two_process_tokens):
    one = sorted(path.name for path in two_process_tokens["one"].iterdir())
    two = sorted(path.name for path in two_process_tokens["two"].iterdir())
    assert len(one) == 2
    assert two == one


@pytest.mark.parametrize("array", ["tokens", "labels", "keys"])
def test_two_process_cache_arrays_equal(two_process_tokens, array):
    for path in two_process_tokens["one"].iterdir():
        with np.load(path) as single, np.load(two_process_tokens["two"] / path.name) as double:
            assert np.array_equal(single[array], double[array]), path.name

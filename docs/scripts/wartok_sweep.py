"""Sweep wAR-Tok settings against the lambda = 0 control and tabulate gLoss against PSNR.

    python docs/scripts/wartok_sweep.py recipes/fashion-mnist/sweep.yaml \
        --variants frozen ema online target_only --weights 0.3 1 3 --seeds 0 1

The chain runs through the wartok CLI, one subprocess per stage, as a user's
script would: prepare, pretrain-tokenizer and the target prior once; then, per
seed, the control (train-wartok with lambda = 0 for the same number of steps)
and every (variant, lambda) pair, each followed by a fresh prior trained with
the same recipe on that tokenizer's tokens. A finished run is skipped, so an
interrupted sweep continues where it stopped. The table goes to
<output_dir>/sweep.md and sweep.csv, and the plot to sweep.png when matplotlib
is installed.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from wartok_cli.recipe import load_recipe

VARIANTS = {
    "frozen": ["wartok.target=frozen"],
    "frozen-fit": ["wartok.target=frozen", "wartok.aux_init=fit", "wartok.aux_fit_steps=100"],
    "ema": ["wartok.target=ema"],
    "online": ["wartok.target=online"],
    "target_only": ["wartok.contrast=target_only"],
}


def run_stage(command: str, recipe: str, overrides: list[str], marker: Path) -> float:
    """Run one wartok subcommand unless its marker file exists; return the wall time in seconds."""
    if marker.exists():
        return 0.0
    arguments = [sys.executable, "-m", "wartok_cli", command, recipe]
    for override in overrides:
        arguments += ["--set", override]
    print("+ wartok", command, " ".join(f"--set {item}" for item in overrides), flush=True)
    start = time.perf_counter()
    subprocess.run(arguments, check=True)
    return time.perf_counter() - start


def collect(output_dir: Path, name: str, variant: str, weight: float, seed: int, seconds: float) -> dict:
    """Return one table row from a tokenizer run and the prior trained on its tokens."""
    tokenizer = json.loads((output_dir / name / "metrics.json").read_text())["validation"]
    prior = json.loads((output_dir / f"prior-{name}" / "metrics.json").read_text())["validation"]
    return {
        "run": name, "variant": variant, "lambda": weight, "seed": seed,
        "gloss": prior["gloss"], "psnr": tokenizer["psnr"], "ssim": tokenizer.get("ssim", float("nan")),
        "usage": tokenizer["codebook_usage"], "perplexity": tokenizer["perplexity"],
        "entropy_minus_gloss": tokenizer["unigram_entropy"] - prior["gloss"], "wall_s": round(seconds),
    }  # fmt: skip


def write_table(rows: list[dict], output_dir: Path) -> None:
    """Write the rows as CSV and as a Markdown table, with the change in gLoss against the control."""
    with open(output_dir / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    control = {row["seed"]: row for row in rows if row["variant"] == "control"}
    lines = [
        "| run | lambda | seed | gLoss | vs control | PSNR (dB) | dPSNR | SSIM | usage | perplexity | H - gLoss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = control.get(row["seed"])
        change = f"{100 * (row['gloss'] / base['gloss'] - 1):+.1f}%" if base else ""
        delta = f"{row['psnr'] - base['psnr']:+.2f}" if base else ""
        lines.append(
            f"| {row['run']} | {row['lambda']} | {row['seed']} | {row['gloss']:.4f} | {change} | {row['psnr']:.2f} | "
            f"{delta} | {row['ssim']:.4f} | {row['usage']:.3f} | {row['perplexity']:.1f} | "
            f"{row['entropy_minus_gloss']:.3f} |"
        )
    (output_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], output_dir: Path) -> None:
    """Plot validation gLoss against PSNR, one series per variant, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot")
        return
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for variant in dict.fromkeys(row["variant"] for row in rows):
        points = sorted((row["psnr"], row["gloss"], row["lambda"]) for row in rows if row["variant"] == variant)
        marker = "*" if variant == "control" else "o"
        axes.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=variant, linestyle="-")
        for psnr, gloss, weight in points:
            axes.annotate(f"{weight:g}", (psnr, gloss), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("validation PSNR (dB)")
    axes.set_ylabel("validation gLoss (nats/token)")
    axes.set_title("wAR-Tok sweep: prior loss against reconstruction")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "sweep.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--variants", nargs="+", default=["frozen", "ema", "online", "target_only"],
                        choices=sorted(VARIANTS))  # fmt: skip
    parser.add_argument("--weights", nargs="+", type=float, default=[0.3, 1.0, 3.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    output_dir = recipe.output_dir
    base = list(args.overrides)

    run_stage("prepare", args.recipe, base, recipe.shards_dir / "manifest.json")
    run_stage("pretrain-tokenizer", args.recipe, base, output_dir / "tokenizer" / "metrics.json")
    run_stage("train-prior", args.recipe, base, output_dir / "prior" / "metrics.json")

    rows = []
    for seed in args.seeds:
        settings = [("control", 0.0, [])]
        settings += [(variant, weight, VARIANTS[variant]) for variant in args.variants for weight in args.weights]
        for variant, weight, variant_overrides in settings:
            name = f"{variant}-l{weight:g}-s{seed}"
            # The shared pretrained tokenizer and target prior are passed by path, so a seed changes
            # only this run's data order and initialisations.
            overrides = base + [f"seed={seed}", f"wartok.run_name={name}", f"wartok.weight={weight}",
                                f"wartok.init_tokenizer={output_dir / 'tokenizer'}",
                                f"wartok.target_prior={output_dir / 'prior'}", *variant_overrides]  # fmt: skip
            seconds = run_stage("train-wartok", args.recipe, overrides, output_dir / name / "metrics.json")
            prior_overrides = base + [f"seed={seed}", f"train_prior.tokenizer={output_dir / name}",
                                      f"train_prior.run_name=prior-{name}"]  # fmt: skip
            seconds += run_stage("train-prior", args.recipe, prior_overrides, output_dir / f"prior-{name}" / "metrics.json")
            rows.append(collect(output_dir, name, variant, weight, seed, seconds))
            write_table(rows, output_dir)
    plot(rows, output_dir)


if __name__ == "__main__":
    main()

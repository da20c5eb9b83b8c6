"""Sweep wAR-Tok settings against the lambda = 0 control and tabulate gLoss against PSNR.

    python docs/scripts/wartok_sweep.py recipes/fashion-mnist/sweep.yaml \
        --variants frozen:1,3,10 ema online target_only:0.1,0.3,1 --weights 1 3 10 --seeds 0 --jobs 2

The chain runs through the wartok CLI, one subprocess per stage, as a user's
script would: prepare, pretrain-tokenizer and the target prior once; then, per
seed, the control (train-wartok with lambda = 0 for the same number of steps)
and every (variant, lambda) pair, each followed by a fresh prior trained with
the same recipe on that tokenizer's tokens. A variant written as name:w1,w2
uses its own lambdas instead of --weights. With --jobs N, N settings train at
once, each with 1/N of the CPU threads; their output goes to <output_dir>/<run>.log.
A finished run is skipped, so an interrupted sweep continues where it stopped.
The table of every finished run in the output folder goes to <output_dir>/sweep.md
and sweep.csv, and the plot to sweep.png when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from wartok_cli.recipe import load_recipe

VARIANTS = {
    "frozen": ["wartok.target=frozen"],
    "frozen-fit": ["wartok.target=frozen", "wartok.aux_init=fit", "wartok.aux_fit_steps=100"],
    # lambda rises linearly over the first 60 steps, so the tokens move less abruptly at the start.
    "frozen-ramp": ["wartok.target=frozen", "wartok.weight_ramp=60"],
    # No clipping of the tokenizer's gradient norm, to see whether grad_clip hides the effect of lambda.
    "frozen-noclip": ["wartok.target=frozen", "wartok.grad_clip=null"],
    "ema": ["wartok.target=ema"],  # the recipe's wartok.target_half_life applies
    "online": ["wartok.target=online"],
    "target_only": ["wartok.contrast=target_only"],
}


def run_stage(
    command: str, recipe: str, overrides: list[str], marker: Path, log: Path | None = None, threads: int | None = None
) -> float:
    """Run one wartok subcommand unless its marker file exists; return the wall time in seconds."""
    if marker.exists():
        return 0.0
    arguments = [sys.executable, "-m", "wartok_cli", command, recipe]
    for override in overrides:
        arguments += ["--set", override]
    print("+ wartok", command, " ".join(f"--set {item}" for item in overrides), flush=True)
    environment = dict(os.environ)
    if threads is not None:
        environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    if log is None:
        subprocess.run(arguments, check=True, env=environment)
    else:
        with open(log, "a") as handle:
            subprocess.run(arguments, check=True, env=environment, stdout=handle, stderr=subprocess.STDOUT)
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
    """Plot validation gLoss against PSNR, one color per variant, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot")
        return
    figure, axes = plt.subplots(figsize=(6.5, 4.8))
    first_seed = min(row["seed"] for row in rows)
    control = next((row for row in rows if row["variant"] == "control" and row["seed"] == first_seed), None)
    if control is not None:
        # Settings inside this band count as matched in reconstruction.
        axes.axvspan(
            control["psnr"] - 0.3, control["psnr"] + 0.3, color="grey", alpha=0.12, label="control PSNR ± 0.3 dB"
        )
    for index, variant in enumerate(dict.fromkeys(row["variant"] for row in rows)):
        color = f"C{index}"
        marker = "*" if variant == "control" else "o"
        # The first seed's settings form a line over lambda, and repeats with other seeds are hollow markers.
        points = sorted((row["psnr"], row["gloss"], row["lambda"]) for row in rows
                        if row["variant"] == variant and row["seed"] == first_seed)  # fmt: skip
        repeats = [(row["psnr"], row["gloss"], row["lambda"]) for row in rows
                   if row["variant"] == variant and row["seed"] != first_seed]  # fmt: skip
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=variant)
        if repeats:
            axes.scatter([p[0] for p in repeats], [p[1] for p in repeats], marker=marker, facecolors="none",
                         edgecolors=color, label=None if points else variant)  # fmt: skip
        for psnr, gloss, weight in points + repeats:
            axes.annotate(f"{weight:g}", (psnr, gloss), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("validation PSNR (dB)")
    axes.set_ylabel("validation gLoss (nats/token)")
    axes.set_title(f"wAR-Tok sweep: filled seed {first_seed}, hollow other seeds; labels are lambda", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "sweep.png", dpi=120)


def parse_variants(specs: list[str], default_weights: list[float]) -> list[tuple[str, float]]:
    """Return (variant, lambda) pairs from specs such as 'frozen' or 'target_only:0.1,0.3'."""
    pairs = []
    for spec in specs:
        name, _, weights = spec.partition(":")
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(sorted(VARIANTS))}")
        pairs += [(name, weight) for weight in ([float(w) for w in weights.split(",")] if weights else default_weights)]
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["frozen", "ema", "online", "target_only"],
        help=f"variants ({', '.join(sorted(VARIANTS))}), each optionally with :lambda1,lambda2",
    )
    parser.add_argument("--weights", nargs="+", type=float, default=[0.3, 1.0, 3.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--jobs", type=int, default=1, help="settings trained at once")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    parser.add_argument("--report-only", action="store_true", help="tabulate and plot the finished runs, train nothing")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    output_dir = recipe.output_dir
    base = list(args.overrides)
    pairs = parse_variants(args.variants, args.weights)

    if args.report_only:
        report(output_dir)
        return
    run_stage("prepare", args.recipe, base, recipe.shards_dir / "manifest.json")
    run_stage("pretrain-tokenizer", args.recipe, base, output_dir / "tokenizer" / "metrics.json")
    run_stage("train-prior", args.recipe, base, output_dir / "prior" / "metrics.json")

    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def run_setting(variant: str, weight: float, seed: int) -> None:
        name = f"{variant}-l{weight:g}-s{seed}"
        row_file = output_dir / name / "sweep-row.json"
        if row_file.exists():
            return
        log = output_dir / f"{name}.log"
        # The shared pretrained tokenizer and target prior are passed by path, so a seed changes
        # only this run's data order and initialisations.
        overrides = base + [f"seed={seed}", f"wartok.run_name={name}", f"wartok.weight={weight}",
                            f"wartok.init_tokenizer={output_dir / 'tokenizer'}",
                            f"wartok.target_prior={output_dir / 'prior'}", *VARIANTS.get(variant, [])]  # fmt: skip
        seconds = run_stage("train-wartok", args.recipe, overrides, output_dir / name / "metrics.json", log, threads)
        prior_overrides = base + [f"seed={seed}", f"train_prior.tokenizer={output_dir / name}",
                                  f"train_prior.run_name=prior-{name}"]  # fmt: skip
        marker = output_dir / f"prior-{name}" / "metrics.json"
        seconds += run_stage("train-prior", args.recipe, prior_overrides, marker, log, threads)
        row = collect(output_dir, name, variant, weight, seed, seconds)
        row_file.write_text(json.dumps(row, indent=2))
        print(f"done {name}: gLoss {row['gloss']:.4f}, PSNR {row['psnr']:.2f} dB, {seconds:.0f} s", flush=True)

    # A setting listed twice would have two jobs train the same run folder at once.
    settings = list(dict.fromkeys((variant, weight, seed) for seed in args.seeds
                                  for variant, weight in [("control", 0.0), *pairs]))  # fmt: skip
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_setting, *setting): setting for setting in settings}
        for future, (variant, weight, seed) in futures.items():
            try:
                future.result()
            except subprocess.CalledProcessError:
                pool.shutdown(cancel_futures=True)
                name = f"{variant}-l{weight:g}-s{seed}"
                raise SystemExit(f"{name} failed; its output is in {output_dir / (name + '.log')}") from None
    report(output_dir)


def report(output_dir: Path) -> None:
    """Write the table and the plot of every finished run in the output folder."""
    rows = [json.loads(path.read_text()) for path in sorted(output_dir.glob("*/sweep-row.json"))]
    if not rows:
        raise SystemExit(f"no finished runs in {output_dir}")
    rows.sort(key=lambda row: (row["seed"], row["variant"] != "control", row["variant"], row["lambda"]))
    write_table(rows, output_dir)
    plot(rows, output_dir)


if __name__ == "__main__":
    main()

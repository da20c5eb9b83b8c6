"""The evaluation report: report.json and the table printed after `wartok evaluate`.

Every metric entry states its value, its reference (split and number of images, or none),
the number of images measured (``samples``) and, for Inception metrics, the feature
extractor, the weights' sha256 and whether they are the standard FID weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch_fidelity
from rich.console import Console
from rich.table import Table

from wartok_cli.evaluate.fidelity import FEATURE_EXTRACTOR, FEATURE_LAYER
from wartok_cli.train.loop import write_atomic

REPORT_FILE = "report.json"


def inception_protocol(weights: Path, info: dict) -> dict:
    """Return the feature extractor and weights fields that every Inception metric entry carries."""
    return {
        "feature_extractor": f"torch-fidelity {torch_fidelity.__version__} {FEATURE_EXTRACTOR}, "
        f"layer {FEATURE_LAYER} (pool3)",
        "weights": str(weights),
        "weights_sha256": info["sha256"],
        "feature_weights_sha256": info["feature_weights_sha256"],
        "standard_weights": info["standard"],
    }


def split_reference(split: str, images: int, **extra: Any) -> dict:
    """Return the reference of a metric measured against a dataset split."""
    return {"split": split, "images": images, **extra}


def metric_entry(value: float | None, reference: dict | None, samples: int, **fields: Any) -> dict:
    """Return one metric entry; ``fields`` adds units, protocol settings and the Inception protocol."""
    return {"value": value, "reference": reference, "samples": samples, **fields}


def write_report(folder: Path, report: dict) -> Path:
    """Write report.json into the folder through a temporary name; return its path."""
    path = folder / REPORT_FILE
    write_atomic(path, json.dumps(report, indent=2, allow_nan=True) + "\n")
    return path


def report_table(report: dict) -> Table:
    """Return a rich table with one row per metric: value, reference, samples and notes."""
    table = Table(title=f"wartok evaluate: {report['run_dir']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("reference")
    table.add_column("samples", justify="right")
    table.add_column("notes")
    for name, entry in report["metrics"].items():
        table.add_row(name, _format_value(entry), _format_reference(entry["reference"]), str(entry["samples"]),
                      _notes(entry))  # fmt: skip
    return table


def print_report(report: dict, console: Console | None = None) -> None:
    """Print the report's table to stdout, or to the given console."""
    (console or Console()).print(report_table(report))


def _format_value(entry: dict) -> str:
    value = entry["value"]
    if value is None:
        return "unavailable"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = f"{value:.6g}" if abs(value) < 1e-3 else f"{value:.4f}"
    if "std" in entry:
        text += f" ± {entry['std']:.2g}"
    return text + (f" {entry['unit']}" if entry.get("unit") else "")


def _format_reference(reference: dict | None) -> str:
    if reference is None:
        return "-"
    if reference.get("split") is None:
        return f"{reference['statistics']} ({reference.get('images') or 'unknown number of'} images)"
    text = f"{reference['split']} split, {reference['images']} images"
    source = reference.get("statistics_source")
    return f"{text} ({source} statistics)" if source else text


def _notes(entry: dict) -> str:
    notes = []
    if "reason" in entry:
        notes.append(entry["reason"])
    if "standard_weights" in entry:
        standard = "standard" if entry["standard_weights"] else "NON-STANDARD"
        notes.append(f"{standard} weights {entry['weights_sha256'][:12]}")
    if "subset_size" in entry:
        notes.append(f"{entry['subsets']} subsets of {entry['subset_size']}")
    if "splits" in entry:
        notes.append(f"{entry['splits']} splits")
    if "window" in entry:
        notes.append(f"{entry['window']}x{entry['window']} Gaussian window")
    return "; ".join(notes)

"""Final weights on disk: ``<name>.safetensors`` plus ``<name>.json`` (the architecture config).

A final folder is enough to rebuild a model with no recipe. Weights are read
with safetensors only, never with pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wartok_cli.errors import WartokError
from wartok_cli.models import ARPrior, build_tokenizer


def save_model(folder: Path, name: str, model: nn.Module) -> None:
    """Write the model's weights and config through temporary names, weights first."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.safetensors"
    config = folder / f"{name}.json"
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(weights.with_name(f".{weights.name}.tmp")))
    weights.with_name(f".{weights.name}.tmp").replace(weights)
    config.with_name(f".{config.name}.tmp").write_text(json.dumps(model.config, indent=2))
    config.with_name(f".{config.name}.tmp").replace(config)


def _final_files(path: str | Path, name: str) -> tuple[Path, Path]:
    """Find ``<name>.safetensors`` and ``<name>.json`` in a run folder, its final/ folder, or beside a file."""
    path = Path(path)
    candidates = [path, path / "final"] if path.is_dir() else [path.parent]
    for folder in candidates:
        weights, config = folder / f"{name}.safetensors", folder / f"{name}.json"
        if weights.is_file() and config.is_file():
            return weights, config
    raise WartokError(
        f"No {name} found at {path}: expected {name}.safetensors and {name}.json in it or in its final/ folder. "
        f"Check the run name, or finish the stage that writes it."
    )


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a tokenizer from a run folder, its final/ folder, or its .safetensors file; eval mode."""
    weights, config = _final_files(path, "tokenizer")
    model = build_tokenizer(json.loads(config.read_text()))
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> ARPrior:
    """Rebuild an AR prior from a run folder, its final/ folder, or its .safetensors file; eval mode."""
    weights, config = _final_files(path, "prior")
    model = ARPrior(**json.loads(config.read_text()))
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()


def weights_hash(path: str | Path, name: str) -> str:
    """Return the sha256 of a final weights file, used as a cache key."""
    import hashlib

    weights, _ = _final_files(path, name)
    return hashlib.sha256(weights.read_bytes()).hexdigest()

"""The training loop shared by every stage, on HuggingFace Accelerate.

A stage builds its models and optimizers, hands them to a ``Trainer`` with a
step function and a batch source, and the trainer owns the rest: learning-rate
schedules, EMA weights, progress, metric logs, checkpoints and resume.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import logging
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from wartok_cli.errors import WartokError
from wartok_cli.recipe import Recipe, TrainConfig

log = logging.getLogger("wartok")

CHECKPOINT_PREFIX = "step-"


class EMA:
    """Exponential moving average of a model's weights, kept as a frozen copy.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so a
    short run does not export weights that are still mostly the initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step toward the model's current weights."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.model.parameters(), model.parameters()):
            average.lerp_(current.detach().to(average.dtype), 1.0 - decay)
        for average, current in zip(self.model.buffers(), model.buffers()):
            average.copy_(current)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["weights"])


@dataclass
class TrainState:
    """Where a run stands: the step counter and the number of samples seen, saved in checkpoints."""

    step: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])


def derived_seed(*parts) -> int:
    """Return a 63-bit seed derived from the parts, stable across runs and platforms."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def warmup_cosine(settings: TrainConfig) -> Callable[[int], float]:
    """Return the learning-rate factor of a step: linear warm-up, then cosine decay to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        span = max(1, settings.steps - settings.warmup_steps)
        progress = min(1.0, (step - settings.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine

    return factor


def make_optimizer(parameters, settings: TrainConfig, lr: Optional[float] = None) -> torch.optim.AdamW:
    """Return AdamW with the stage's learning rate, betas and weight decay."""
    return torch.optim.AdamW(
        parameters, lr=lr or settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay
    )


@dataclass
class Run:
    """One run folder and the accelerator that trains into it."""

    recipe: Recipe
    name: str
    settings: TrainConfig
    accelerator: Accelerator
    dir: Path
    extra: dict = field(default_factory=dict)

    @property
    def final_dir(self) -> Path:
        return self.dir / "final"

    @property
    def per_process_batch(self) -> int:
        return self.settings.batch_size // self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def start_run(recipe: Recipe, name: str, settings: TrainConfig) -> Run:
    """Create the accelerator and the run folder; write the resolved recipe into it."""
    if settings.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise WartokError(
            "mixed_precision 'fp16' needs a GPU; on the CPU it would silently run in fp32. Use 'bf16' or 'no'."
        )
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    if settings.batch_size % accelerator.num_processes:
        raise WartokError(
            f"batch_size {settings.batch_size} is not divisible by the {accelerator.num_processes} processes. "
            f"Use a multiple of {accelerator.num_processes}."
        )
    set_seed(recipe.seed + accelerator.process_index)
    if not accelerator.is_main_process:
        log.setLevel(max(log.level, logging.WARNING))  # one copy of each info line, from the main process
    run_dir = recipe.run_dir(name)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "images", "checkpoints"):
            (run_dir / sub).mkdir(exist_ok=True)
        write_atomic(run_dir / "recipe.resolved.yaml", recipe.to_yaml())
    accelerator.wait_for_everyone()
    log.info("run %s: %d process(es) on %s, mixed precision %s", run_dir, accelerator.num_processes,
             accelerator.device, settings.mixed_precision)
    return Run(recipe, name, settings, accelerator, run_dir)


def write_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary name, so readers never see half of it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def check_in_sync(accelerator: Accelerator, model: nn.Module, name: str) -> None:
    """Raise if the model's weights differ between processes; a no-op on one process.

    Data-parallel training keeps replicas identical only if every process applies the
    same update, so a difference means a bug (for example a codebook change on one rank).
    """
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([parameter.detach().double().flatten() for parameter in model.parameters()])
    checksum = torch.stack([flat.sum(), flat.pow(2).sum(), flat[::7].sum()]).to(accelerator.device)
    gathered = accelerator.gather(checksum[None]).cpu()
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(f"the weights of {name} differ between processes: checksums {gathered.tolist()}")
    log.info("weights of %s identical on %d processes", name, accelerator.num_processes)


def clip_and_step(run: Run, loss: torch.Tensor, model: nn.Module, optimizer, scheduler) -> float:
    """Backward, clip, optimizer and scheduler step; return the gradient norm (nan when not clipped)."""
    optimizer.zero_grad(set_to_none=True)
    run.accelerator.backward(loss)
    grad_norm = float("nan")
    if run.settings.grad_clip is not None:
        grad_norm = float(run.accelerator.clip_grad_norm_(model.parameters(), run.settings.grad_clip))
    optimizer.step()
    scheduler.step()
    return grad_norm


class MetricLog:
    """Rows of step metrics appended to a CSV file; a resumed run continues the same file."""

    def __init__(self, path: Path) -> None:
        self.header_needed = not path.exists() or path.stat().st_size == 0
        self.handle = open(path, "a", newline="")
        self.writer = csv.writer(self.handle)

    def write(self, step: int, samples_seen: int, lr: float, metrics: dict[str, float]) -> None:
        if self.header_needed:
            self.writer.writerow(["step", "samples_seen", "lr", *metrics])
            self.header_needed = False
        self.writer.writerow([step, samples_seen, f"{lr:.6g}", *(f"{value:.6g}" for value in metrics.values())])
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class Trainer:
    """Runs a step function for the stage's number of steps, with checkpoints and resume."""

    def __init__(self, run: Run, emas: list[tuple[nn.Module, EMA]], schedulers: list) -> None:
        self.run = run
        self.emas = emas
        self.schedulers = schedulers
        self.state = TrainState()
        self.stop_requested = False
        accelerator = run.accelerator
        # Schedulers are stepped by hand and registered for checkpointing, not prepared: a prepared
        # scheduler steps once per process, which would shorten the schedule on several processes.
        for scheduler in schedulers:
            accelerator.register_for_checkpointing(scheduler)
        for _, ema in emas:
            accelerator.register_for_checkpointing(ema)
        accelerator.register_for_checkpointing(self.state)
        self.checkpoints = run.dir / "checkpoints"

    # Checkpoints -----------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Return the complete checkpoints, oldest first; temporary folders are not listed."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(path for path in self.checkpoints.iterdir() if path.name.startswith(CHECKPOINT_PREFIX))

    def save_checkpoint(self) -> Path:
        """Save the whole training state under a temporary name, then rename it into place."""
        accelerator = self.run.accelerator
        name = f"{CHECKPOINT_PREFIX}{self.state.step:07d}"
        final = self.checkpoints / name
        temporary = self.checkpoints / f".tmp-{name}"
        if accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            temporary.rename(final)
            for old in self.complete_checkpoints()[: -self.run.settings.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def resume(self) -> None:
        """Load the newest complete checkpoint, if the run folder has one."""
        checkpoints = self.complete_checkpoints()
        if not checkpoints:
            return
        self.run.accelerator.load_state(str(checkpoints[-1]))
        log.info("resumed from %s at step %d", checkpoints[-1], self.state.step)

    # The loop --------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        log.warning("received signal %d: saving a checkpoint after this step", signum)
        self.stop_requested = True

    def fit(
        self,
        step_fn: Callable[[int, dict], dict[str, float]],
        batches_from: Callable[[int], Iterator[dict]],
        on_step_end: Optional[Callable[[int], None]] = None,
    ) -> None:
        """Run step_fn(step, batch) until the stage's step count; resumes from a checkpoint first."""
        settings = self.run.settings
        accelerator = self.run.accelerator
        self.resume()
        if self.state.step >= settings.steps:
            log.info("%s already trained for %d steps", self.run.name, self.state.step)
            return
        batches = batches_from(self.state.step)
        metric_log = MetricLog(self.run.dir / "logs" / "metrics.csv") if accelerator.is_main_process else None
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        show_bar = accelerator.is_main_process and sys.stdout.isatty()
        columns = [TextColumn(f"[bold]{self.run.name}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:.2f} step/s"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), TextColumn("{task.fields[metrics]}")]
        try:
            with Progress(*columns, disable=not show_bar) as bar:
                task = bar.add_task("train", total=settings.steps, completed=self.state.step, rate=0.0, metrics="")
                started, started_step = time.perf_counter(), self.state.step
                while self.state.step < settings.steps:
                    step = self.state.step
                    metrics = step_fn(step, next(batches))
                    for model, ema in self.emas:
                        ema.update(accelerator.unwrap_model(model))
                    self.state.step += 1
                    self.state.samples_seen += settings.batch_size
                    done = self.state.step
                    rate = (done - started_step) / max(1e-9, time.perf_counter() - started)
                    if done % settings.log_every == 0 or done == settings.steps:
                        summary = "  ".join(f"{key} {value:.4g}" for key, value in metrics.items())
                        bar.update(task, completed=done, rate=rate, metrics=summary)
                        if not show_bar and accelerator.is_main_process:
                            eta = (settings.steps - done) / max(rate, 1e-9)
                            log.info("%s step %d/%d  %s  %.2f step/s  ETA %s", self.run.name, done, settings.steps,
                                     summary, rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
                        if metric_log is not None:
                            metric_log.write(done, self.state.samples_seen, self._current_lr(), metrics)
                    else:
                        bar.update(task, completed=done, rate=rate)
                    if on_step_end is not None:
                        on_step_end(done)
                    if done % settings.checkpoint_every == 0 or done == settings.steps or self.stop_requested:
                        self.save_checkpoint()
                    if self.stop_requested:
                        raise WartokError(
                            f"Stopped at step {done}; the checkpoint is saved. Run the same command again to resume."
                        )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if metric_log is not None:
                metric_log.close()

    def _current_lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0] if self.schedulers else float("nan")

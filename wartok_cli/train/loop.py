"""The training loop shared by every stage, on HuggingFace Accelerate.

A stage builds its models and optimizers and hands them to a ``Trainer`` with a
step function and a batch source. The trainer owns the rest: gradient
accumulation, learning-rate schedules, EMA weights, skipping non-finite steps,
progress, metric logs, checkpoints and resume.

The step function trains on one micro-batch and calls ``clip_and_step``. That
function applies the optimizer update on the last micro-batch of a step only,
and only when the loss and the gradient norm are finite on every process.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from wartok_cli.errors import WartokError
from wartok_cli.precision import accelerator_device, resolve_mixed_precision
from wartok_cli.recipe import Recipe, TrainConfig

log = logging.getLogger("wartok")

CHECKPOINT_PREFIX = "step-"
TENSORBOARD_PROJECT = "tensorboard"  # TensorBoard event files go to <run>/logs/tensorboard/


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
    """Progress of a run, saved in checkpoints: the step counter, samples seen and the current skip streak."""

    step: int = 0
    samples_seen: int = 0
    consecutive_skips: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))  # absent in older checkpoints


@dataclass
class StepStatus:
    """State of the current optimizer step, which the Trainer resets before each step.

    A step function reads ``micro_batch`` and ``last_micro_batch`` to do once-per-step
    work on the last micro-batch only, and ``skipped`` to see that clip_and_step dropped
    the update because a value was not finite on some process.
    """

    micro_batch: int = 0  # index of the micro-batch being trained
    micro_batches: int = 1  # accumulation_steps
    loss_finite: bool = True  # every micro-batch loss on this process so far was finite
    grad_norm: float | None = None  # gradient norm before clipping, once clip_and_step reached the update
    stepped: bool = False  # the optimizer applied the update
    skipped: bool = False  # the update was skipped on every process because of a non-finite value

    @property
    def last_micro_batch(self) -> bool:
        return self.micro_batch == self.micro_batches - 1

    def reset(self, micro_batches: int) -> None:
        self.micro_batch = 0
        self.micro_batches = micro_batches
        self.loss_finite = True
        self.grad_norm = None
        self.stepped = False
        self.skipped = False


def derived_seed(*parts) -> int:
    """Return a 63-bit seed derived from the parts, stable across runs and platforms."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def warmup_cosine(settings: TrainConfig) -> Callable[[int], float]:
    """Return the learning-rate factor of a step: linear warm-up, then cosine decay to min_lr_ratio.

    Used with LambdaLR, the factor is a closed-form function of the step counter, which a
    checkpoint stores, so a resumed run computes the same learning rate as an uninterrupted
    one. torch's SequentialLR(LinearLR, CosineAnnealingLR) gives the same curve (within
    3e-7 relative over 10,000 steps, measured with torch 2.14) but builds each value from the
    previous one.
    """

    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        span = max(1, settings.steps - settings.warmup_steps)
        progress = min(1.0, (step - settings.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Return the stage's learning-rate schedule: warm-up, then cosine decay (see warmup_cosine)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings))


def make_optimizer(parameters, settings: TrainConfig, lr: float | None = None) -> torch.optim.AdamW:
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
    status: StepStatus = field(default_factory=StepStatus)

    @property
    def final_dir(self) -> Path:
        return self.dir / "final"

    @property
    def per_process_batch(self) -> int:
        """Return the samples one process takes per optimizer step, over all its micro-batches."""
        return self.settings.batch_size // self.accelerator.num_processes

    @property
    def micro_batch_size(self) -> int:
        """Return the samples of one micro-batch on one process."""
        return self.per_process_batch // self.settings.accumulation_steps

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def start_run(recipe: Recipe, name: str, settings: TrainConfig) -> Run:
    """Create the accelerator and the run folder; write the resolved recipe into it."""
    run_dir = recipe.run_dir(name)
    field = f"{section_name(recipe, settings)}.mixed_precision"
    precision = resolve_mixed_precision(settings.mixed_precision, accelerator_device(), field)

    # TensorBoard logging goes through Accelerate's tracker, only where the package is installed.
    log_with = "tensorboard" if is_tensorboard_available() else None
    accelerator = Accelerator(mixed_precision=precision, log_with=log_with, project_dir=str(run_dir / "logs"))
    shares = accelerator.num_processes * settings.accumulation_steps
    if settings.batch_size % shares:
        section = section_name(recipe, settings)
        raise WartokError(
            f"{section}.batch_size {settings.batch_size} does not split into {accelerator.num_processes} "
            f"process(es) x {settings.accumulation_steps} micro-batch(es) ({section}.accumulation_steps). "
            f"Use a multiple of {shares}."
        )

    set_seed(recipe.seed + accelerator.process_index)
    if not accelerator.is_main_process:
        log.setLevel(max(log.level, logging.WARNING))  # one copy of each info line, from the main process
    if log_with is None:
        log.debug("tensorboard is not installed, so metrics go to logs/metrics.csv only")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "images", "checkpoints"):
            (run_dir / sub).mkdir(exist_ok=True)
        write_atomic(run_dir / "recipe.resolved.yaml", recipe.to_yaml())
    accelerator.wait_for_everyone()
    log.info("run %s: %d process(es) on %s, mixed precision %s, %d micro-batch(es) of %d per process and step",
             run_dir, accelerator.num_processes, accelerator.device, describe_precision(settings, precision),
             settings.accumulation_steps, settings.batch_size // shares)  # fmt: skip
    return Run(recipe, name, settings, accelerator, run_dir)


def describe_precision(settings: TrainConfig, precision: str) -> str:
    """Return the precision for the log line, saying when 'auto' chose it."""
    return f"{precision} (auto)" if settings.mixed_precision == "auto" else precision


def section_name(recipe: Recipe, settings: TrainConfig) -> str:
    """Return the name of the recipe section that contains these settings, for messages that name a field."""
    for name in type(recipe).model_fields:
        if getattr(recipe, name) is settings:
            return name
    return "(stage settings)"


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


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Return True on every process when the flag is True on at least one.

    It is a collective operation on several processes, so all of them must call it at the
    same point of the step.
    """
    if accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(count.item() > 0)


def clip_and_step(run: Run, loss: torch.Tensor, model: nn.Module, optimizer, scheduler) -> float:
    """Backward one micro-batch's loss; on the last micro-batch, clip, check and step.

    Call it once per micro-batch and optimizer, on every process. Gradients of the micro-batches
    add up, each loss divided by their number, so the update is that of the mean loss over the
    whole batch. On the last micro-batch, when any micro-batch loss or the gradient norm is not
    finite on any process, every process skips the update together and sets
    ``run.status.skipped``. The scheduler steps either way, so the learning rate stays a
    function of the step. Returns the gradient norm before clipping, or nan on the
    micro-batches before the last.
    """
    accelerator = run.accelerator
    status = run.status
    if status.micro_batch == 0:
        optimizer.zero_grad(set_to_none=True)
    status.loss_finite = status.loss_finite and bool(torch.isfinite(loss.detach()).all())
    accelerator.backward(loss / status.micro_batches if status.micro_batches > 1 else loss)
    if not status.last_micro_batch:
        return float("nan")

    # An infinite max_norm measures the norm without changing the gradients.
    max_norm = run.settings.grad_clip if run.settings.grad_clip is not None else math.inf
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    status.grad_norm = grad_norm
    # With fp16 an infinite gradient is the GradScaler's overflow signal: its step skips the update
    # and lowers the loss scale, which is routine and not counted as a skipped step.
    # NOTE: the fp16 branches run on a GPU only, which the test suite does not have.
    grad_bad = not math.isfinite(grad_norm) and accelerator.scaler is None
    if any_process(accelerator, not status.loss_finite or grad_bad):
        optimizer.zero_grad(set_to_none=True)
        if accelerator.scaler is not None:
            accelerator.scaler.update()  # clip_grad_norm_ unscaled the gradients, so close the scaler's step
        status.skipped = True
    else:
        optimizer.step()
        status.stepped = not accelerator.optimizer_step_was_skipped
    scheduler.step()
    return grad_norm


def split_batch(batch: dict, parts: int) -> list[dict]:
    """Split a batch into equal micro-batches along the first axis of its tensors and lists.

    Other values (and zero-dimensional tensors) are shared by every micro-batch.
    """
    if parts == 1:
        return [batch]
    lengths = {len(value) for value in batch.values() if _is_batched(value)}
    if len(lengths) != 1 or next(iter(lengths)) % parts:
        raise ValueError(f"cannot split a batch with lengths {sorted(lengths)} into {parts} equal micro-batches")
    size = next(iter(lengths)) // parts
    micro_batches: list[dict] = [{} for _ in range(parts)]
    for key, value in batch.items():
        for index, micro_batch in enumerate(micro_batches):
            micro_batch[key] = value[index * size : (index + 1) * size] if _is_batched(value) else value
    return micro_batches


def _is_batched(value) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() > 0)


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Average metric rows key by key, keeping the order in which keys first appear."""
    if len(rows) == 1:
        return rows[0]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: sum(row[key] for row in rows if key in row) / sum(key in row for row in rows) for key in keys}


class MetricLog:
    """Rows of step metrics in a CSV file; a resumed run continues the same file.

    Rows after the resumed step (written by the interrupted run after its last checkpoint)
    are dropped, so every step appears once. A metric that first appears after the header
    was written extends the header, and rows without a value leave the cell empty.
    """

    def __init__(self, path: Path, resumed_step: int = 0) -> None:
        self.path = path
        self.columns: list[str] = []
        if path.exists() and path.stat().st_size:
            rows = self._read()
            kept = [row for row in rows if int(row["step"]) <= resumed_step]
            if len(kept) < len(rows):
                self._rewrite(kept)

    def write(self, step: int, samples_seen: int, lr: float, metrics: dict[str, float]) -> None:
        row = {"step": step, "samples_seen": samples_seen, "lr": f"{lr:.6g}"}
        row.update((key, f"{value:.6g}") for key, value in metrics.items())
        new_columns = [key for key in row if key not in self.columns]
        if new_columns:
            old_rows = self._read() if self.columns else []
            self.columns += new_columns
            self._rewrite(old_rows)
        # The file is opened per row: rows come every log_every steps, and a crash loses none.
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.columns, restval="").writerow(row)

    def _read(self) -> list[dict]:
        with open(self.path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            self.columns = list(reader.fieldnames or [])
        return rows

    def _rewrite(self, rows: list[dict]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        temporary.replace(self.path)


class Trainer:
    """Runs a step function for the stage's number of steps, with checkpoints and resume.

    Each optimizer step takes one batch of ``run.per_process_batch`` samples from the batch
    source, splits it into ``accumulation_steps`` micro-batches and calls the step function
    on each. Gradient accumulation uses an explicit ``no_sync`` on the EMA'd models for every
    micro-batch but the last, not ``accelerator.accumulate``: that would also turn step() and
    zero_grad() of every other prepared optimizer (the auxiliary prior's) into no-ops on those
    micro-batches. Here only clip_and_step handles micro-batches.
    NOTE: with fp16 the GradScaler is shared, so a second optimizer that steps on every
    micro-batch may change the loss scale between the micro-batches of one accumulated update.
    """

    def __init__(self, run: Run, emas: list[tuple[nn.Module, EMA]], schedulers: list) -> None:
        self.run = run
        self.emas = emas
        self.schedulers = schedulers
        self.state = TrainState()
        self.stop_requested = False
        self.stop_signal: str | None = None
        self.handler_pid = os.getpid()  # the process whose signal handler stops the run; set again by fit()
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
        """Load the newest complete checkpoint, if the run folder has one.

        The checkpoint restores the weights, optimizer moments, schedules, EMA weights, random
        states and the step counter. The data position follows from the step: the stage's batch
        source restarts at that exact batch, not at the start of an epoch.
        """
        checkpoints = self.complete_checkpoints()
        if not checkpoints:
            return
        self.run.accelerator.load_state(str(checkpoints[-1]))
        log.info("resumed from %s at step %d (%d samples seen, learning rate %.4g)", checkpoints[-1],
                 self.state.step, self.state.samples_seen, self._current_lr())  # fmt: skip

    # The loop --------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        if os.getpid() != self.handler_pid:
            # A forked DataLoader worker inherits this handler. Ctrl-C signals the whole process group,
            # and the main process alone stops the run and then shuts its workers down.
            return
        name = signal.Signals(signum).name
        if self.stop_requested:
            log.warning("received %s again: stopping now, without a checkpoint", name)
            raise KeyboardInterrupt
        log.warning("received %s: saving a checkpoint after this step, then stopping", name)
        self.stop_requested = True
        self.stop_signal = name

    def fit(
        self,
        step_fn: Callable[[int, dict], dict[str, float]],
        batches_from: Callable[[int], Iterator[dict]],
        on_step_end: Callable[[int], None] | None = None,
    ) -> None:
        """Run step_fn(step, micro_batch) until the stage's step count; resumes from a checkpoint first.

        SIGINT and SIGTERM make every process finish its step, write a checkpoint and raise a
        WartokError. The CLI then exits with status 2 and prints that the same command resumes the run.
        """
        settings = self.run.settings
        accelerator = self.run.accelerator
        self.resume()
        if self.state.step >= settings.steps:
            log.info("%s already trained for %d steps", self.run.name, self.state.step)
            return
        batches = batches_from(self.state.step)
        metric_log = None
        if accelerator.is_main_process:
            metric_log = MetricLog(self.run.dir / "logs" / "metrics.csv", resumed_step=self.state.step)
        self._start_trackers()
        self.handler_pid = os.getpid()
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self._progress_bar() as (bar, task):
                started, started_step = time.perf_counter(), self.state.step
                while self.state.step < settings.steps:
                    metrics = self._train_step(step_fn, batches)
                    self.state.step += 1
                    self.state.samples_seen += settings.batch_size
                    done = self.state.step
                    rate = (done - started_step) / max(1e-9, time.perf_counter() - started)
                    self._report(done, metrics, rate, bar, task, metric_log)
                    if on_step_end is not None:
                        on_step_end(done)
                    self._count_skip(done)
                    stop = any_process(accelerator, self.stop_requested)
                    if done % settings.checkpoint_every == 0 or done == settings.steps or stop:
                        path = self.save_checkpoint()
                    if stop:
                        cause = self.stop_signal or "a signal on another process"
                        raise WartokError(
                            f"Stopped at step {done} of {settings.steps} by {cause}; the checkpoint {path} is "
                            "saved. Run the same command again to resume."
                        )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._finish_trackers()

    def _train_step(self, step_fn: Callable[[int, dict], dict[str, float]], batches: Iterator[dict]) -> dict:
        """Run one optimizer step over the micro-batches of the next batch; return the mean metrics."""
        step = self.state.step
        status = self.run.status
        status.reset(self.run.settings.accumulation_steps)
        # The data pipeline may draw from torch's global generator (a DataLoader draws its workers'
        # base seed when its iterator starts). Forking keeps those draws out of the training
        # stream, whose state the checkpoints save, so a resumed run draws what an uninterrupted
        # run draws.
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)
        rows = []
        for index, micro_batch in enumerate(split_batch(batch, status.micro_batches)):
            status.micro_batch = index
            with self._gradient_sync(status.last_micro_batch):
                rows.append(step_fn(step, micro_batch))
        if not status.skipped:
            for model, ema in self.emas:
                ema.update(self.run.accelerator.unwrap_model(model))
        metrics = mean_metrics(rows)
        if status.grad_norm is not None:
            metrics = {**metrics, "grad_norm": status.grad_norm}
        return metrics

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Return a context that holds back DDP's gradient all-reduce of the trained models unless sync."""
        stack = contextlib.ExitStack()
        if not sync:
            for model, _ in self.emas:
                stack.enter_context(self.run.accelerator.no_sync(model))
        return stack

    def _count_skip(self, done: int) -> None:
        """Count consecutive skipped updates; save a checkpoint and stop after max_skipped_steps of them."""
        if not self.run.status.skipped:
            self.state.consecutive_skips = 0
            return
        self.state.consecutive_skips += 1
        limit = self.run.settings.max_skipped_steps
        log.warning("%s step %d: the loss or the gradient norm is not finite on at least one process, so the "
                    "update was skipped (%d in a row; the run stops after %d in a row)", self.run.name, done,
                    self.state.consecutive_skips, limit)  # fmt: skip
        if self.state.consecutive_skips < limit:
            return
        path = self.save_checkpoint()
        first = done - self.state.consecutive_skips + 1
        field_name = f"{section_name(self.run.recipe, self.run.settings)}.max_skipped_steps"
        raise WartokError(
            f"Stopped at step {done}: the loss or the gradient norm was not finite in {limit} consecutive steps "
            f"({first} to {done}; {field_name} = {limit}). The checkpoint {path} contains the weights from before "
            f"step {first}. Lower the learning rate, set or lower grad_clip, or use mixed_precision 'no', then "
            "run the same command again to resume from that checkpoint."
        )

    # Progress and metrics --------------------------------------------------------------------

    @contextlib.contextmanager
    def _progress_bar(self):
        """Yield a rich progress bar and its task; the bar shows only on a terminal, on the main process."""
        accelerator = self.run.accelerator
        self.show_bar = accelerator.is_main_process and sys.stdout.isatty()
        columns = [TextColumn(f"[bold]{self.run.name}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:.2f} step/s"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), TextColumn("{task.fields[metrics]}")]  # fmt: skip
        with Progress(*columns, disable=not self.show_bar) as bar:
            task = bar.add_task("train", total=self.run.settings.steps, completed=self.state.step, rate=0.0,
                                metrics="")  # fmt: skip
            yield bar, task

    def _report(self, done: int, metrics: dict, rate: float, bar: Progress, task, metric_log: MetricLog | None):
        """Update the progress bar; on log steps also write a log line, a CSV row and TensorBoard scalars."""
        settings = self.run.settings
        if not (done % settings.log_every == 0 or done == settings.steps):
            bar.update(task, completed=done, rate=rate)
            return
        summary = "  ".join(f"{key} {value:.4g}" for key, value in metrics.items())
        # The bar keeps the first three metrics so that it fits a terminal line; the log line has them all.
        short = "  ".join(f"{key} {value:.4g}" for key, value in list(metrics.items())[:3])
        bar.update(task, completed=done, rate=rate, metrics=short)
        accelerator = self.run.accelerator
        if accelerator.is_main_process:
            eta = (settings.steps - done) / max(rate, 1e-9)
            log.info("%s step %d/%d  %s  %.2f step/s  ETA %s", self.run.name, done, settings.steps, summary, rate,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))  # fmt: skip
        lr = self._current_lr()
        if metric_log is not None:
            metric_log.write(done, self.state.samples_seen, lr, metrics)
        accelerator.log({**metrics, "lr": lr, "samples_seen": self.state.samples_seen}, step=done)

    def _start_trackers(self) -> None:
        """Open the TensorBoard writer under <run>/logs/tensorboard, where tensorboard is installed."""
        accelerator = self.run.accelerator
        if not accelerator.log_with:
            return
        # purge_step hides events that an interrupted run logged after its last checkpoint.
        options = {"purge_step": self.state.step + 1} if self.state.step else {}
        accelerator.init_trackers(TENSORBOARD_PROJECT, init_kwargs={"tensorboard": options})
        log.debug("TensorBoard events go to %s", self.run.dir / "logs" / TENSORBOARD_PROJECT)

    def _finish_trackers(self) -> None:
        # Accelerator.end_training would also destroy the process group, which the stage still needs.
        accelerator = self.run.accelerator
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()

    def _current_lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0] if self.schedulers else float("nan")

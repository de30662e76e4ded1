"""The one record of a training run: what it was set up with and how far it has got."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..attention import anneal_ratio
from ..diffusion import DiffusionConfig
from ..mode import Mode
from ..objectives import Objective
from ..recipe import Recipe
from .backends import Backend
from .report import Reporter
from .stops import StopSignal


@dataclass
class Run:
    recipe: Recipe
    backend: Backend  # the accelerator and the operations that differ between DDP, ZeRO and FSDP2
    wrapped: nn.Module  # the prepared (wrapped or sharded) ModelWithLoss
    objective: Objective  # the loss's terms and weights, and its state (calibrated at the first step)
    optimizer: object
    scheduler: object
    tokenizer: object
    diffusion: DiffusionConfig  # what the model trains under; written into the export
    train_blocks: object
    validation_blocks: object | None
    model_shapes: dict  # fingerprint of the parameters, checked on resume
    anneal_from: float  # the attention ratio of the source: where the annealing starts
    alignment: object | None = None  # the frozen source for align.weight > 0 (alignment.py)
    teacher: object | None = None  # the frozen teacher for distill.weight > 0 (distill.py)
    # Progress: restored from a checkpoint on resume.
    step: int = 0
    tokens_trained: int = 0  # counting those the source checkpoint had already been trained on
    nonfinite_in_a_row: int = 0
    first_loss: float | None = None  # of the first step this process ran
    last_loss: float | None = None
    validation: dict | None = None  # the last validation figures
    # Set once the step to start from is known (the metrics file is trimmed to it).
    reporter: Reporter | None = None
    stop: StopSignal | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def accelerator(self):
        return self.backend.accelerator

    @property
    def inner_model(self) -> nn.Module:
        """The (peft-wrapped) causal LM inside the wrapped module."""
        return self.backend.inner_model(self.wrapped)

    def layout_at(self, step: int) -> tuple[Mode, float]:
        """The mode optimizer step `step` (0-based) trains (a growing block size, or the model's mode) and the
        attention ratio it runs at (the annealing schedule's, as the mode takes it)."""
        steps = self.recipe.train.anneal_steps
        mode = self.recipe.diffusion.mode_at(self.diffusion.mode, step, steps)
        return mode, mode.attention_ratio(anneal_ratio(step, steps, self.anneal_from))


@dataclass
class TrainResult:
    model_dir: Path  # the exported diffusion checkpoint
    steps: int
    tokens_trained: int
    first_loss: float | None  # loss of the first step this process ran (None when resumed at the end)
    last_loss: float | None
    validation: dict | None  # the last validation figures

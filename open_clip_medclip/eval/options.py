"""What an evaluation takes and what it gives back: one options type and one result type for zero-shot, retrieval,
the linear probe and fine-tuning (`medclip eval ...` builds the options from its flags; defaults are the flags')."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from open_clip_medclip.errors import UserError
from open_clip_medclip.eval.metrics import DEFAULT_BOOTSTRAP, RETRIEVAL_KS

DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
SELECT_METRICS = ("accuracy", "macro_auc", "loss")
# The fine-tuning settings recorded in finetune.json and the saved classifier, in their file order.
FINETUNE_SETTINGS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_fraction", "val_fraction", "train_fraction",
                     "freeze", "patience", "select", "precision", "workers", "seed", "seeds", "bootstrap")


@dataclass
class EvalOptions:
    """Every evaluation's settings; each task reads its own section and the shared one."""

    # every task: loading, bootstrap 95% CIs, seed (bootstrap, probe, fine-tune carve), smoke-run limit
    batch_size: int = 32
    workers: int = 0
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    max_images: int | None = None
    progress: bool = True
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None
    # zero-shot: prompt set / draw / re-draws (None = the suite's), ensembling, manifest hash check
    prompts: str | Mapping | None = None
    prompts_per_class: int | None | str = "default"
    prompt_seed: int | None = None
    prompt_runs: int | None = None
    ensemble: str | None = None
    verify_hashes: bool = False
    # retrieval: the sentence pool (`text,label` CSV; None = the suite's prompts) and the k of P@k / R@k
    texts: str | Path | None = None
    ks: Sequence[int] = RETRIEVAL_KS
    # linear probe and fine-tuning: seeded per-class share of the train split; the probe's C grid
    train_fraction: float = 1.0
    cs: Sequence[float] = DEFAULT_CS
    # fine-tuning: budget and protocol, identical for every start and seed of one call
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    val_fraction: float = 0.2
    freeze: bool = False
    patience: int | None = None
    select: str | None = None  # default: accuracy (multi-class), macro_auc (multi-label)
    precision: str = "amp"
    seeds: int = 1

    def finetune_settings(self, result_only: bool = False) -> dict:
        """The fine-tuning record; `result_only`: without what cannot change a run's result (workers, seeds,
        bootstrap), i.e. what a saved run is keyed on."""
        skip = ("workers", "seeds", "bootstrap") if result_only else ()
        return {name: getattr(self, name) for name in FINETUNE_SETTINGS if name not in skip}

    def check(self) -> None:
        """Fine-tuning's bounds, as one-line user errors naming the flag."""
        if not 0 < self.train_fraction <= 1:
            raise UserError(f"--train-fraction {self.train_fraction}: must be in (0, 1]")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.epochs < 1 or self.batch_size < 2 or self.seeds < 1:
            raise UserError("--epochs and --seeds must be at least 1, --batch-size at least 2")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"--patience {self.patience}: must be at least 1")
        if self.select is not None and self.select not in SELECT_METRICS:
            raise UserError(f"--select {self.select}: choose from {', '.join(SELECT_METRICS)}")


@dataclass
class EvalResult:
    """`metrics` (JSON-ready: what the task's `<task>.json` holds) plus what plots need: the test images'
    embeddings, targets and scores (zero-shot: class scores, retrieval: image-text similarity, probe and
    fine-tune: logits) and the suite entries they belong to."""

    metrics: dict
    features: np.ndarray | None = None
    targets: np.ndarray | None = None
    scores: np.ndarray | None = None
    entries: list = field(default_factory=list)

"""Fine-tuning for classification (MedCLIP's supervised table): an image tower + a new linear head, all trained.

Protocol, for every start (`--init checkpoint | imagenet | random`) and seed, through the same code:

- data: the suite's `train` split; a seeded per-class `val_fraction` of it is carved off for model selection and
  early stopping, then a seeded per-class `train_fraction` (1 %, 10 %, 100 %) of the rest is trained on. The carve
  and the fraction depend only on the base seed, so every start and seed sees the same images. The `test` split
  is read once, after training, by the selected model;
- training: AdamW (no weight decay on biases and norm gains), linear warm-up then cosine decay per step, MedCLIP's
  training augmentation (`open_clip_medclip.augment`), bf16 autocast on CUDA, cross-entropy (multi-class) or
  binary cross-entropy per finding (multi-label);
- selection: after each epoch the validation split is scored (accuracy, or mean AUC for multi-label; ties go to the
  lower validation loss, then the earlier epoch); the best epoch's weights are the result, `patience` stops early;
- `freeze=True` is the linear probe (`linear_probe.fit_linear_probe`: logistic regression on frozen, L2-normalised
  embeddings of the whole train split, C by cross-validation), saved as the same kind of classifier.

Each run keeps `progress.pt` (everything needed to continue: weights, optimizer, RNG states, history, best weights)
written atomically after every epoch, so an interrupted run resumes where it stopped and reaches the same result;
a finished run leaves `classifier.safetensors` and `run.json` (its test logits) and is reused by the next call
with the same settings; different settings restart it. Here: the runs (reuse, resume, restart) and the summary.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from open_clip_medclip.atomic import write_text
from open_clip_medclip.checkpoints import unreadable_reason
from open_clip_medclip.eval import finetune_train
from open_clip_medclip.eval.classifier import _file_digest, build_classifier, check_init, save_classifier
from open_clip_medclip.eval.finetune_table import _spread, compare_starts, comparison_table
from open_clip_medclip.eval.metrics import classification_metrics, multilabel_auc
from open_clip_medclip.eval.options import EvalOptions, EvalResult
from open_clip_medclip.eval.suites.definitions import SuiteError
from open_clip_medclip.eval.suites.load import Suite, SuiteEntry

CLASSIFIER_FILE = "classifier.safetensors"
RUN_FILE = "run.json"
RUNS_FOLDER = "finetune_runs"


def run_key(suite: Suite, model_name: str, init: str, checkpoint: str | None, seed: int,
            options: EvalOptions, test: Sequence[SuiteEntry] = ()) -> str:
    """What a run's result (and its stored test logits) depends on; a saved run with another key is restarted."""
    settings = options.finetune_settings(result_only=True)
    payload = {"suite": suite.manifest_sha256, "model": model_name, "init": init, "seed": seed,
               "test": hashlib.sha256("\n".join(e.id for e in test).encode()).hexdigest(),
               "checkpoint": _file_digest(checkpoint) if init == "checkpoint" else None, **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_one(suite: Suite, splits: finetune_train.Splits, model_name: str, init: str, checkpoint: str | None, seed: int,
            options: EvalOptions, device: str | torch.device, run_dir: Path, *, progress: bool = True,
            restart: bool = False, after_epoch: Callable[[int], None] | None = None) -> dict:
    """One start and seed: reuse a finished run with the same settings, resume an interrupted one, or train; then
    the test split, once. Returns the run record (also in `run_dir/run.json`)."""
    key = run_key(suite, model_name, init, checkpoint, seed, options, splits.test)
    record_path, classifier_path = run_dir / RUN_FILE, run_dir / CLASSIFIER_FILE
    if restart and run_dir.exists():
        shutil.rmtree(run_dir)
    if record_path.is_file() and classifier_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("config_key") == key:
            if progress:
                print(f"   {run_dir.name}: reusing the finished run", flush=True)
            return record
    stale = run_dir / finetune_train.PROGRESS_FILE
    if stale.is_file():
        reason = unreadable_reason(str(stale))
        saved_key = None if reason else torch.load(stale, map_location="cpu", weights_only=True).get("config_key")
        if saved_key != key:
            if progress:
                print(f"   {run_dir.name}: {'settings changed' if reason is None else reason}; restarting",
                      flush=True)
            shutil.rmtree(run_dir)
    started = time.perf_counter()
    classifier = build_classifier(model_name, init, suite.classes, multilabel=suite.multilabel,
                                  checkpoint=checkpoint, seed=seed)
    if options.freeze:
        training = finetune_train._frozen_classifier(classifier, suite, options, seed, device, progress)
    else:
        training = finetune_train.train_classifier(classifier, suite, splits.train, splits.val, options, seed, device,
                                                   run_dir, key, progress, after_epoch)
    train_seconds = time.perf_counter() - started
    # The test split, once, by the selected model.
    autocast = finetune_train._autocast(device, options.precision)
    logits, kept, failures = finetune_train.predict_logits(classifier, splits.test, device, options.batch_size,
                                                           options.workers, autocast)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_classifier(classifier, classifier_path, training={
        "suite": suite.name, "manifest_sha256": suite.manifest_sha256, "init": init, "seed": seed,
        "checkpoint": checkpoint, "checkpoint_sha256": _file_digest(checkpoint) if init == "checkpoint" else None,
        "num_train": len(splits.train), "num_val": len(splits.val), "select": training.get("select"),
        "selected_epoch": training.get("best_epoch"), "epochs_run": training.get("epochs_run"),
        "options": options.finetune_settings(result_only=True)})
    record = {"config_key": key, "init": init, "seed": seed, "model": model_name, "checkpoint": checkpoint,
              "num_train": len(splits.train), "num_val": len(splits.val), **training,
              "seconds": train_seconds, "test_kept": kept.tolist(), "test_failures": failures,
              "test_logits": logits.tolist(), "classifier": str(classifier_path)}
    write_text(record_path, json.dumps(record) + "\n")
    with contextlib.suppress(FileNotFoundError):
        (run_dir / finetune_train.PROGRESS_FILE).unlink()
    return record


def run_finetune(suite: Suite, model_name: str, inits: Sequence[str], checkpoint: str | None,
                 options: EvalOptions, device: str | torch.device, work_dir: Path, *, restart: bool = False,
                 after_epoch: Callable[[int], None] | None = None) -> EvalResult:
    """Every start x seed (`options.seed` .. + seeds - 1) on identical splits, at most `options.max_images` test
    images; the result's metrics are the summary (finetune.json), its targets the test targets."""
    options.check()
    progress = options.progress
    inits = list(dict.fromkeys(inits))
    for init in inits:  # cheap refusals before any training
        check_init(model_name, init, checkpoint)
    splits = finetune_train.split_suite(suite, 0.0 if options.freeze else options.val_fraction,
                                        1.0 if options.freeze else options.train_fraction, options.seed)
    if options.max_images is not None:
        splits.test = splits.test[:options.max_images]
    suite.check_images(splits.train + splits.val + splits.test)
    seeds = list(range(options.seed, options.seed + options.seeds))
    runs: dict[str, list[dict]] = {}
    for init in inits:
        for seed in seeds:
            if progress:
                print(f"== {suite.name}: {model_name} from {init}, seed {seed}", flush=True)
            runs.setdefault(init, []).append(run_one(suite, splits, model_name, init, checkpoint, seed, options,
                                                     device, work_dir / f"{init}-seed{seed}", progress=progress,
                                                     restart=restart, after_epoch=after_epoch))
    kept = runs[inits[0]][0]["test_kept"]
    if any(r["test_kept"] != kept for rs in runs.values() for r in rs):
        raise SuiteError(f"{suite.source}: test images failed to load in some runs only; rerun with --restart")
    targets = suite.label_index([splits.test[i] for i in kept])
    logits = {init: np.stack([np.asarray(r["test_logits"], np.float64) for r in rs]) for init, rs in runs.items()}
    paired = compare_starts(suite, targets, logits, options.bootstrap, options.seed)
    summary: dict = {"suite": suite.name, "manifest_sha256": suite.manifest_sha256, "classes": suite.classes,
                     "multilabel": suite.multilabel, "model": model_name, "checkpoint": checkpoint,
                     "options": options.finetune_settings(), "seeds": seeds, "device": str(device),
                     "num_train": len(splits.train), "num_val": len(splits.val), "num_test": len(kept),
                     "test_failures": runs[inits[0]][0]["test_failures"], "test_targets": targets.tolist(),
                     "starts": {}}
    for init, rs in runs.items():
        per_seed = []
        for r, seed_logits in zip(rs, logits[init]):
            if suite.multilabel:
                metrics = multilabel_auc(targets, seed_logits, suite.classes, options.bootstrap, options.seed)
            else:
                metrics = classification_metrics(targets, seed_logits, suite.classes, options.bootstrap,
                                                 options.seed)
            per_seed.append({"seed": r["seed"], "metrics": metrics, "selected_epoch": r.get("best_epoch"),
                             "validation": r.get("best_val"), "history": r.get("history"), "probe": r.get("probe"),
                             "seconds": r["seconds"], "classifier": r["classifier"],
                             "train_failures": r["train_failures"], "test_logits": r["test_logits"]})
        names = ("macro_auc",) if suite.multilabel else ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
        summary["starts"][init] = {
            "paired": paired[init],
            "spread": {n: _spread([p["metrics"][n]["value"] for p in per_seed]) for n in names},
            "selected_epochs": [p["selected_epoch"] if p["selected_epoch"] is not None else "CV" for p in per_seed],
            "runs": per_seed}
    summary["table"] = comparison_table(summary)
    return EvalResult(metrics=summary, targets=targets)

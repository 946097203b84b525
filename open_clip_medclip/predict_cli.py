"""`medclip predict IMAGES_OR_FOLDERS...`: zero-shot predictions for your own X-rays, one CSV row per image.

    medclip predict xrays/ more.dcm list.txt --model medclip-swin --pretrained ckpt.pt --out predictions.csv

Inputs: image files, folders (recursive: .png .jpg .jpeg .dcm .dicom .tif .tiff .bmp, and extension-less DICOMs),
and CSV/TXT lists of paths (a `path`/`image`/`file` column or the first one; one path a line; relative to the list).
Decoding is the shard builder's (`shards.images.load_grayscale`): 8/16-bit PNG/JPEG rescaled from their own range,
DICOM through modality and VOI LUTs with MONOCHROME1 inverted.

Tasks: by default the 14 CheXpert findings, multi-label (an independent probability per finding from CheXzero-style
"finding" / "no finding" prompt pairs, as `medclip eval zeroshot` scores multi-label suites); `--findings` picks a
subset. `--classes A B ...` and/or `--prompts NAME|FILE` make it multi-class: MedCLIP prompt ensembles, softmax.

Outputs (each written atomically: a killed run leaves the previous files, never half a CSV):
- `--out` CSV: `path`, one probability column per class/finding, `top_class`;
- `<out>.json` beside it: model, checkpoint sha256, classifier (prompt set, prompts sha256, ensemble), versions,
  device, counts;
- `<out stem>.rejects.csv`: every input that could not be predicted, with the reason (empty file, not an image,
  corrupt, unreadable DICOM, missing);
- `--heatmaps DIR` (staged, moved in when the run succeeds): per image, `<n>_<name>.npz` (the exact per-location logit shares on the feature grid, which
  average to the logits) and one PNG per class drawn over the model's input.

Exit codes: 0 every input predicted; 2 bad invocation (unknown model, finding or prompt set, no inputs, a path given
on the command line that does not exist); 3 some inputs were rejected (listed in the rejects file; the rest are
predicted and written).

Classifiers are pluggable: `build_classifier` returns any `zero_shot.ImageClassifier` (classes, activation,
logits(images), provenance()). `--classifier FILE` takes a classifier saved by `medclip eval finetune`
(`classifier.safetensors`) instead: model, preprocessing and class names come from the file (so `--model`,
`--pretrained` and the prompt options are refused with it), and the provenance records the file's sha256 and the
training record it holds.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import re
import sys
import time
from pathlib import Path

from open_clip_medclip import atomic
from open_clip_medclip.errors import UserError, unknown_name_error
from open_clip_medclip.image_inputs import IMAGE_SUFFIXES, collect_inputs

REJECTED_EXIT_CODE = 3
DEFAULT_MODEL = "medclip-swin"
DEFAULT_ENSEMBLE = "logit"
# Options that describe a zero-shot classifier; a saved fine-tuned classifier (`--classifier`) fixes all of them.
ZERO_SHOT_OPTIONS = ("model", "pretrained", "findings", "classes", "prompts", "prompts_per_class", "ensemble")
MIN_DRAWN_SIDE = 256  # heatmap PNGs are drawn at least this large
VERSIONED = ("open_clip_medclip", "open_clip_torch", "torch", "torchvision", "timm", "transformers", "numpy",
             "pillow", "pydicom")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medclip predict", description="Zero-shot predictions for chest X-ray files, folders or lists.",
        epilog=f"Exit codes: 0 all predicted, 2 bad invocation, {REJECTED_EXIT_CODE} some inputs rejected "
               "(see the rejects file).")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS", help="image files, folders, CSV/TXT lists")
    parser.add_argument("--classifier", default=None, metavar="FILE",
                        help="a fine-tuned classifier saved by `medclip eval finetune` (classifier.safetensors): "
                             "model, preprocessing and classes come from it")
    parser.add_argument("--model", default=None, help=f"OpenCLIP model name (default {DEFAULT_MODEL})")
    parser.add_argument("--pretrained", default=None, help="checkpoint file/dir or tag; omit or 'none' for random weights")
    parser.add_argument("--out", default="predictions.csv", help="CSV of predictions (JSON provenance beside it)")
    parser.add_argument("--findings", nargs="+", default=None,
                        help="multi-label over these CheXpert findings (default: all 14)")
    parser.add_argument("--classes", nargs="+", default=None, help="multi-class (softmax) over these classes")
    parser.add_argument("--prompts", default=None,
                        help="prompt set for --classes: chexpert, covid, rsna, rsna-corrected or a JSON file "
                             "(default: the packaged set that has the classes, else the class names)")
    parser.add_argument("--prompts-per-class", type=int, default=None, help="sample N prompts per class (default all)")
    parser.add_argument("--prompt-seed", type=int, default=42)
    parser.add_argument("--ensemble", choices=("logit", "embed"), default=None,
                        help="logit = MedCLIP's PromptClassifier (default), embed = OpenCLIP's")
    parser.add_argument("--heatmaps", default=None, metavar="DIR", help="write per-class heatmaps (PNG + raw arrays)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    parser.add_argument("--max-images", type=int, default=None, help="predict only the first N inputs (smoke runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_task(args: argparse.Namespace) -> None:
    """Task options checked before the model loads (names, prompt sets)."""
    from open_clip_medclip.findings import CHEXPERT_FINDINGS

    if args.classifier:
        given = [f"--{name.replace('_', '-')}" for name in ZERO_SHOT_OPTIONS if getattr(args, name) is not None]
        if given:
            raise UserError(f"--classifier {args.classifier}: the model, preprocessing and classes come from the file; "
                            f"drop {', '.join(given)}")
    if args.findings and (args.classes or args.prompts):
        raise UserError("--findings (multi-label) cannot be combined with --classes/--prompts (multi-class)")
    for name in args.findings or ():
        if name not in CHEXPERT_FINDINGS:
            raise unknown_name_error("finding", name, CHEXPERT_FINDINGS, "use the CheXpert names, e.g. 'Pleural Effusion'")
    if args.prompts_per_class is not None and args.prompts_per_class < 1:
        raise UserError(f"--prompts-per-class {args.prompts_per_class}: must be at least 1")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images {args.max_images}: must be at least 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.classes or args.prompts:
        args.class_prompts, args.prompt_set = resolve_class_prompts(args)


def resolve_class_prompts(args: argparse.Namespace) -> tuple[dict[str, list[str]], str]:
    from open_clip_medclip.zero_shot import default_prompt_set, prompts

    name = args.prompts or (default_prompt_set(args.classes) if args.classes else None)
    try:
        if name is None:
            return {c: [c] for c in args.classes}, "class names"
        return prompts(name, classes=args.classes, per_class=args.prompts_per_class, seed=args.prompt_seed), name
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"--prompts {name}: {exc}") from exc


def build_classifier(args: argparse.Namespace, model, tokenizer):
    """The classifier the options describe (any `zero_shot.ImageClassifier`)."""
    from open_clip_medclip.zero_shot import ZeroShotClassifier

    if getattr(args, "class_prompts", None):
        classifier = ZeroShotClassifier.from_prompts(model, tokenizer, args.class_prompts,
                                                     args.ensemble or DEFAULT_ENSEMBLE)
        classifier.description["prompt_set"] = args.prompt_set
        return classifier
    classifier = ZeroShotClassifier.multilabel(model, tokenizer, args.findings)
    classifier.description["prompt_set"] = "chexzero pairs"
    return classifier


def load_task_classifier(args: argparse.Namespace, device) -> tuple:
    """(classifier, preprocess, preprocessing config) for the options: the fine-tuned classifier file (`--classifier`) or
    a zero-shot classifier of `--model`/`--pretrained`. `--heatmaps` on a tower without exact heatmaps is refused
    (one line) before any text is embedded."""
    from open_clip_medclip.heatmaps import check_tower

    if args.classifier:
        from open_clip_medclip.eval.classifier import load_classifier as load_fine_tuned

        classifier = load_fine_tuned(args.classifier, device)
        if args.heatmaps:
            check_tower(classifier.tower)
        return classifier, classifier.preprocess, classifier.preprocess_cfg
    from open_clip_medclip.eval.embed import load_model

    model, preprocess, tokenizer = load_model(args.model or DEFAULT_MODEL, args.pretrained, device)
    if args.heatmaps:
        check_tower(model.visual)  # a tower where pooling and projection do not commute: one line, before any work
    return build_classifier(args, model, tokenizer), preprocess, model.visual.preprocess_cfg


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


class HeatmapWriter:
    """Per image: `<n>_<name>.npz` (exact shares on the feature grid, classes, logits) and a PNG per class, written
    into a staging folder whose files replace those of the heatmap folder only when the run succeeds."""

    def __init__(self, folder: Path, classes: list[str], preprocess_cfg: dict):
        self.folder, self.classes = folder, classes
        self.mean, self.std = float(preprocess_cfg["mean"][0]), float(preprocess_cfg["std"][0])
        self.stage: Path | None = None

    def write(self, index: int, path: Path, image, shares, logits) -> None:
        import numpy as np

        from open_clip_medclip.heatmaps import overlay_png, upsample

        stem = f"{index:05d}_{_slug(path.stem)}"
        np.savez(self.stage / f"{stem}.npz", shares=shares, logits=logits, classes=np.array(self.classes))
        picture = (image[0].cpu().numpy() * self.std + self.mean).clip(0, 1)  # the model's input (first channel)
        if max(picture.shape) < MIN_DRAWN_SIDE:  # small model inputs (128 px) are drawn larger, to be readable
            factor = -(-MIN_DRAWN_SIDE // max(picture.shape))
            picture = upsample(picture[None], (picture.shape[0] * factor, picture.shape[1] * factor))[0].clip(0, 1)
        drawn = upsample(shares, picture.shape)
        for c, cls in enumerate(self.classes):
            (self.stage / f"{stem}__{_slug(cls)}.png").write_bytes(overlay_png(picture, drawn[c]))


def run_predictions(classifier, paths: list[Path], preprocess, batch_size: int = 32, workers: int = 0,
                    heatmaps: HeatmapWriter | None = None, progress: bool = True):
    """(per-image logits (n, C) in input order of the kept images, kept positions, rejects [{index, image, error}])."""
    import numpy as np
    from tqdm import tqdm

    from open_clip_medclip.eval.cli import staged_outputs
    from open_clip_medclip.eval.embed import image_batches

    logits, kept, rejects = [], [], []
    staging = staged_outputs(heatmaps.folder.parent, heatmaps.folder.name) if heatmaps else contextlib.nullcontext()
    with staging as stage, tqdm(total=len(paths), unit="img", desc="predict", disable=not progress) as bar:
        if heatmaps is not None:
            heatmaps.stage = stage
        for images, indices, failed in image_batches(paths, preprocess, batch_size, workers):
            rejects += failed
            if images is not None:
                batch = classifier.logits(images).float().cpu().numpy()
                logits.append(batch)
                kept += indices
                if heatmaps is not None:
                    shares = classifier.heatmaps(images).cpu().numpy()
                    for row, index in enumerate(indices):
                        heatmaps.write(index, paths[index], images[row], shares[row], batch[row])
            bar.update(len(indices) + len(failed))
    scores = np.concatenate(logits) if logits else np.zeros((0, len(classifier.classes)), np.float32)
    return scores, kept, rejects


def rejects_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.rejects.csv")


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic.atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _reason(error: str) -> str:
    head = error.split(":", 1)[0]
    return head if re.fullmatch(r"[a-z_]+", head) else "corrupt_image"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    check_task(args)
    paths = collect_inputs(args.inputs)[:args.max_images]
    if not paths:
        raise UserError(f"no images found in {' '.join(args.inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    out = Path(args.out)
    if out.suffix.lower() != ".csv":
        raise UserError(f"--out {out}: expected a .csv file name")
    out.parent.mkdir(parents=True, exist_ok=True)

    from open_clip_medclip.errors import resolve_device
    from open_clip_medclip.eval.classifier import sha256_of
    from open_clip_medclip.zero_shot import activate

    device = resolve_device(args.device)
    classifier, preprocess, preprocess_cfg = load_task_classifier(args, device)
    if args.heatmaps and not hasattr(classifier, "heatmaps"):
        raise UserError(f"--heatmaps: the {type(classifier).__name__} classifier cannot draw heatmaps")
    writer = HeatmapWriter(Path(args.heatmaps), classifier.classes, preprocess_cfg) if args.heatmaps else None
    logits, kept, rejects = run_predictions(classifier, paths, preprocess, args.batch_size, args.workers, writer,
                                            progress=not args.quiet)
    probabilities = activate(logits, classifier.activation)
    classes = list(classifier.classes)
    rows = [[str(paths[i]), *(float(p) for p in probs), classes[int(probs.argmax())]]
            for i, probs in zip(kept, probabilities)]
    write_csv(rejects_path(out), ["path", "reason", "error"],
              [[r["image"], _reason(r["error"]), r["error"]] for r in rejects])
    write_csv(out, ["path", *classes, "top_class"], rows)
    provenance = {
        "command": "medclip predict", "argv": list(sys.argv[1:] if argv is None else argv),
        "model": getattr(classifier, "model_name", None) or args.model or DEFAULT_MODEL,
        "pretrained": args.pretrained, "checkpoint_sha256": sha256_of(args.pretrained),
        "classifier": classifier.provenance(), "device": str(device), "batch_size": args.batch_size,
        "versions": versions(), "num_inputs": len(paths), "num_predicted": len(rows), "num_rejected": len(rejects),
        "outputs": {"predictions": str(out), "rejects": str(rejects_path(out)), "heatmaps": args.heatmaps},
        "seconds": round(time.time() - started, 3),
    }
    atomic.write_text(out.with_suffix(".json"), json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
    print(f"medclip predict: {len(rows)} of {len(paths)} image(s) predicted ({classifier.provenance().get('task', '')}"
          f" over {len(classes)} class(es)) -> {out} (provenance {out.with_suffix('.json')})"
          + (f"; heatmaps in {args.heatmaps}" if args.heatmaps else ""))
    if rejects:
        shown = ", ".join(f"{Path(r['image']).name} ({_reason(r['error'])})" for r in rejects[:5])
        more = f" and {len(rejects) - 5} more" if len(rejects) > 5 else ""
        print(f"medclip predict: {len(rejects)} input(s) rejected: {shown}{more}; all listed in {rejects_path(out)}",
              file=sys.stderr)
        return REJECTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    from open_clip_medclip.cli import run_command

    raise SystemExit(run_command("predict", lambda: main(sys.argv[1:])))

"""`medclip smoke`: build a MedCLIP model, embed bundled real X-rays and a few report sentences, print similarities.

A quick check that the installation works end to end (offline, random weights unless --pretrained is given).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from open_clip_medclip.sources import SAMPLE_DATA_DIR as SAMPLE_DIR

DEFAULT_IMAGES = (
    "nih_cxr14/images/00000061_015.jpg",
    "kermany_pediatric/images/normal/IM-0115-0001.jpg",
)
DEFAULT_SENTENCES = (
    "Heart size normal and lungs are clear.",
    "Right lower lobe consolidation concerning for pneumonia.",
    "Moderate left pleural effusion.",
    "No pneumothorax.",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclip smoke", description=__doc__)
    parser.add_argument("--model", default="medclip-swin")
    parser.add_argument("--pretrained", default=None, help="checkpoint file (official MedCLIP or OpenCLIP)")
    parser.add_argument("--image", action="append", default=None, help="image path (repeatable)")
    parser.add_argument("--text", action="append", default=None, help="sentence (repeatable)")
    parser.add_argument("--output-json", default=None, help="write the similarity matrix here")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu; a requested device "
                             "that this machine lacks is an error)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from open_clip_medclip.errors import UserError, resolve_device
    from open_clip_medclip.model_names import check_model_name, check_pretrained

    images = args.image or [str(SAMPLE_DIR / p) for p in DEFAULT_IMAGES]
    texts = args.text or list(DEFAULT_SENTENCES)
    if any(not t.strip() for t in texts):
        raise UserError("--text: empty sentence")
    device = resolve_device(args.device)  # before any model work: a missing accelerator fails in one line
    check_model_name(args.model)
    pretrained = check_pretrained(args.model, args.pretrained)
    import open_clip
    import torch
    from PIL import Image, UnidentifiedImageError

    import open_clip_medclip  # noqa: F401

    def load(path: str) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                return preprocess(image)
        except UnidentifiedImageError:
            raise UserError(f"{path}: not an image file PIL can read") from None
        except (OSError, SyntaxError) as exc:  # truncated or corrupt image data
            raise UserError(f"{path}: cannot read the image ({exc})") from None

    for path in images:
        if not Path(path).is_file():
            raise UserError(f"--image {path}: no such file")
    if args.output_json and not Path(args.output_json).resolve().parent.is_dir():
        raise UserError(f"--output-json {args.output_json}: its folder does not exist")
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=pretrained, device=device)
    tokenizer = open_clip.get_tokenizer(args.model)
    model.eval()
    pixels = torch.stack([load(p) for p in images]).to(device)
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(texts).to(device), normalize=True)
    similarity = (image_features @ text_features.T).float().cpu()
    weights = pretrained or "random init (no weights given)"
    print(f"{args.model} [{weights}] on {device}: {image_features.shape[1]}-d embeddings; cosine similarity image x text:")
    width = max(len(Path(p).name) for p in images)
    print(" " * (width + 2) + "  ".join(f"t{j}" .rjust(6) for j in range(len(texts))))
    for path, row in zip(images, similarity.tolist()):
        print(f"{Path(path).name:<{width}}  " + "  ".join(f"{v:+.3f}" for v in row))
    for j, text in enumerate(texts):
        print(f"  t{j}: {text}")
    if args.output_json:
        from open_clip_medclip.atomic import write_text

        write_text(args.output_json, json.dumps({"model": args.model, "pretrained": pretrained, "device": device,
                                                 "images": images, "texts": texts,
                                                 "similarity": similarity.tolist()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    from open_clip_medclip.cli import run_command

    raise SystemExit(run_command("smoke", lambda: main([a for a in sys.argv[1:] if a != "--debug"])))

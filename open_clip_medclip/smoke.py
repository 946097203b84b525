"""`medclip smoke`: build a MedCLIP model, embed bundled real X-rays and a few report sentences, print similarities.

A quick check that the installation works end to end (offline, random weights unless --pretrained is given).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import open_clip
    import torch
    from PIL import Image

    import open_clip_medclip  # noqa: F401

    images = args.image or [str(SAMPLE_DIR / p) for p in DEFAULT_IMAGES]
    texts = args.text or list(DEFAULT_SENTENCES)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained)
    tokenizer = open_clip.get_tokenizer(args.model)
    model.eval()
    pixels = torch.stack([preprocess(Image.open(p)) for p in images])
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(texts), normalize=True)
    similarity = image_features @ text_features.T
    weights = args.pretrained or "random init (no weights given)"
    print(f"{args.model} [{weights}]: {image_features.shape[1]}-d embeddings; cosine similarity image x text:")
    width = max(len(Path(p).name) for p in images)
    print(" " * (width + 2) + "  ".join(f"t{j}" .rjust(6) for j in range(len(texts))))
    for path, row in zip(images, similarity.tolist()):
        print(f"{Path(path).name:<{width}}  " + "  ".join(f"{v:+.3f}" for v in row))
    for j, text in enumerate(texts):
        print(f"  t{j}: {text}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"model": args.model, "pretrained": args.pretrained,
                                                      "images": images, "texts": texts,
                                                      "similarity": similarity.tolist()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

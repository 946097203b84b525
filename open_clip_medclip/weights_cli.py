"""`medclip convert` and `medclip info`: official MedCLIP checkpoints in, OpenCLIP local-dirs out."""
from __future__ import annotations

import argparse
import json
import sys

from open_clip_medclip.weights import CheckpointError, describe_checkpoint, export_local_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="write an OpenCLIP local-dir (safetensors + config + tokenizer)")
    convert.add_argument("source", help="official pytorch_model.bin, the released zip, or an OpenCLIP checkpoint")
    convert.add_argument("--model", default=None, help="medclip-swin or medclip-resnet50 (default: detected)")
    convert.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    info = sub.add_parser("info", help="say what a checkpoint file or local-dir folder is")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import open_clip_medclip  # noqa: F401  (registers the models)

    try:
        if args.command == "info":
            info = describe_checkpoint(args.checkpoint)
            if args.json:
                print(json.dumps(info.as_dict(), indent=2))
            else:
                print(f"{info.path}: {info.kind} (image tower: {info.vision_arch}, container: {info.container})")
                if info.num_tensors:
                    print(f"  {info.num_tensors} tensors, {info.num_parameters / 1e6:.2f} M values")
                if info.logit_scale is not None:
                    print(f"  logit_scale {info.logit_scale:.4f} (scale {2.718281828 ** info.logit_scale:.2f})")
                for note in info.notes:
                    print(f"  {note}")
            return 0
        model = args.model
        if model is None:
            from open_clip_medclip.weights import suggest_model_name

            model = suggest_model_name(describe_checkpoint(args.source).kind)
        out = export_local_dir(model, args.source, args.out)
        print(f"wrote {out} ({model}); load it with open_clip.create_model_and_transforms('local-dir:{out}')")
        return 0
    except CheckpointError as exc:
        print(f"medclip {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

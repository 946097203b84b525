"""`medclip convert` and `medclip info`: official MedCLIP checkpoints in, OpenCLIP local-dirs out."""
from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="write an OpenCLIP local-dir (safetensors + config + tokenizer)")
    convert.add_argument("source", help="official pytorch_model.bin, the released zip (or the folder it unzips to), "
                         "or an OpenCLIP checkpoint")
    convert.add_argument("--model", default=None, help="medclip-swin or medclip-resnet50 (default: detected)")
    convert.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    info = sub.add_parser("info", help="say what a checkpoint file or local-dir folder is")
    info.add_argument("checkpoint", help="checkpoint file, the folder holding one, or an OpenCLIP local-dir")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `convert` or `info`. Bad input raises `CheckpointError` (a `UserError`): the `medclip` entry point prints
    it as one line naming the file, exit code 2."""
    args = build_parser().parse_args(argv)
    import open_clip_medclip  # noqa: F401  (registers the models)
    from open_clip_medclip.weights import describe_checkpoint, export_local_dir, resolve_source, suggest_model_name

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
    from open_clip_medclip.model_names import check_model_name, medclip_model_names
    from open_clip_medclip.weights import OFFICIAL_RESNET, OFFICIAL_SWIN, CheckpointError

    model = args.model
    if model is not None:
        check_model_name(model)  # a typo fails before the checkpoint is read
        source = resolve_source(args.source)
    else:
        source = resolve_source(args.source)
        info = describe_checkpoint(source)
        if info.kind not in (OFFICIAL_SWIN, OFFICIAL_RESNET):
            what = "an OpenCLIP checkpoint" if info.kind != "unknown" else "not a MedCLIP or OpenCLIP checkpoint"
            raise CheckpointError(f"{source}: {what}, so the model cannot be detected; pass --model "
                                  f"({', '.join(medclip_model_names())})")
        model = suggest_model_name(info.kind)
    out = export_local_dir(model, source, args.out)
    print(f"wrote {out} ({model}); load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


if __name__ == "__main__":
    from open_clip_medclip.cli import run_command

    _argv = sys.argv[1:]
    raise SystemExit(run_command(_argv[0] if _argv and _argv[0] in ("convert", "info") else "convert",
                                 lambda: main([a for a in _argv if a != "--debug"])))

"""The `medclip` command: one entry point, one module per subcommand.

Each subcommand module exposes `main(argv: list[str] | None) -> int` with its own argparse parser, so it
also runs as `python -m <module>` and tests call it directly.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("open_clip_medclip.weights_cli", "convert an official MedCLIP checkpoint to an OpenCLIP local-dir"),
    "info": ("open_clip_medclip.weights_cli", "say what a checkpoint file or folder is"),
    "smoke": ("open_clip_medclip.smoke", "embed a bundled real X-ray and a few sentences with a MedCLIP model"),
    "label": ("open_clip_medclip.knowledge.cli", "label report sentences with the 14 CheXpert findings"),
    "shards": ("open_clip_medclip.shards.cli", "build or validate labelled WebDataset shards"),
    "train": ("open_clip_medclip.train", "train inside OpenCLIP's trainer with the semantic matching loss"),
    "eval": ("open_clip_medclip.eval.cli", "zero-shot, retrieval and linear-probe evaluation"),
    "demo": ("open_clip_medclip.demo", "label, shard, train and evaluate on the bundled real sample"),
}


def _usage() -> str:
    lines = ["usage: medclip <command> [options]", "", "commands:"]
    for name, (_, help_text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<8} {help_text}")
    lines.append("")
    lines.append("Run 'medclip <command> --help' for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"medclip: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"medclip: command {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    if name in ("convert", "info"):
        return int(module.main([name, *rest]) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

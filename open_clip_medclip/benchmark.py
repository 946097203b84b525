"""`python -m open_clip_medclip.benchmark eval ...`: CLIP_benchmark with the MedCLIP model type registered.

All CLIP_benchmark arguments pass through. Conveniences for suites built by `medclip eval build-suite`:
`--model_type` defaults to `medclip`, and when `--dataset wds/<name>` points (`--dataset_root`) at a built
suite's `wds/` folder that holds `custom_templates.json`, it becomes the per-class `--custom_template_file`
unless one is given. Example:

    python -m open_clip_medclip.benchmark eval --model medclip-tiny --pretrained none \\
        --dataset wds/nih-pneumonia --dataset_root SUITE/wds --no_amp --num_workers 0 --output out.json
"""
from __future__ import annotations

import sys
from pathlib import Path

TEMPLATES_FILE = "custom_templates.json"


def _value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def prepare_argv(argv: list[str]) -> list[str]:
    """Add `--model_type medclip` and the suite's per-class template file when not given."""
    argv = list(argv)
    if not argv or argv[0] != "eval":
        return argv
    if _value(argv, "--model_type") is None:
        argv += ["--model_type", "medclip"]
    root = _value(argv, "--dataset_root")
    if _value(argv, "--custom_template_file") is None and root and "{" not in root:
        templates = Path(root) / TEMPLATES_FILE
        if templates.is_file():
            argv += ["--custom_template_file", str(templates)]
    return argv


def main(argv: list[str] | None = None) -> int:
    from open_clip_medclip.plugins import clip_benchmark as glue  # registers the model type

    argv = prepare_argv(list(sys.argv[1:] if argv is None else argv))
    saved = sys.argv
    sys.argv = ["clip_benchmark", *argv]  # CLIP_benchmark's parser reads sys.argv
    try:
        glue.cb_cli.main()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

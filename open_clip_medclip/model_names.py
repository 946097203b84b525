"""Check a model name (and a `--pretrained` value) before building a model, so a typo is one line with close
matches instead of OpenCLIP's traceback listing every upstream model.

Every CLI that builds a model calls `check_model_name(args.model)` (and `check_pretrained(model, value)` when it
takes `--pretrained`) before `open_clip.create_model*`. open_clip is imported only when these are called.
"""
from __future__ import annotations

import os
from pathlib import Path

from open_clip_medclip.errors import UserError, did_you_mean

SCHEMAS = ("hf-hub:", "local-dir:")


def _register() -> None:
    """Register the MedCLIP models: importing open_clip does (this package's import hook runs `register()`, or
    ran it already when open_clip came first); the package itself is not imported from here (no import cycle)."""
    import open_clip  # noqa: F401


def medclip_model_names() -> tuple[str, ...]:
    from open_clip_medclip import models

    return tuple(sorted(models.medclip_model_configs()))


def check_model_name(name: str) -> str:
    """Return `name` when OpenCLIP can build it (after registering the MedCLIP models); otherwise raise a
    one-line `UserError` with close matches (MedCLIP names first) and the short list of MedCLIP models."""
    if not name or not name.strip():
        raise UserError("empty model name; MedCLIP models: " + ", ".join(medclip_model_names()))
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if not folder.is_dir():
            raise UserError(f"model {name!r}: {folder} is not a folder (a local-dir: model names a folder written by "
                            "'medclip convert')")
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"model {name!r}: {folder} has no open_clip_config.json, so it is not an OpenCLIP "
                            "local-dir (write one with 'medclip convert')")
        return name
    if name.startswith("hf-hub:"):
        return name
    import open_clip

    _register()
    known = open_clip.list_models()
    if name in known or name.replace("/", "-") in known:
        return name
    ours = medclip_model_names()
    suggestion = did_you_mean(name, ours) or did_you_mean(name, known)
    raise UserError(f"unknown model {name!r}{suggestion}; MedCLIP models: {', '.join(ours)} (any name from "
                    "open_clip.list_models(), hf-hub:ORG/REPO or local-dir:FOLDER also works)")


def check_pretrained(model: str, pretrained: str | os.PathLike | None) -> str | None:
    """None for empty/'none'; the value unchanged when it is a pretrained tag of `model` or an existing file;
    otherwise raise a one-line `UserError` naming it and the tags `model` has."""
    if not pretrained or str(pretrained).lower() == "none":
        return None
    value = str(pretrained)
    path = Path(value)
    if path.is_file():
        return pretrained
    if path.is_dir():
        raise UserError(f"--pretrained {value}: is a folder; pass the checkpoint file inside it, or use the model "
                        f"name 'local-dir:{value}' for an OpenCLIP local-dir")
    if model.startswith(SCHEMAS):
        raise UserError(f"--pretrained {value}: no such file")
    import open_clip

    _register()
    tags = open_clip.list_pretrained_tags_by_model(model)
    if value in tags:
        return pretrained
    known = f"{model}'s pretrained tags: {', '.join(tags)}" if tags else f"{model} has no pretrained tags"
    raise UserError(f"--pretrained {value}: no such file, and not a pretrained tag{did_you_mean(value, tags)} "
                    f"({known})")

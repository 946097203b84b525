"""Suite definitions: the packaged `eval_suites/<name>.json` files and no-code CSV suites, their prompts, and the
errors and file names every suite module shares."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from open_clip_medclip.errors import UserError
from open_clip_medclip.eval.prompts import eval_suites_dir, load_prompt_set, sample_prompts, select_classes
from open_clip_medclip.sources.records import read_csv_header
from open_clip_medclip.sources.suite_csv import safe_id

SUITES_ROOT_ENV = "MEDCLIP_SUITES_ROOT"
MANIFEST_NAME = "manifest.csv"
SUITE_FILE = "suite.json"
MANIFEST_COLUMNS = ("id", "split", "label", "image", "sha256")
SPLITS = ("test", "train")


class SuiteError(UserError, ValueError):
    """A suite definition, raw dataset or manifest cannot be used; the message names the file and the problem."""


class MissingImagesError(SuiteError, FileNotFoundError):
    """Images listed in a suite's manifest are not on disk; the message names them and the manifest."""


def suites_root() -> Path:
    """Where `--suite NAME` looks for built suites: $MEDCLIP_SUITES_ROOT or ~/.cache/open_clip_medclip/suites."""
    return Path(os.environ.get(SUITES_ROOT_ENV, Path.home() / ".cache" / "open_clip_medclip" / "suites"))


def available_suites() -> list[str]:
    """Names of the packaged suite definitions."""
    return sorted(p.stem for p in eval_suites_dir().glob("*.json"))


def load_definition(name_or_path: str | Path) -> dict:
    """A suite definition dict from a packaged name or a JSON path; checks the fields the builder needs."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = eval_suites_dir() / f"{name_or_path}.json"
    if not path.is_file():
        raise SuiteError(f"suite {str(name_or_path)!r}: no such definition (packaged: {', '.join(available_suites())})")
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("name", "classes", "source", "recipe"):
        if key not in definition:
            raise SuiteError(f"{path}: missing field {key!r}")
    definition.setdefault("task", "multiclass")
    definition.setdefault("prompts", {"set": None})
    definition.setdefault("ensemble", "logit")
    definition["_path"] = str(path)
    return definition


def csv_definition(csv_path: str | Path) -> dict:
    """The definition of a no-code CSV suite: classes from the CSV (sorted), class names as prompts, its own splits."""
    path = Path(csv_path)
    task = "multilabel" if "labels" in read_csv_header(path) else "multiclass"
    return {"name": safe_id(path.stem), "classes": [], "task": task, "source": {"format": "csv"},
            "recipe": {"kind": "all"}, "prompts": {"set": None}, "ensemble": "embed", "_path": str(path)}


def suite_prompts(definition: Mapping, prompt_set: str | None = None, per_class: int | None | str = "default",
                  seed: int | None = None) -> dict[str, list[str]]:
    """The prompts per suite class: the definition's set (or `prompt_set`), sampled as it says (or as overridden).

    Without a prompt set every class is prompted by its own name (CLIP_benchmark's `{c}`).
    """
    spec = dict(definition.get("prompts") or {})
    name = prompt_set or spec.get("set")
    classes = list(definition["classes"])
    if not name:
        return {cls: [cls] for cls in classes}
    full = select_classes(load_prompt_set(name), classes, spec.get("class_map"), where=f"prompt set {name!r}")
    n = spec.get("per_class") if per_class == "default" else per_class
    return sample_prompts(full, n, spec.get("seed", 42) if seed is None else seed)

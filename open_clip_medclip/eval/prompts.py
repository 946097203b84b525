"""Class prompts for zero-shot suites: MedCLIP's grids, seeded sampling and CheXzero-style pairs.

Prompt sets are data files in `eval_suites/prompts/*.json` so that they are versioned and hashed with the
results. A class is either a grid (axes expanded as a product in key order and joined with single spaces,
exactly like `medclip.prompts.generate_*_class_prompts`), a list of sentences, or `{"from": "<file>"}` to
reuse another file's sentences. MedCLIP samples `n` prompts per class with an unseeded `random.sample`;
here sampling takes a seed, and seed 42 with one `random.Random` stream over the classes in file order gives
the same draw as the reference scripts' `random.seed(42); generate_chexpert_class_prompts(n)`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

# Prompt-pair templates of CheXzero's notebook: positive "{}" versus negative "no {}".
CHEXZERO_PAIR_TEMPLATES: tuple[str, str] = ("{}", "no {}")

PromptSet = dict[str, list[str]]


def eval_suites_dir() -> Path:
    """The packaged `eval_suites` folder (suite definitions, prompt files, README)."""
    return Path(str(resources.files("open_clip_medclip.eval_suites")))


def prompts_dir() -> Path:
    """The packaged prompt files."""
    return eval_suites_dir() / "prompts"


def available_prompt_sets() -> list[str]:
    """Names of the packaged prompt files (without `.json`)."""
    return sorted(p.stem for p in prompts_dir().glob("*.json"))


def _resolve_file(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    packaged = prompts_dir() / f"{name_or_path}.json"
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"prompt set {str(name_or_path)!r}: no such JSON file and no packaged set of that name "
        f"(packaged: {', '.join(available_prompt_sets())})"
    )


def expand_grid(axes: Mapping[str, Sequence[str]]) -> list[str]:
    """All prompts of a grid: the product of the axes in key order, joined with single spaces."""
    return [" ".join(parts) for parts in itertools.product(*axes.values())]


def _clean(text: str) -> str:
    return " ".join(text.split())


def _class_prompts(spec: object, where: str, normalize: bool) -> list[str]:
    if isinstance(spec, list):
        prompts = [str(s) for s in spec]
    elif isinstance(spec, dict) and set(spec) == {"from"}:
        prompts = load_sentences(spec["from"])
    elif isinstance(spec, dict) and all(isinstance(v, list) for v in spec.values()):
        prompts = expand_grid(spec)
    else:
        raise ValueError(f"{where}: a class must be a list of sentences, a grid of lists or {{'from': name}}")
    if not prompts:
        raise ValueError(f"{where}: no prompts")
    return [_clean(p) for p in prompts] if normalize else prompts


def load_sentences(name_or_path: str | Path) -> list[str]:
    """A sentence-list prompt file (`{"sentences": [...]}`)."""
    path = _resolve_file(name_or_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if "sentences" not in data:
        raise ValueError(f"{path}: expected a 'sentences' list")
    return _class_prompts(data["sentences"], str(path), bool(data.get("normalize_whitespace", False)))


def load_prompt_set(name_or_path: str | Path) -> PromptSet:
    """All prompts per class of a prompt file, in file order (the full grids, not a sample)."""
    path = _resolve_file(name_or_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data.get("classes"), dict):
        raise ValueError(f"{path}: expected a 'classes' object mapping class names to prompts")
    normalize = bool(data.get("normalize_whitespace", False))
    return {cls: _class_prompts(spec, f"{path}: class {cls!r}", normalize) for cls, spec in data["classes"].items()}


def sample_prompts(prompt_set: Mapping[str, Sequence[str]], n: int | None, seed: int | None = 42) -> PromptSet:
    """Draw `n` prompts per class (all when `n` is None or not smaller), one seeded stream in class order.

    Matches MedCLIP's `random.sample(cls_prompts, n)` per class after `random.seed(seed)`.
    """
    rng = random.Random(seed)
    out: PromptSet = {}
    for cls, prompts in prompt_set.items():
        prompts = list(prompts)
        out[cls] = rng.sample(prompts, n) if n is not None and n < len(prompts) else prompts
    return out


def select_classes(prompt_set: Mapping[str, Sequence[str]], classes: Sequence[str],
                   class_map: Mapping[str, str] | None = None, where: str = "prompts") -> PromptSet:
    """Per-class prompt lists in the suite's class order; `class_map` maps a suite class to a prompt-set class."""
    class_map = dict(class_map or {})
    out: PromptSet = {}
    for cls in classes:
        key = class_map.get(cls, cls)
        if key not in prompt_set:
            raise ValueError(f"{where}: no prompts for class {cls!r} (looked up {key!r}; have {sorted(prompt_set)})")
        out[cls] = list(prompt_set[key])
    return out


def chexzero_pairs(classes: Sequence[str], templates: tuple[str, str] = CHEXZERO_PAIR_TEMPLATES) -> dict[str, tuple[str, str]]:
    """CheXzero's positive/negative prompt pair per finding, e.g. 'edema' / 'no edema' (lower-cased)."""
    pos, neg = templates
    return {cls: (pos.format(cls.lower()), neg.format(cls.lower())) for cls in classes}


def prompts_hash(prompts: Mapping[str, Sequence[str]]) -> str:
    """sha256 of the per-class prompt lists, recorded with results so a table names its exact prompts."""
    blob = json.dumps({k: list(v) for k, v in prompts.items()}, ensure_ascii=False, sort_keys=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()

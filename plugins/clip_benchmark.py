"""Host glue for LAION CLIP_benchmark 1.6: a `medclip` model type and small hooks, without touching its code.

CLIP_benchmark has no plugin hook. What we touch, each checked before use (a missing attribute fails loudly with
the version to install):
- `clip_benchmark.models.TYPE2FUNC` / `MODEL_TYPES` (the list `clip_benchmark.cli` imported by reference): the
  `medclip` loader, added before the CLI's parser is built (`register`, run by `python -m open_clip_medclip.benchmark`).
- `clip_benchmark.datasets.builder.build_wds_dataset`: its wds reader only reads class-agnostic templates, so the
  hook gives a suite built by `medclip eval build-suite` its class-specific prompts (`wds/custom_templates.json`, the
  `--custom_template_file` format) and says so on stderr; an explicit `--custom_template_file` still wins.
- `clip_benchmark.metrics.zeroshot_classification.evaluate`: NaN metrics (`acc5` with fewer than 5 classes: invalid
  JSON) are left out, said on stderr, and per-class / macro AUROC is added (`eval.zeroshot.auroc_summary`, the code of
  `medclip eval zeroshot`) from the logits of `run_classification` (wrapped to keep them), rescaled from
  CLIP_benchmark's fixed 100 to the model's own scale.
- `clip_benchmark.metrics.zeroshot_classification.accuracy`: 1.6's calls `float()` on a 1-element array, a TypeError
  under numpy >= 2.4; replaced by the same computation with `.item()`.
`install_hooks` is light and idempotent: it can run inside the import of `open_clip` in a plain `clip_benchmark eval`
(the opt-in autoload) while `clip_benchmark.cli` is half-imported, as it touches only the builder and metrics modules.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys

from open_clip_medclip.plugins import HostMismatchError, missing_attributes, require_host  # noqa: F401

MODEL_TYPE = "medclip"
SUITE_TEMPLATES_FILE = "custom_templates.json"  # written by `medclip eval build-suite` beside classnames.txt
_HOOKED = "_open_clip_medclip_hook"
_PIN = "clip-benchmark==1.6.2"


def _import_clip_benchmark():
    try:
        import clip_benchmark
    except ImportError as exc:  # pragma: no cover - exercised only without the optional dependency
        raise ImportError(
            "CLIP_benchmark is not installed; install it with "
            "`pip install --no-deps clip-benchmark==1.6.2 pycocoevalcap==1.2`"
        ) from exc
    return clip_benchmark


def _require(required: dict) -> None:
    clip_benchmark = _import_clip_benchmark()
    require_host(missing_attributes(required), "clip-benchmark 1.6.x",
                 f"clip-benchmark {getattr(clip_benchmark, '__version__', 'unknown')}", _PIN)


def check_host() -> None:
    """Fail loudly, naming the attribute, if a CLIP_benchmark internal we rely on has gone or changed shape."""
    import clip_benchmark.cli as cb_cli
    import clip_benchmark.models as cb_models

    _require({cb_models: ("TYPE2FUNC", "MODEL_TYPES", "load_clip"), cb_cli: ("main", "get_parser_args", "MODEL_TYPES")})
    missing = []
    if not isinstance(cb_models.TYPE2FUNC, dict):
        missing.append("clip_benchmark.models.TYPE2FUNC (no longer a dict)")
    if cb_cli.MODEL_TYPES is not cb_models.MODEL_TYPES:
        missing.append("clip_benchmark.cli.MODEL_TYPES (no longer the same list as clip_benchmark.models.MODEL_TYPES)")
    if missing:
        require_host(missing, "clip-benchmark 1.6.x", "this install", _PIN)


def load_medclip(model_name: str = "medclip-swin", pretrained: str | None = None, cache_dir: str | None = None,
                 device="cpu"):
    """CLIP_benchmark loader: (model, val transform, tokenizer) with the MedCLIP configs registered.

    `pretrained` may be a checkpoint path, an OpenCLIP tag, or 'none'/'' for random weights. An unknown model
    name is a one-line error with close matches.
    """
    import open_clip

    import open_clip_medclip  # noqa: F401  (registers medclip-* configs and MedCLIP preprocessing)
    from open_clip_medclip.errors import unknown_name_error

    if ":" not in model_name and model_name not in open_clip.list_models():
        raise unknown_name_error("model", model_name, open_clip.list_models())
    pretrained = None if not pretrained or str(pretrained).lower() == "none" else pretrained
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, cache_dir=cache_dir)
    model = model.to(device)
    return model, transform, open_clip.get_tokenizer(model_name)


def register():
    """Make `--model_type medclip` available (idempotent); returns `clip_benchmark.cli`."""
    check_host()
    import clip_benchmark.cli as cb_cli
    import clip_benchmark.models as cb_models

    cb_models.TYPE2FUNC[MODEL_TYPE] = load_medclip
    if MODEL_TYPE not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(MODEL_TYPE)
    return cb_cli


# ----------------------------------------------------------------------------------------------------------------
# Hooks: the suite's prompts for plain `clip_benchmark eval`, and no NaN metrics
# ----------------------------------------------------------------------------------------------------------------
def prepared_cli():
    """`clip_benchmark.cli` with `--model_type medclip` registered and the hooks installed (the front door's piece)."""
    cb_cli = register()
    install_hooks()
    return cb_cli


def suite_templates(data_dir: str, name: str, classes) -> dict[str, list[str]] | None:
    """The class-specific prompts a built suite ships in `<data_dir>/custom_templates.json`, or None.

    Looked up under `wds/<name>` and `<name>` (CLIP_benchmark's keys); a file holding a single suite is used
    whatever name the dataset was given on the command line. Local folders only.
    """
    if not data_dir or "://" in str(data_dir):
        return None
    path = os.path.join(str(data_dir), SUITE_TEMPLATES_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle)
    except (OSError, ValueError) as exc:
        print(f"open_clip_medclip: {path}: unreadable ({exc}); CLIP_benchmark keeps its own templates", file=sys.stderr)
        return None
    value = table.get(f"wds/{name}", table.get(name)) if isinstance(table, dict) else None
    if value is None and isinstance(table, dict):
        distinct = {json.dumps(v, sort_keys=True): v for v in table.values()}
        value = next(iter(distinct.values())) if len(distinct) == 1 else None
    if not isinstance(value, dict):
        return None
    if classes is not None and set(value) != set(classes):
        print(f"open_clip_medclip: {path}: its classes {sorted(value)} are not the dataset's classes "
              f"{sorted(classes)}; CLIP_benchmark keeps its own templates", file=sys.stderr)
        return None
    return {str(cls): [str(t) for t in texts] for cls, texts in value.items()}


def _wrap_build_wds_dataset(original):
    @functools.wraps(original)
    def build_wds_dataset(dataset_name, transform, split="test", data_dir="root", cache_dir=None):
        dataset = original(dataset_name, transform, split=split, data_dir=data_dir, cache_dir=cache_dir)
        classes = getattr(dataset, "classes", None)
        if classes is None:  # retrieval datasets: nothing to do
            return dataset
        prompts = suite_templates(data_dir, dataset_name, classes)
        if prompts is not None:
            counts = sorted({len(v) for v in prompts.values()})
            shown = "-".join(str(c) for c in (counts[0], counts[-1])) if len(counts) > 1 else str(counts[0])
            print(f"open_clip_medclip: wds/{dataset_name}: using the suite's class-specific prompts "
                  f"({shown} per class) from {os.path.join(str(data_dir), SUITE_TEMPLATES_FILE)}", file=sys.stderr)
            dataset.templates = prompts
        elif getattr(dataset, "templates", None) is None:
            print(f"open_clip_medclip: wds/{dataset_name}: no templates in {data_dir}; pass --custom_template_file "
                  f"(a suite built by `medclip eval build-suite` ships {SUITE_TEMPLATES_FILE})", file=sys.stderr)
        return dataset

    setattr(build_wds_dataset, _HOOKED, True)
    return build_wds_dataset


_LAST_CLASSIFICATION: list = []  # (logits, targets) of the run_classification call inside the current evaluate


def _wrap_run_classification(original):
    @functools.wraps(original)
    def run_classification(*args, **kwargs):
        result = original(*args, **kwargs)
        _LAST_CLASSIFICATION[:] = [result]
        return result

    setattr(run_classification, _HOOKED, True)
    return run_classification


def _auroc(model, classnames) -> dict:
    """AUROC entries from the logits of the classification that just ran ({} when there were none)."""
    if not _LAST_CLASSIFICATION:
        return {}
    from open_clip_medclip.eval.embed import logit_scale
    from open_clip_medclip.eval.zeroshot import auroc_summary

    logits, targets = _LAST_CLASSIFICATION.pop()
    return auroc_summary(targets.cpu().numpy(), logits.float().cpu().numpy(), list(classnames), logit_scale(model))


def _wrap_evaluate(original):
    @functools.wraps(original)
    def evaluate(model, dataloader, tokenizer, classnames, *args, **kwargs):
        _LAST_CLASSIFICATION.clear()
        metrics = original(model, dataloader, tokenizer, classnames, *args, **kwargs)
        if not isinstance(metrics, dict):
            return metrics
        metrics.update(_auroc(model, classnames))
        dropped = [k for k, v in metrics.items() if isinstance(v, float) and math.isnan(v)]
        if dropped:
            print(f"open_clip_medclip: {', '.join(dropped)} left out of the results (undefined here, e.g. acc5 "
                  "with fewer than 5 classes)", file=sys.stderr)
        return {k: v for k, v in metrics.items() if k not in dropped}

    setattr(evaluate, _HOOKED, True)
    return evaluate


def _accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6's `accuracy` with `.item()` in place of `float(<1-element array>)`, which numpy >= 2.4
    rejects (`TypeError: only 0-dimensional arrays can be converted to Python scalars`)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


setattr(_accuracy, _HOOKED, True)


def install_hooks() -> None:
    """Install the wds-prompt, AUROC and no-NaN hooks into CLIP_benchmark (idempotent, safe during its own import)."""
    import clip_benchmark.datasets.builder as builder
    import clip_benchmark.metrics.zeroshot_classification as zeroshot

    _require({builder: ("build_wds_dataset", "build_dataset"), zeroshot: ("evaluate", "accuracy", "run_classification")})
    if not getattr(builder.build_wds_dataset, _HOOKED, False):
        builder.build_wds_dataset = _wrap_build_wds_dataset(builder.build_wds_dataset)
    if not getattr(zeroshot.evaluate, _HOOKED, False):
        zeroshot.evaluate = _wrap_evaluate(zeroshot.evaluate)
    if not getattr(zeroshot.run_classification, _HOOKED, False):
        zeroshot.run_classification = _wrap_run_classification(zeroshot.run_classification)
    zeroshot.accuracy = _accuracy  # `evaluate` looks it up at call time


def install_if_clip_benchmark_running() -> bool:
    """Install the hooks when CLIP_benchmark's dataset builder is already imported (plain `clip_benchmark eval` with
    the autoload); does nothing and imports nothing otherwise. Returns whether hooks were installed."""
    if "clip_benchmark.datasets.builder" not in sys.modules:
        return False
    try:
        install_hooks()
    except Exception as exc:  # never break the host's own command
        print(f"open_clip_medclip: CLIP_benchmark hooks not installed: {exc}", file=sys.stderr)
        return False
    return True

"""Host glue for LAION CLIP_benchmark: registers a `medclip` model type without touching CLIP_benchmark's code.

CLIP_benchmark 1.6 has no plugin hook: its loaders live in `clip_benchmark.models.TYPE2FUNC` and the CLI's
`--model_type` choices are the list `MODEL_TYPES`, which `clip_benchmark.cli` imported by reference. We add our
loader to the dict and append to that same list before the parser is built. Every attribute touched is checked
at import; a missing one fails loudly with the versions to use.
"""
from __future__ import annotations

import torch
from open_clip_medclip.plugins import HostMismatchError, missing_attributes, require_host  # noqa: F401

try:
    import clip_benchmark
    import clip_benchmark.cli as cb_cli
    import clip_benchmark.models as cb_models
except ImportError as exc:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "CLIP_benchmark is not installed; install it with "
        "`pip install --no-deps clip-benchmark==1.6.2 pycocoevalcap==1.2`"
    ) from exc

MODEL_TYPE = "medclip"
_REQUIRED = {
    cb_models: ("TYPE2FUNC", "MODEL_TYPES", "load_clip"),
    cb_cli: ("main", "get_parser_args", "MODEL_TYPES"),
}


def check_host() -> None:
    """Fail loudly, naming the attribute, if a CLIP_benchmark internal we rely on has gone or changed shape."""
    missing = missing_attributes(_REQUIRED)
    if not missing and not isinstance(cb_models.TYPE2FUNC, dict):
        missing.append("clip_benchmark.models.TYPE2FUNC (no longer a dict)")
    if not missing and cb_cli.MODEL_TYPES is not cb_models.MODEL_TYPES:
        missing.append("clip_benchmark.cli.MODEL_TYPES (no longer the same list as clip_benchmark.models.MODEL_TYPES)")
    require_host(missing, "clip-benchmark 1.6.x", f"clip-benchmark {getattr(clip_benchmark, '__version__', 'unknown')}",
                 "clip-benchmark==1.6.2")


check_host()


def load_medclip(model_name: str = "medclip-swin", pretrained: str | None = None, cache_dir: str | None = None,
                 device: str | torch.device = "cpu"):
    """CLIP_benchmark loader: (model, val transform, tokenizer) with the MedCLIP configs registered.

    `pretrained` may be a checkpoint path, an OpenCLIP tag, or 'none'/'' for random weights.
    """
    import open_clip

    import open_clip_medclip  # noqa: F401  (registers medclip-* configs and MedCLIP preprocessing)

    pretrained = None if not pretrained or str(pretrained).lower() == "none" else pretrained
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, cache_dir=cache_dir)
    model = model.to(device)
    return model, transform, open_clip.get_tokenizer(model_name)


def register() -> None:
    """Make `--model_type medclip` available (idempotent)."""
    cb_models.TYPE2FUNC[MODEL_TYPE] = load_medclip
    if MODEL_TYPE not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(MODEL_TYPE)


register()

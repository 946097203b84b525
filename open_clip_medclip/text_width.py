"""Text width: which pooler a model's text tower uses, and how many token columns each batch keeps.

One answer for training (the streams), evaluation and the benchmarks: `text_pooler_type` reads the pooler from the
model config (an OpenCLIP name or a `local-dir:` folder); `text_multiple_for` turns it into the trim multiple
(`--medclip-text-multiple auto`); `trim_tokens` drops the padding columns behind a batch's longest text.
"""
from __future__ import annotations

import json
import os

import torch

from .errors import UserError
from .options import MedclipOptions

MEDCLIP_POOLERS = ("medclip_pooler", "medclip_masked_pooler")


def text_config(model_name: str | None) -> dict:
    """The `text_cfg` of `--model`'s config (OpenCLIP name or `local-dir:` folder); {} when there is none."""
    if not model_name:
        return {}
    if model_name.startswith("local-dir:"):
        path = os.path.join(model_name[len("local-dir:"):], "open_clip_config.json")
        try:
            with open(path) as handle:
                config = json.load(handle).get("model_cfg")
        except (OSError, ValueError):
            return {}
    else:
        import open_clip

        config = open_clip.get_model_config(model_name)
    return (config or {}).get("text_cfg") or {}


def text_pooler_type(model_name: str | None) -> str | None:
    """The `hf_pooler_type` of `--model`'s config, None if it has none."""
    return text_config(model_name).get("hf_pooler_type")


def trim_tokens(tokens: torch.Tensor, multiple: int = 8, pad_id: int = 0) -> torch.Tensor:
    """Drop the padding columns behind the batch's longest text, keeping a width that is a multiple of `multiple`.

    `multiple` 0 keeps the tokenizer's full width; 1 trims to exactly the longest text (what MedCLIP's collator
    does with `padding=True`); 8 (default for masked poolers) rounds up for tensor-core friendly shapes.
    """
    if multiple <= 0 or tokens.ndim != 2 or tokens.shape[1] == 0:
        return tokens
    used = tokens.ne(pad_id).any(dim=0).nonzero()
    width = trimmed_width(int(used[-1]) + 1 if len(used) else 1, tokens.shape[1], multiple)
    return tokens if width == tokens.shape[1] else tokens[:, :width].contiguous()


def trimmed_width(longest: int, full_width: int, multiple: int) -> int:
    """The width `trim_tokens` keeps for a batch whose longest text has `longest` tokens (multiple > 0)."""
    return min(full_width, -(-longest // multiple) * multiple)


def text_multiple_for(args) -> int:
    """`--medclip-text-multiple`: an int, or `auto` (default) from the model's text tower.

    auto: HF text towers with MedCLIP's reference pooler (`medclip_pooler`, which averages padding too) trim to
    exactly the longest text, as the authors' collator pads; other HF towers mask padding, so their embeddings do
    not depend on it and the width is rounded up to a multiple of 8; OpenCLIP's own text transformer: no trimming.
    """
    value = MedclipOptions.from_args(args).text_multiple
    if value != "auto":
        value = int(value)
        if value < 0:
            raise UserError(f"--medclip-text-multiple must be auto or >= 0, got {value}")
        return value
    model_name = getattr(args, "model", None)
    if not model_name:
        return 8
    text_cfg = text_config(model_name)
    if not text_cfg.get("hf_model_name"):
        return 0
    return 1 if text_cfg.get("hf_pooler_type") == "medclip_pooler" else 8


def text_bucket_for(args) -> int:
    """`--medclip-text-bucket N`: batches per length-sorted pool (0, the default: no bucketing)."""
    value = int(MedclipOptions.from_args(args).text_bucket or 0)
    if value < 0:
        raise UserError(f"--medclip-text-bucket must be >= 0, got {value}")
    return value


def tokenizer_pad_id(tokenizer) -> int:
    inner = getattr(tokenizer, "tokenizer", None)
    pad = getattr(inner, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else 0


def token_lengths(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Per row: the index of its last non-padding token + 1 (the width `trim_tokens` would keep for it alone)."""
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return (tokens.ne(pad_id) * positions).amax(dim=1)

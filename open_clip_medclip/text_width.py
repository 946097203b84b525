"""Text width: which pooler a model's text tower uses, and how many token columns each batch keeps.

One answer for training (the streams), evaluation and the benchmarks: `text_pooler_type` names the pooler of a model
name or a built model; `text_multiple` turns it into the trim multiple; `trim_tokens` drops the padding columns behind
a batch's longest text.
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

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


def text_pooler_type(model: str | nn.Module | None) -> str | None:
    """The pooler of a Hugging Face text tower, by the name OpenCLIP registers it under; None for OpenCLIP's own.

    A model name (OpenCLIP name or `local-dir:` folder) is answered from its config (no `hf_pooler_type`: OpenCLIP's
    `CLIPTextCfg` default); a built model from its tower's pooler class, snake-cased as `register_pooler` does
    (MedclipMaskedPooler -> medclip_masked_pooler).
    """
    if model is None or isinstance(model, str):
        text_cfg = text_config(model)
        if not text_cfg.get("hf_model_name"):
            return None
        import open_clip

        return text_cfg.get("hf_pooler_type") or open_clip.CLIPTextCfg.hf_pooler_type
    pooler = getattr(getattr(model, "text", None), "pooler", None)
    return None if pooler is None else re.sub(r"(?<!^)(?=[A-Z])", "_", type(pooler).__name__).lower()


def is_medclip_model(model: str | nn.Module | None) -> bool:
    """Whether a model name or built model has a MedCLIP text pooler (what makes it a MedCLIP model here)."""
    return text_pooler_type(model) in MEDCLIP_POOLERS


def text_multiple(pooler_type: str | None, training: bool) -> int:
    """The trim multiple (`--medclip-text-multiple auto`) for a text tower whose pooler is `pooler_type`.

    OpenCLIP's own text transformer (None) is never trimmed. Training trims every HF tower: MedCLIP's reference
    pooler (`medclip_pooler`, which averages padding too) to exactly the longest text, as the authors' collator pads;
    other poolers mask padding, so rounding up to 8 changes nothing. Evaluation trims only `medclip_masked_pooler`:
    the reference pooler's embeddings depend on the width, so there it keeps the tokenizer's.
    """
    if pooler_type is None:
        return 0
    if training:
        return 1 if pooler_type == "medclip_pooler" else 8
    return 8 if pooler_type == "medclip_masked_pooler" else 0


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
    """`--medclip-text-multiple`: an int, or `auto` (default): `text_multiple` of `--model`'s pooler (8 without one)."""
    value = MedclipOptions.from_args(args).text_multiple
    if value != "auto":
        value = int(value)
        if value < 0:
            raise UserError(f"--medclip-text-multiple must be auto or >= 0, got {value}")
        return value
    model_name = getattr(args, "model", None)
    if not model_name:
        return 8
    return text_multiple(text_pooler_type(model_name), training=True)


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

"""The label-passthrough model: strips the label columns packed into the text tensor and returns them.

Host names touched: `open_clip.model.CLIP` and `open_clip.model.CustomTextCLIP` (the classes subclassed; an
instance's `__class__` is swapped, no parameter added, so checkpoints stay plain OpenCLIP state dicts).
"""
from __future__ import annotations

import torch
from open_clip import model

from open_clip_medclip import labels


class LabelPassthroughMixin:
    """Strips packed label columns from `text` (`labels.unpack_batch`) and returns them in the output dict.

    Only tensors made by `labels.pack_batch` (recognised by their marker column) are unpacked, so `encode_text`,
    zero-shot classifiers and unpacked evaluation data see the model unchanged.
    """

    def forward(self, image=None, text=None):
        image_labels = text_labels = None
        if text is not None:
            text, image_labels, text_labels = labels.unpack_batch(text)
        out = super().forward(image, text)
        if image_labels is not None:
            if not isinstance(out, dict):
                raise RuntimeError("label passthrough needs output_dict=True models (open_clip_train uses them)")
            out["image_labels"] = image_labels
            out["text_labels"] = text_labels
        return out


_PASSTHROUGH_CLASSES: dict[type, type] = {}


def passthrough_class(base: type) -> type:
    """`Medclip<Base>`: the label-passthrough subclass of an OpenCLIP model class (cached, no new state)."""
    if base not in _PASSTHROUGH_CLASSES:
        _PASSTHROUGH_CLASSES[base] = type(f"Medclip{base.__name__}", (LabelPassthroughMixin, base), {})
    return _PASSTHROUGH_CLASSES[base]


def enable_label_passthrough(clip_model: torch.nn.Module) -> torch.nn.Module:
    """Swap `clip_model`'s class in place; valid because the subclass adds no parameters or buffers."""
    base = type(clip_model)
    if isinstance(clip_model, LabelPassthroughMixin):
        return clip_model
    if base not in (model.CustomTextCLIP, model.CLIP):
        raise TypeError(f"label passthrough supports CLIP and CustomTextCLIP models, not {base.__name__}")
    state_before = set(clip_model.state_dict())
    clip_model.__class__ = passthrough_class(base)
    assert set(clip_model.state_dict()) == state_before
    return clip_model



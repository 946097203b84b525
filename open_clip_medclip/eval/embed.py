"""The model under evaluation: loaded through OpenCLIP (`load_model`), and its image and text embeddings, with corrupt
images excluded and counted instead of crashing a run."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from open_clip_medclip.errors import UserError, unknown_name_error
from open_clip_medclip.eval.suites.build import load_image
from open_clip_medclip.shards.images import ImageRejected

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".zip", ".ckpt")


def load_model(name: str, pretrained: str | None, device: str, **create_kwargs):
    """(model, val preprocess, tokenizer) through OpenCLIP after registering the MedCLIP configs.

    An unknown model name or a checkpoint path that does not exist is a one-line `UserError`; `create_kwargs` go
    to `open_clip.create_model_and_transforms` (e.g. `pretrained_image=True`).
    """
    import open_clip

    import open_clip_medclip  # noqa: F401  (registers medclip-* model configs)

    if ":" not in name and name not in open_clip.list_models():
        raise unknown_name_error("model", name, open_clip.list_models())
    pretrained = None if not pretrained or pretrained.lower() == "none" else pretrained
    if pretrained and not os.path.exists(pretrained) and (
            os.sep in pretrained or "/" in pretrained or pretrained.lower().endswith(CHECKPOINT_SUFFIXES)):
        raise UserError(f"--pretrained {pretrained}: no such checkpoint file or folder")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                 **create_kwargs)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP/FSDP-style wrappers (`.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module):
    """Yield the unwrapped model in eval mode and restore its train/eval state afterwards (training hooks call us)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def logit_scale(model: torch.nn.Module, default: float = 100.0) -> float:
    """exp(logit_scale) of a CLIP model (the temperature its logits use), `default` when it has none."""
    scale = getattr(unwrap(model), "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else default


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_image(self.paths[index])), index, ""
        except ImageRejected as exc:  # the shared decoder's verdict, with its reason code
            return None, index, f"{exc.reason}: {exc.detail}"
        except Exception as exc:  # a decoder error: the image is reported and left out, not fatal
            return None, index, f"{type(exc).__name__}: {exc}"


def _collate(batch):
    kept = [(tensor, index) for tensor, index, _ in batch if tensor is not None]
    failed = [(index, error) for tensor, index, error in batch if tensor is None]
    images = torch.stack([tensor for tensor, _ in kept]) if kept else None
    return images, [index for _, index in kept], failed


def image_batches(paths: Sequence[Path], transform: Callable, batch_size: int = 32, num_workers: int = 0
                  ) -> Iterator[tuple[torch.Tensor | None, list[int], list[dict]]]:
    """(preprocessed batch or None, positions kept, failures [{index, image, error}]) per batch of `paths`, decoded
    by the shard builder's decoder in `num_workers` loader processes; an undecodable file is a failure, not fatal."""
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate)
    for images, indices, failed in loader:
        yield images, indices, [{"index": index, "image": str(paths[index]), "error": error} for index, error in failed]


def encode_normalized(model: torch.nn.Module, images: torch.Tensor, device: str | torch.device = "cpu",
                      autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """L2-normalised float32 image embeddings of a preprocessed batch (on `device`)."""
    with autocast() if autocast else contextlib.nullcontext():
        output = model.encode_image(images.to(device=device, dtype=_input_dtype(model)))
    return F.normalize(output.float(), dim=-1)


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    for param in model.parameters():
        return param.dtype if param.is_floating_point() else torch.float32
    return torch.float32


@torch.no_grad()
def embed_images(model: torch.nn.Module, transform: Callable, paths: Sequence[Path], device: str | torch.device = "cpu",
                 batch_size: int = 32, num_workers: int = 0, progress: bool = True,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """L2-normalised image embeddings; returns (features (k, d), kept positions (k,), failures [{index, error}])."""
    from tqdm import tqdm

    model = unwrap(model)
    features, kept, failures = [], [], []
    batches = image_batches(paths, transform, batch_size, num_workers)
    for images, indices, failed in tqdm(batches, desc="images", disable=not progress, unit="batch",
                                        total=-(-len(paths) // batch_size)):
        failures += failed
        if images is None:
            continue
        features.append(encode_normalized(model, images, device, autocast).cpu().numpy())
        kept += indices
    width = features[0].shape[1] if features else 0
    return (np.concatenate(features) if features else np.zeros((0, width), np.float32)), np.array(kept, np.int64), failures


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str], device: str | torch.device = "cpu",
                batch_size: int = 128, autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                ) -> np.ndarray:
    """L2-normalised text embeddings (n, d), in the order of `texts`.

    Text towers whose pooler leaves padding out (`medclip_masked_pooler`) get each batch trimmed to its longest text
    (rounded up to 8), which gives the same embeddings for less work; others keep the tokenizer's width (MedCLIP's
    reference pooler averages padding, so its embeddings depend on the width).
    """
    from open_clip_medclip.text_width import text_multiple, text_pooler_type, tokenizer_pad_id, trim_tokens

    model = unwrap(model)
    multiple = text_multiple(text_pooler_type(model), training=False)
    pad_id = tokenizer_pad_id(tokenizer)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = trim_tokens(tokenizer(list(texts[start:start + batch_size])), multiple, pad_id)
        with autocast() if autocast else contextlib.nullcontext():
            output = model.encode_text(tokens.to(device))
        out.append(F.normalize(output.float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

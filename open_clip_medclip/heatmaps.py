"""Heatmaps that add up to the prediction: each feature-map location's exact additive share of a class logit.

MedCLIP's image towers (timm Swin-T, ResNet-50, the demo's EfficientNet-Lite0, `test_resnet`) average-pool the
trunk's spatial features and then apply a linear projection. The two commute: the image embedding z is the mean
over locations of the projected features P f_l, so a class logit, scale x (z / |z|) . w, is the mean over locations
of scale x (P f_l / |z|) . w. Those per-location values are the heatmap: no gradients, no approximation.

A tower where that does not hold (an MLP or attention-pool head, or a trunk whose head does more than average-pool)
is refused with one line saying why (`HeatmapUnsupported`). The check is structural (the head is dropout + one
linear layer) and numeric (the trunk's own head equals the mean of its feature map on the batch at hand).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from open_clip_medclip.errors import UserError
from open_clip_medclip.eval.embed import unwrap
from open_clip_medclip.eval.zeroshot import linear_logits

POOL_CHECK_TOLERANCE = 1e-4  # relative: the trunk's head vs the mean of its feature map


class HeatmapUnsupported(UserError):
    """This image tower's pooling and projection do not commute, so there is no exact additive heatmap."""


def _linear_head(visual: nn.Module) -> nn.Linear:
    head = getattr(visual, "head", None)
    if not isinstance(head, nn.Sequential) or not hasattr(visual, "trunk"):
        raise HeatmapUnsupported(f"heatmaps: image tower {type(visual).__name__} is not a timm trunk with a projection "
                                 "head, so pooling and projection cannot be shown to commute")
    layers = [m for m in head if not isinstance(m, nn.Dropout)]
    if len(layers) != 1 or not isinstance(layers[0], nn.Linear):
        raise HeatmapUnsupported(f"heatmaps: the image tower's head ({', '.join(type(m).__name__ for m in head)}) is "
                                 "not one linear projection, so pooling and projection do not commute")
    return layers[0]


def check_tower(visual: nn.Module) -> None:
    """Raise `HeatmapUnsupported` (one line, why) unless the image tower (`model.visual`, or a fine-tuned classifier's
    tower) has the structure exact heatmaps need (the numeric pooling check runs on every batch)."""
    _linear_head(visual)


def tower_locations(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-location projected features (n, h, w, d), pooled embedding z (n, d)) of a preprocessed batch: z is the
    tower's output, the mean of the per-location values."""
    projection = _linear_head(visual)
    trunk = visual.trunk
    dtype = next(visual.parameters()).dtype
    fmap = trunk.forward_features(images.to(dtype=dtype))
    channels = trunk.num_features
    if fmap.ndim != 4 or channels not in (fmap.shape[1], fmap.shape[-1]):
        raise HeatmapUnsupported(f"heatmaps: the trunk's features have shape {tuple(fmap.shape)}, not a spatial map "
                                 f"with {channels} channels")
    grid = fmap if fmap.shape[-1] == channels and fmap.shape[1] != channels else fmap.permute(0, 2, 3, 1)
    pooled = trunk.forward_head(fmap)
    mean = grid.mean(dim=(1, 2))
    if pooled.shape != mean.shape or not torch.allclose(pooled, mean, rtol=POOL_CHECK_TOLERANCE,
                                                         atol=POOL_CHECK_TOLERANCE * float(mean.abs().max())):
        raise HeatmapUnsupported(f"heatmaps: {type(trunk).__name__}'s head does more than average-pool its feature "
                                 "map, so pooling and projection do not commute")
    projected = projection(grid.float() if projection.weight.dtype == torch.float32 else grid).float()
    return projected, projected.mean(dim=(1, 2))


@torch.no_grad()
def logit_shares(model: nn.Module, images: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """(n, C, h, w): scale x (P f_l / |z|) . w_c per location l; the mean over locations is exactly the logit
    `linear_logits(z / |z|, weights, scale)` that zero-shot scoring computes."""
    projected, pooled = tower_locations(unwrap(model).visual, images)
    norm = pooled.norm(dim=-1).clamp_min(1e-12)[:, None, None, None]
    shares = linear_logits(projected / norm, weights.to(projected.device, projected.dtype), scale)
    return shares.permute(0, 3, 1, 2)


@torch.no_grad()
def head_shares(visual: nn.Module, head: nn.Linear, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """(n, C, h, w) for a fine-tuned tower + linear head, `head(z)` or `head(z / |z|)`: per location l,
    head(P f_l) (over |z| when normalised); an affine map of the mean is the mean of the affine maps, so the mean
    over locations is exactly the classifier's logit."""
    projected, pooled = tower_locations(visual, images)
    if normalize:
        projected = projected / pooled.norm(dim=-1).clamp_min(1e-12)[:, None, None, None]
    return head(projected.to(head.weight.dtype)).float().permute(0, 3, 1, 2)


def upsample(shares: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) shares resized bilinearly to (C, H, W) for drawing (the raw grid is the exact one)."""
    tensor = torch.from_numpy(np.ascontiguousarray(shares, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0].numpy()


def overlay_png(image: np.ndarray, share: np.ndarray) -> bytes:
    """PNG bytes: the grayscale model input (H, W, in 0..1) with one class's upsampled shares drawn over it,
    red where the location raises the logit and blue where it lowers it (colour scale symmetric around 0)."""
    import io

    from PIL import Image

    limit = float(np.abs(share).max()) or 1.0
    signed = np.clip(share.astype(np.float32) / limit, -1.0, 1.0)
    alpha = 0.6 * np.abs(signed)
    base = np.clip(image.astype(np.float32), 0.0, 1.0) * (1 - alpha)
    rgb = np.stack([base + alpha * (signed > 0), base, base + alpha * (signed < 0)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray((rgb * 255 + 0.5).astype(np.uint8), mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()

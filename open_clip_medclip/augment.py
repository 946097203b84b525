"""MedCLIP's training augmentation (as in the MedCLIP reference code), as picklable transforms for OpenCLIP's data loaders.

Evaluation uses the model's own preprocessing (`open_clip_medclip.models.medclip_image_transform`); this module is
the training transform that `medclip train` puts in place of OpenCLIP's (`--medclip-augment medclip`, default).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from .models import MEDCLIP_MEAN, MEDCLIP_STD, pad_to_square


class PadToSquare:
    """MedCLIP's `_pad_img` as a picklable transform (8-bit grayscale on a black square)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return pad_to_square(image)


class GrayToNormalizedRGB:
    """8-bit grayscale PIL image -> normalised 3-channel tensor, as MedCLIP's collator repeats the channel.

    Normalising the single channel before repeating it is ~3x cheaper than converting to RGB first; with
    per-channel statistics that differ, the channels are normalised separately.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.uniform = bool((self.mean == self.mean[0]).all() and (self.std == self.std[0]).all())

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        gray = pil_to_tensor(image.convert("L")).float().div_(255.0)
        if self.uniform:
            return gray.sub_(self.mean[0]).div_(self.std[0]).expand(len(self.mean), -1, -1)
        return (gray - self.mean) / self.std


def medclip_train_transform(
    image_size: int = 224,
    mean: Sequence[float] = (MEDCLIP_MEAN,) * 3,
    std: Sequence[float] = (MEDCLIP_STD,) * 3,
) -> Callable:
    """MedCLIP's pre-training augmentation: pad, flip, jitter, affine, resize to 256/224 × size, random crop."""
    from torchvision import transforms as T

    return T.Compose(
        [
            PadToSquare(),
            T.RandomHorizontalFlip(0.5),
            T.ColorJitter(0.2, 0.2),
            T.RandomAffine(degrees=10, translate=(0.0625, 0.0625), scale=(0.8, 1.1)),
            T.Resize((round(image_size * 256 / 224),) * 2),
            T.RandomCrop(image_size),
            GrayToNormalizedRGB(mean, std),
        ]
    )

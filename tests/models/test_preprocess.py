"""The exact reference preprocessing vs OpenCLIP's native 'longest' mode on real, non-square X-rays."""
from __future__ import annotations

import numpy as np
import open_clip
import torch
from PIL import Image

import open_clip_medclip
from open_clip_medclip.models import pad_to_square, to_grayscale_8bit


def test_pad_to_square_centres_like_the_reference():
    image = Image.new("L", (100, 40), 200)
    padded = pad_to_square(image, 224)
    assert padded.size == (224, 224)
    array = np.asarray(padded)
    assert array[int((224 - 40) / 2), int((224 - 100) / 2)] == 200 and array[0, 0] == 0


def test_sixteen_bit_is_rescaled_not_clipped():
    array = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    out = np.asarray(to_grayscale_8bit(image))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200


def test_native_transform_is_close_to_reference_on_non_square_xray(sample_dir):
    _, _, native = open_clip.create_model_and_transforms("medclip-tiny", force_image_size=224)
    exact = open_clip_medclip.medclip_image_transform(224)
    image = Image.open(sample_dir / "nih_cxr14/images/00000061_015.jpg").crop((0, 30, 256, 210))  # 256 x 180
    a, b = exact(image), native(image)
    assert a.shape == b.shape == (3, 224, 224)
    diff = (a - b).abs()
    print(f"\nexact vs native 'longest' on a 256x180 X-ray: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}")
    # Same geometry and statistics; they differ only by resampling order (pad-then-resize vs resize-then-pad).
    assert diff.mean() < 0.05
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)  # both pad with black at the top

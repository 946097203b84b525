"""Decoding: 16-bit scaling, DICOM VOI LUT and MONOCHROME1, resizing, and a reason for every broken file."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from open_clip_medclip.shards.images import ImageRejected, load_grayscale, prepare_image, shrink_to
from tests.shards.conftest import SAMPLE, write_dicom


def test_16bit_png_uses_full_range(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16)[None, :].repeat(8, axis=0) * 64)  # 0..4032: 12-bit data
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    image = np.asarray(load_grayscale(path))
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    assert np.all(np.diff(image[0].astype(int)) >= 0) and len(np.unique(image)) == 64
    naive = np.asarray(Image.open(path).convert("L"))  # what plain Pillow would store: clipped
    assert (naive == 255).mean() > 0.9


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = np.tile(np.linspace(0, 4000, 32).astype(np.uint16), (16, 1))
    write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2")
    write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1")
    m2, m1 = np.asarray(load_grayscale(tmp_path / "m2.dcm")), np.asarray(load_grayscale(tmp_path / "m1.dcm"))
    assert m2[0, 0] == 0 and m2[0, -1] == 255
    assert np.array_equal(m1, 255 - m2)


def test_dicom_voi_window_is_applied(tmp_path):
    pixels = np.tile(np.linspace(0, 4000, 41).astype(np.uint16), (4, 1))
    write_dicom(tmp_path / "win.dcm", pixels, window=(1000, 400))  # window 800..1200
    image = np.asarray(load_grayscale(tmp_path / "win.dcm"))[0]
    values = pixels[0]
    assert np.all(image[values <= 800] == 0) and np.all(image[values >= 1200] == 255)
    assert 0 < image[values == 1000][0] < 255


def test_bundled_real_dicom_and_large_png():
    dicom = next((SAMPLE / "odd_inputs").glob("*.dcm"))
    data = prepare_image(dicom, 256)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.mode == "L" and image.size == (256, 256)
    png = Image.open(io.BytesIO(prepare_image(SAMPLE / "odd_inputs" / "00000001_000.png", 128, "png")))
    assert png.format == "PNG" and png.size == (128, 128)


def test_shrink_keeps_aspect_and_never_enlarges():
    assert shrink_to(Image.new("L", (1000, 500)), 256).size == (256, 128)
    assert shrink_to(Image.new("L", (100, 80)), 256).size == (100, 80)


@pytest.mark.parametrize("reason", ["zero_byte_image", "truncated_image", "corrupt_image", "unreadable_dicom",
                                    "missing_image"])
def test_each_broken_file_has_its_reason(bad_images, reason):
    with pytest.raises(ImageRejected) as info:
        prepare_image(bad_images[reason], 64)
    assert info.value.reason == reason
    assert bad_images[reason].name in info.value.detail or reason == "unreadable_dicom"

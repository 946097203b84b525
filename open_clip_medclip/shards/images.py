"""Decode any chest X-ray file once into an 8-bit grayscale image, shrink it and encode it for a shard.

- JPEG / PNG / other Pillow formats: RGB and palette images become luma (as MedCLIP's `convert('L')`).
- 16-bit and 32-bit integer images (e.g. 12-bit data in a 16-bit PNG) are rescaled from their own min..max to
  0..255; Pillow's plain `convert('L')` would clip everything above 255 to white.
- DICOM (by suffix or the `DICM` magic): pydicom, modality LUT then VOI LUT (window), min..max to 0..255,
  MONOCHROME1 inverted so bone is white as in MONOCHROME2. Only pixel data is read; nothing is unpickled.
Problems raise `ImageRejected` with a reject reason code (see `sources.records.REJECT_REASONS`).
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from open_clip_medclip.shards.format import JPEG_QUALITY

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must be rejected, not padded with grey
Image.MAX_IMAGE_PIXELS = 20000 * 20000  # large radiographs are legitimate; still guard against bombs


class ImageRejected(Exception):
    """An image input that cannot be used; `reason` is a reject reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def rescale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map an array's own min..max linearly onto 0..255 (a constant image becomes 0)."""
    pixels = pixels.astype(np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) * (255.0 / (high - low))).astype(np.uint8)


def _load_dicom(path: Path) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        with warnings.catch_warnings():  # broken headers warn before they fail; the reject carries the reason
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(path)
            pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageRejected("unreadable_dicom", f"{type(exc).__name__}: {exc}") from None
    if pixels.ndim == 3 and dataset.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    elif pixels.ndim == 3:
        pixels = np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert("L"))
    pixels = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    image = rescale_to_uint8(pixels)
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = 255 - image
    return Image.fromarray(image, mode="L")


def load_grayscale(path: str | Path, reduce_to: int | None = None) -> Image.Image:
    """Decode `path` into an 8-bit 'L' image. `reduce_to` lets JPEG decoding skip detail below that size."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ImageRejected("missing_image", f"{path}: file not found") from None
    if size == 0:
        raise ImageRejected("zero_byte_image", f"{path}: 0 bytes")
    if _is_dicom(path):
        return _load_dicom(path)
    try:
        with Image.open(path) as image:
            if reduce_to and image.format == "JPEG":
                image.draft("L", (reduce_to, reduce_to))
            image.load()
            return to_grayscale_8bit(image)
    except UnidentifiedImageError:
        raise ImageRejected("corrupt_image", f"{path}: not an image Pillow can identify") from None
    except OSError as exc:
        reason = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
        raise ImageRejected(reason, f"{path}: {exc}") from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PNG chunk/CRC errors are SyntaxError
        raise ImageRejected("corrupt_image", f"{path}: {type(exc).__name__}: {exc}") from None


def to_grayscale_8bit(image: Image.Image) -> Image.Image:
    """The one 16-bit -> 8-bit rule: grayscale 'L'; 16/32-bit integer and float images are rescaled from their own
    min..max to 0..255 (`rescale_to_uint8`) instead of clipped as PIL would. Used by shards, suites and preprocessing."""
    if image.mode == "L":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(rescale_to_uint8(np.asarray(image)), mode="L")
    return image.convert("L")


def shrink_to(image: Image.Image, longer_side: int) -> Image.Image:
    """Resize so the longer side is at most `longer_side`, keeping the aspect ratio (never enlarges)."""
    width, height = image.size
    scale = longer_side / max(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode(image: Image.Image, image_format: str) -> bytes:
    """JPEG q95 (no EXIF, no optimisation pass) or PNG (level 6): deterministic bytes for the same pixels."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    elif image_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        raise ValueError(f"unknown image format {image_format!r}; use jpg or png")
    return buffer.getvalue()


def prepare_image(path: str | Path, longer_side: int, image_format: str = "jpg") -> bytes:
    """Decode, shrink and encode one image file: the bytes that go into a shard."""
    image = load_grayscale(path, reduce_to=longer_side)
    return encode(shrink_to(image, longer_side), image_format)

"""Shared fixtures for shard tests: bad inputs for every reject reason and a tiny stub labeler."""
from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from open_clip_medclip.findings import FINDING_INDEX, NUM_FINDINGS

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "open_clip_medclip" / "sample_data"


class StubLabeler:
    """Labels a sentence 1 for each keyword it contains, 0 when the sentence starts with 'no'."""

    version = "stub-1"
    rules_hash = "0" * 16
    keywords = {"effusion": "Pleural Effusion", "cardiomegaly": "Cardiomegaly", "clear": "No Finding"}

    def label_report(self, text: str):
        sentences = []
        report: list = [None] * NUM_FINDINGS
        for part in (p.strip() for p in text.split(".")):
            if not part:
                continue
            labels: list = [None] * NUM_FINDINGS
            for word, finding in self.keywords.items():
                if word in part.lower():
                    labels[FINDING_INDEX[finding]] = 0.0 if part.lower().startswith("no ") else 1.0
                    report[FINDING_INDEX[finding]] = max(report[FINDING_INDEX[finding]] or 0.0,
                                                         labels[FINDING_INDEX[finding]])
            sentences.append(SimpleNamespace(text=part + ".", labels=labels))
        return SimpleNamespace(labels=report, sentences=sentences)


@pytest.fixture
def stub_labeler() -> StubLabeler:
    return StubLabeler()


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", window: tuple | None = None) -> None:
    """A minimal uncompressed 16-bit DICOM written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "test"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def bad_images(tmp_path) -> dict[str, Path]:
    """One file per image reject reason (name -> path), plus a good one."""
    folder = tmp_path / "bad"
    folder.mkdir()
    good = folder / "good.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64)).save(good)
    (folder / "zero.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    Image.open(SAMPLE / "nih_cxr14" / "images" / "00000061_015.jpg").save(buffer, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    png = bytearray(good.read_bytes())
    png[40:60] = b"\x00" * 20  # break the IHDR/IDAT chunk and its CRC
    (folder / "corrupt.png").write_bytes(bytes(png))
    (folder / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 8)
    return {"good": good, "zero_byte_image": folder / "zero.jpg", "truncated_image": folder / "truncated.jpg",
            "corrupt_image": folder / "corrupt.png", "unreadable_dicom": folder / "garbage.dcm",
            "missing_image": folder / "absent.jpg"}

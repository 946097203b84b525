"""Fixtures for the training tests: small medclip shards written once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.shardkit import brace, write_shards


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> dict:
    """2 image-only shards (NIH), 1 paired shard, 1 text-only shard; 8 images each; sizes.json beside them."""
    out = tmp_path_factory.mktemp("medclip_shards")
    written = write_shards(out, images_per_shard=8, image_shards=2, paired_shards=1, text_shards=1)
    every = written["image"] + written["paired"] + written["text"]
    return {"dir": out, "all": brace(every), **written}


@pytest.fixture(scope="session")
def real_shards(tmp_path_factory) -> dict:
    """Shards built by the real builder (`medclip shards build`) from the bundled sample: NIH images (image-only,
    3 shards) and labelled IU report sentences (text-only)."""
    try:
        from open_clip_medclip.shards.cli import main as shards_main
    except ImportError as exc:  # pragma: no cover - depends on the shards package being present
        pytest.skip(f"shard builder not available: {exc}")
    sample = Path(__file__).resolve().parents[2] / "open_clip_medclip" / "sample_data"
    out = tmp_path_factory.mktemp("real_shards")
    common = ["--no-progress", "--samples-per-shard", "16"]
    assert shards_main(["build", "--source", "nih", "--csv", str(sample / "nih_cxr14" / "labels.csv"),
                        "--root", str(sample / "nih_cxr14"), "--out", str(out / "nih"), "--image-size", "96",
                        "--split", "train", "--limit", "40", *common]) == 0
    assert shards_main(["build", "--source", "iu-reports", "--reports",
                        str(sample / "iu_reports" / "NLMCXR_reports.tgz"), "--out", str(out / "iu"),
                        "--text-unit", "sentence", "--limit", "120", "--samples-per-shard", "1000",
                        "--no-progress"]) == 0
    nih = sorted(str(p) for p in (out / "nih").glob("*.tar"))
    iu = sorted(str(p) for p in (out / "iu").glob("*.tar"))
    return {"nih": nih, "iu": iu, "nih_brace": brace_any(nih), "iu_brace": brace_any(iu)}


def brace_any(paths: list[str]) -> str:
    """`dir/prefix-{000000..00000N}.tar` for a builder's consecutive shards."""
    first, last = Path(paths[0]), Path(paths[-1])
    if len(paths) == 1:
        return str(first)
    prefix, start = first.stem.rsplit("-", 1)
    end = last.stem.rsplit("-", 1)[1]
    return str(first.parent / f"{prefix}-{{{start}..{end}}}.tar")

"""Datasets whose label is the name of the folder an image sits in (COVID-19 Radiography, Kermany pediatric)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from open_clip_medclip.sources.records import Record, SourceError, SourceItem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".bmp", ".tif", ".tiff")


def iter_class_folders(root: str | Path, class_labels: Mapping[str, list[float | None]], source: str,
                       image_dir: Callable[[Path], Path] = lambda folder: folder,
                       meta_for: Callable[[Path, str], dict] | None = None) -> Iterator[SourceItem]:
    """Walk `root/<class>/...` for every class folder (matched case-insensitively) and yield one Record per image.

    `image_dir` maps a class folder to where its images are (COVID keeps them in `<class>/images`); the record
    id is the path below `root` without suffix, so ids are unique across classes and splits.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: folder not found")
    wanted = {name.lower(): name for name in class_labels}
    folders = sorted(path for path in root.rglob("*") if path.is_dir() and path.name.lower() in wanted)
    if not folders:
        raise SourceError(f"{root}: no class folder found; expected folders named {', '.join(class_labels)}")
    for folder in folders:
        class_name = wanted[folder.name.lower()]
        for path in sorted(image_dir(folder).glob("*")):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            relative = path.relative_to(root).as_posix()
            record_id = relative.rsplit(".", 1)[0]
            meta = {"path": relative, "class": class_name}
            if meta_for is not None:
                meta.update(meta_for(path.relative_to(root), class_name))
            yield Record(id=record_id, source=source, image_path=str(path), labels=list(class_labels[class_name]),
                         meta=meta)

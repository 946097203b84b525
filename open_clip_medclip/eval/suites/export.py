"""The CLIP_benchmark export of a built suite: its `wds/<name>` layout (shards, class names, prompts)."""
from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from open_clip_medclip.eval.suites.definitions import SPLITS
from open_clip_medclip.shards.format import write_tar

WDS_SHARD_SIZE = 1000
MIN_WDS_SHARDS = 4  # CLIP_benchmark's default --num_workers
TEMPLATES_TXT = "zeroshot_classification_templates.txt"
CUSTOM_TEMPLATES_JSON = "custom_templates.json"


def class_agnostic_templates(prompts: Mapping[str, Sequence[str]]) -> list[str] | None:
    """The prompts as CLIP_benchmark templates (`{c}` = class name) when every class's prompts are the same
    templates filled with its own name (e.g. `{cls: [cls]}` -> `["{c}"]`); None when they are class-specific."""
    common = None
    for cls, texts in prompts.items():
        templates = [t.replace("{", "{{").replace("}", "}}").replace(cls, "{c}") for t in texts]
        if not templates or any("{c}" not in t for t in templates) or common not in (None, templates):
            return None
        common = templates
    return common


def _shard_rows(rows: Sequence[dict]) -> list[Sequence[dict]]:
    """At most WDS_SHARD_SIZE rows a shard and at least MIN_WDS_SHARDS shards (when there are that many rows), sizes
    differing by at most one: CLIP_benchmark's default 4 DataLoader workers each need a shard."""
    count = max(-(-len(rows) // WDS_SHARD_SIZE), min(MIN_WDS_SHARDS, len(rows)))
    base, extra = divmod(len(rows), count)
    shards, start = [], 0
    for number in range(count):
        size = base + (1 if number < extra else 0)
        shards.append(rows[start:start + size])
        start += size
    return shards


def write_wds(out: Path, name: str, classes: Sequence[str], rows: Sequence[dict], prompts: Mapping[str, list[str]],
              multilabel: bool = False) -> Path:
    """The CLIP_benchmark `wds/<name>` layout under `out/wds` from manifest rows.

    The suite's prompts go where CLIP_benchmark reads them: `zeroshot_classification_templates.txt` when they are
    class-agnostic templates, and always `custom_templates.json` (the `--custom_template_file` format, per class).
    Class-specific prompts have no txt form, so that file is then left out: CLIP_benchmark without this package's
    hook stops ("Templates not specified") instead of silently prompting with bare class names.
    """
    wds = out / "wds"
    wds.mkdir(parents=True, exist_ok=True)
    (wds / "classnames.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    templates_txt = wds / TEMPLATES_TXT
    generic = class_agnostic_templates(prompts)
    if generic is not None:
        templates_txt.write_text("\n".join(generic) + "\n", encoding="utf-8")
    elif templates_txt.exists():
        templates_txt.unlink()
    if multilabel:
        (wds / "dataset_type.txt").write_text("multilabel\n", encoding="utf-8")
    templates = {f"wds/{name}": dict(prompts), name: dict(prompts)}
    (wds / CUSTOM_TEMPLATES_JSON).write_text(json.dumps(templates, indent=1, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    index = {cls: i for i, cls in enumerate(classes)}
    for split in SPLITS:
        split_rows = [r for r in rows if r["split"] == split]
        if not split_rows:
            continue
        (wds / split).mkdir(exist_ok=True)
        for old in (wds / split).glob("*.tar"):
            old.unlink()
        shards = _shard_rows(split_rows)
        for number, shard in enumerate(shards):
            members = []
            for row in shard:
                data = (out / row["image"]).read_bytes()
                ext = row["image"].rsplit(".", 1)[1]
                members.append((f"{row['id']}.{ext}", data))
                names = row["label"].split("|")
                if multilabel:
                    vector = np.zeros(len(classes), dtype=np.float32)
                    vector[[index[n] for n in names]] = 1
                    buffer = io.BytesIO()
                    np.save(buffer, vector)
                    members.append((f"{row['id']}.npy", buffer.getvalue()))
                else:
                    members.append((f"{row['id']}.cls", str(index[names[0]]).encode()))
            write_tar(wds / split / f"{number}.tar", members)
        (wds / split / "nshards.txt").write_text(f"{len(shards)}\n", encoding="utf-8")
    return wds

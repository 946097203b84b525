"""The one registry of dataset sources: name -> adapter, for shard building and eval suites alike.

`medclip shards build --source NAME` and an eval suite definition's `"source": {"format": NAME}` take the same
names. Each entry says what it reads, the sample kinds it gives by default, the `shards build` flags it needs,
and how to open it from those flags (`from_flags`) and, where a suite can be built from it, from a raw dataset
path plus the definition's `source` block (`from_suite`). Adapters are imported on first use, so importing the
registry (e.g. for `medclip shards --help`) imports no adapter.

Older names are accepted as aliases and resolve to the canonical entry (deprecated; they will be removed):
`nih_cxr14` -> `nih`, `kermany` -> `pediatric`, `csv` -> `generic-csv`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from open_clip_medclip.errors import unknown_name_error
from open_clip_medclip.sources.records import SourceError


@dataclass(frozen=True)
class Source:
    """One dataset family: its name, what it reads, default kinds, the build flags it needs, and its readers."""

    name: str
    reads: str
    default_kinds: tuple[str, ...]
    needs: tuple[str, ...]
    from_flags: Callable[[SimpleNamespace], Iterable]
    from_suite: Callable[[Path, Mapping], Iterable] | None = None

    def items(self, options: object) -> Iterable:
        """The records for `shards build` options (an argparse Namespace or anything with the same attributes)."""
        missing = [f"--{name.replace('_', '-')}" for name in self.needs if getattr(options, name, None) is None]
        if missing:
            raise SourceError(f"--source {self.name} needs {', '.join(missing)}")
        return self.from_flags(options)

    def suite_items(self, raw: Path, spec: Mapping) -> Iterable:
        """The records of a raw dataset for an eval suite (`spec` = the definition's `source` block)."""
        if self.from_suite is None:
            raise SourceError(f"source {self.name!r} cannot be used for an eval suite "
                              f"(suite sources: {', '.join(suite_names())})")
        return self.from_suite(raw, spec)


def first_existing(raw: Path, names: Sequence[str], what: str) -> Path:
    """`raw` itself when it is a file, else the first of `names` in it (or anywhere below it)."""
    if raw.is_file():
        return raw
    for name in names:
        if (raw / name).is_file():
            return raw / name
        found = sorted(raw.rglob(name))
        if found:
            return found[0]
    raise SourceError(f"{raw}: no {what} found (looked for {', '.join(names)})")


def _flag(options: object, name: str, default: object = None) -> object:
    return getattr(options, name, default)


# ---------------------------------------------------------------------------------------------------------------
# Readers, one pair per family (adapters imported when called)


def _chexpert_flags(o):
    from open_clip_medclip.sources.chexpert import iter_chexpert

    return iter_chexpert(o.csv, _flag(o, "root"), source=_flag(o, "source_name") or "chexpert")


def _chexpert_suite(raw, spec):
    from open_clip_medclip.sources.chexpert import iter_chexpert

    csv_path = first_existing(raw, [spec.get("labels", "train.csv")], "CheXpert label CSV")
    return iter_chexpert(csv_path)


def _mimic_flags(o):
    from open_clip_medclip.sources.mimic import iter_mimic

    return iter_mimic(o.labels, o.metadata, o.root, _flag(o, "reports"), source=_flag(o, "source_name") or "mimic")


def _mimic_suite(raw, spec):
    from open_clip_medclip.sources.mimic import iter_mimic

    labels = first_existing(raw, [spec.get("labels", "mimic-cxr-2.0.0-chexpert.csv")], "MIMIC label CSV")
    metadata = first_existing(raw, [spec.get("metadata", "mimic-cxr-2.0.0-metadata.csv")], "MIMIC metadata CSV")
    return iter_mimic(labels, metadata, root=raw if raw.is_dir() else raw.parent)


def _nih_flags(o):
    from open_clip_medclip.sources.nih import iter_nih

    return iter_nih(o.csv, _flag(o, "root"), source=_flag(o, "source_name") or "nih")


def _nih_suite(raw, spec):
    from open_clip_medclip.sources.nih import iter_nih

    return iter_nih(first_existing(raw, [spec.get("labels", "labels.csv"), "Data_Entry_2017.csv"], "NIH label CSV"))


def _rsna_flags(o):
    from open_clip_medclip.sources.rsna import iter_rsna

    return iter_rsna(o.csv, o.root, _flag(o, "class_info"), source=_flag(o, "source_name") or "rsna")


def _rsna_suite(raw, spec):
    from open_clip_medclip.sources.rsna import iter_rsna

    labels = first_existing(raw, [spec.get("labels", "stage_2_train_labels.csv")], "RSNA label CSV")
    image_dir = labels.parent / spec.get("images", "stage_2_train_images")
    return iter_rsna(labels, image_dir if image_dir.is_dir() else labels.parent)


def _covid_flags(o):
    from open_clip_medclip.sources.covid import iter_covid

    return iter_covid(o.root, source=_flag(o, "source_name") or "covid")


def _covid_suite(raw, spec):
    from open_clip_medclip.sources.covid import iter_covid

    folders = {name.lower() for name in spec.get("folders", ())}
    return (item for item in iter_covid(raw)
            if not folders or str(getattr(item, "meta", {}).get("class", "")).lower() in folders)


def _pediatric_flags(o):
    from open_clip_medclip.sources.pediatric import iter_pediatric

    return iter_pediatric(o.root, _flag(o, "csv"), source=_flag(o, "source_name") or "pediatric")


def _pediatric_suite(raw, spec):
    from open_clip_medclip.sources.pediatric import iter_pediatric

    if raw.is_file():
        return iter_pediatric(raw.parent, raw)
    labels = raw / spec.get("labels", "labels.csv")
    return iter_pediatric(raw, labels if labels.is_file() else None)


def _generic_csv_flags(o):
    from open_clip_medclip.sources.generic_csv import iter_generic_csv, parse_label_columns

    label_columns = _flag(o, "label_columns")
    columns = parse_label_columns(label_columns.split(",")) if label_columns else None
    return iter_generic_csv(o.csv, _flag(o, "image_column"), columns, _flag(o, "class_column"),
                            _flag(o, "id_column"), _flag(o, "report_column"), _flag(o, "root"),
                            source=_flag(o, "source_name") or "csv")


def _generic_csv_suite(raw, spec):
    from open_clip_medclip.sources.suite_csv import iter_suite_csv

    return iter_suite_csv(first_existing(raw, ["suite.csv"], "suite CSV"))


def _iu_reports_flags(o):
    from open_clip_medclip.sources.text import iter_report_texts

    return iter_report_texts(o.reports, _flag(o, "text_column", "Reports"), _flag(o, "id_column"),
                             source=_flag(o, "source_name") or "iu")


def _labelled_csv_flags(o):
    from open_clip_medclip.sources.text import iter_labelled_csv

    return iter_labelled_csv(o.csv, _flag(o, "text_column", "Reports"), _flag(o, "id_column"),
                             source=_flag(o, "source_name") or "labelled")


# ---------------------------------------------------------------------------------------------------------------
# The registry

SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("chexpert", "CheXpert train.csv/valid.csv (--csv, --root = folder holding CheXpert-v1.0*)", ("image",),
           ("csv",), _chexpert_flags, _chexpert_suite),
    Source("mimic", "MIMIC-CXR-JPG label table (--labels chexpert.csv|negbio.csv) + --metadata, images under "
           "--root, optional --reports folder for paired samples", ("image",), ("labels", "metadata", "root"),
           _mimic_flags, _mimic_suite),
    Source("nih", "NIH Data_Entry_2017.csv or the bundled labels.csv (--csv; images under --root)", ("image",),
           ("csv",), _nih_flags, _nih_suite),
    Source("rsna", "RSNA stage_2_train_labels.csv (--csv), DICOMs in --root, optional --class-info", ("image",),
           ("csv", "root"), _rsna_flags, _rsna_suite),
    Source("covid", "COVID-19_Radiography_Dataset folders under --root", ("image",), ("root",), _covid_flags,
           _covid_suite),
    Source("pediatric", "Kermany pediatric folders or labels.csv under --root", ("image",), ("root",),
           _pediatric_flags, _pediatric_suite),
    Source("generic-csv", "any CSV: --image-column and/or --report-column, --label-columns or --class-column "
           "(suites: image,label[,split])", ("image",), ("csv",), _generic_csv_flags, _generic_csv_suite),
    Source("iu-reports", "reports (IU XML folder/.tgz, CSV, .txt folder) via sources.reports (--reports)",
           ("text",), ("reports",), _iu_reports_flags),
    Source("labelled-csv", "an already-labelled CSV (Reports + 14 finding columns; --csv)", ("text",), ("csv",),
           _labelled_csv_flags),
)}

# Deprecated names (eval suites used them before the registry); they resolve to the canonical entry.
ALIASES: dict[str, str] = {"nih_cxr14": "nih", "kermany": "pediatric", "csv": "generic-csv"}


def names() -> list[str]:
    return list(SOURCES)


def suite_names() -> list[str]:
    return [name for name, source in SOURCES.items() if source.from_suite is not None]


def canonical_name(name: str) -> str:
    """The registry name for `name` (an alias resolves); a one-line UserError for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in SOURCES:
        raise unknown_name_error("source", name, [*SOURCES, *ALIASES], hint="see 'medclip shards build --help'")
    return name


def get_source(name: str) -> Source:
    return SOURCES[canonical_name(name)]

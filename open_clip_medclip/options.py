"""The `--medclip-*` options, declared once (`MedclipOptions`: name, type, default, help). Both front doors generate
their flags from it (`add_arguments`); the library reads one typed object (`MedclipOptions.from_args(args)`).
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

from open_clip_medclip.labels import DEFAULT_TRAINING_POLICY, TRAINING_POLICIES

PREFIX = "medclip_"
LOSS_KINDS = ("soft", "clip")  # --medclip-loss (loss.create_medclip_loss)
LABEL_SIMILARITIES = ("dot", "cosine")  # --medclip-label-similarity (loss.label_similarity)
# The --medclip-shard-* options (failing http(s), pipe: and fsspec shard sources: bounded retries, then a clean
# stop; ShardFailurePolicy), as name: (default, metavar, help). The defaults are sized for object stores: a failing
# shard is read 5 times within ~15 s of backoff (1+2+4+8), a read stalled for 30 s fails, and a dead source stops
# the run within about a minute.
SHARD_FAILURE_OPTIONS = {
    "retries": (4, "N", "re-reads of a remote shard whose read fails (default {default}), waiting "
                "--medclip-shard-backoff, then 2x, 4x ... seconds; samples already delivered are not repeated"),
    "timeout": (30.0, "SECONDS", "an http(s) or pipe: shard read that gets no byte for this long fails (the pipe: "
                "command is killed; default {default:g})"),
    "backoff": (1.0, "SECONDS", "wait before the first retry, doubled at each next one, at most 60 (default "
                "{default:g})"),
    "max_failures": (3, "N", "stop the run when N remote shards in a row fail after their retries (default "
                     "{default}); exit code 3, checkpoints kept, continue with --resume latest"),
    "max_skipped": (0.05, "FRACTION", "stop the run when a loader worker skips more than this fraction of its shards "
                    "in an epoch (default {default:g}; with few shards per worker, one failed shard stops it)"),
}
SHARD_FAILURE_DEFAULTS = {name: spec[0] for name, spec in SHARD_FAILURE_OPTIONS.items()}


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(kind.strip() for kind in text.split(",") if kind.strip())


def _option(default, help: str, **argparse_keywords):
    """A dataclass field carrying its argparse declaration (`help` and any `add_argument` keyword)."""
    return field(default=default, metadata={"help": help, **argparse_keywords})


def _shard_option(name: str):
    """A `--medclip-shard-*` field from SHARD_FAILURE_OPTIONS (type from the default, `{default}` in help filled in)."""
    default, metavar, help = SHARD_FAILURE_OPTIONS[name]
    return _option(default, type=type(default), metavar=metavar, help=help.format(default=default))


@dataclass(frozen=True)
class MedclipOptions:
    """Every `--medclip-*` option; field `x_y` is flag `--medclip-x-y` and `args.medclip_x_y`."""

    loss: str = _option("soft", choices=LOSS_KINDS,
                        help="soft: semantic matching loss (label-similarity targets); clip: plain InfoNCE on the same "
                        "streams")
    label_similarity: str = _option("dot", choices=LABEL_SIMILARITIES,
                                    help="image-label × text-label similarity: dot (MedCLIP's code, default) or cosine "
                                    "(the paper's wording)")
    label_temperature: float = _option(1.0, type=float, help="targets = softmax(similarity / temperature); MedCLIP uses 1")
    uncertain: str = _option(DEFAULT_TRAINING_POLICY, choices=TRAINING_POLICIES,
                             help="how uncertain (-1) labels count for pairing and targets; blank is always 0 (MedCLIP: "
                             "zeros)")
    bank_data: str | None = _option(None, help="extra shards (brace/:: notation) whose sentences fill the sentence bank "
                                    "without being trained on as images; text-only and paired shards in --train-data "
                                    "always fill it")
    bank_kinds: tuple[str, ...] = _option(("text", "paired"), type=_kinds,
                                          help="sample kinds whose sentences go into the bank (comma-separated; default "
                                          "text,paired)")
    index: str | None = _option(None, metavar="LOCATION[::LOCATION...]",
                                help="shard index location per --train-data group (default: the folder of each group's "
                                "shards)")
    bank_index: str | None = _option(None, metavar="LOCATION[::LOCATION...]",
                                     help="shard index location per --medclip-bank-data group (default: beside those "
                                     "shards)")
    val_own_bank: bool = _option(False, action="store_true",
                                 help="validation data draw texts from their own sentence bank instead of the training "
                                 "bank")
    verify_checksums: bool = _option(False, action="store_true",
                                     help="compare each image-bearing sample with the content checksum its shard index "
                                     "lists (one more index file, read once per rank); a sample that differs is skipped "
                                     "and counted")
    text_multiple: str = _option("auto", metavar="auto|N",
                                 help="trim each batch's texts to its longest text rounded up to a multiple of N (0: "
                                 "keep the tokenizer's width; auto: from the model's text tower)")
    text_bucket: int = _option(0, type=int, metavar="N",
                               help="length bucketing (training stream, default 0: off): sort N batches' worth of "
                               "samples by text length, cut them into batches, shuffle the batch order; batches get "
                               "narrower (less text-tower work) but each batch's negatives are sentences of similar "
                               "length. The epoch's samples and batch count do not change; each dataloader worker "
                               "holds N x batch size decoded samples")
    padding_free: bool = _option(False, action="store_true",
                                 help="run the text tower padding-free: only real tokens pass BERT's layers (same "
                                 "embeddings, less work); models with medclip_masked_pooler only (medclip-*-masked), as "
                                 "the reference pooler averages padding")
    augment: str = _option("medclip", choices=("medclip", "openclip"),
                           help="training image transform: MedCLIP's augmentation (default) or OpenCLIP's (--aug-cfg)")
    zeroshot_suite: list[str] | None = _option(
        None, action="append", metavar="SUITE",
        help="built evaluation suite (folder from `medclip eval build-suite`, repeatable) evaluated zero-shot on the "
        "master rank every --zeroshot-frequency epochs and at the end; metrics go to results.jsonl and tb/wandb")
    shard_retries: int = _shard_option("retries")
    shard_timeout: float = _shard_option("timeout")
    shard_backoff: float = _shard_option("backoff")
    shard_max_failures: int = _shard_option("max_failures")
    shard_max_skipped: float = _shard_option("max_skipped")

    @staticmethod
    def flag(name: str) -> str:
        return "--" + (PREFIX + name).replace("_", "-")

    @classmethod
    def dests(cls) -> tuple[str, ...]:
        """The `args` attribute of every option (`medclip_loss`, ...)."""
        return tuple(PREFIX + spec.name for spec in fields(cls))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Declare every option on `parser` (both front doors call this)."""
        group = parser.add_argument_group("MedCLIP options")
        for spec in fields(cls):
            keywords = dict(spec.metadata)
            group.add_argument(cls.flag(spec.name), dest=PREFIX + spec.name, default=spec.default, **keywords)
        return parser

    @classmethod
    def from_args(cls, args) -> MedclipOptions:
        """The options in `args` (an argparse namespace); a missing or None value takes the declared default."""
        values = {}
        for spec in fields(cls):
            value = getattr(args, PREFIX + spec.name, None)
            values[spec.name] = spec.default if value is None and spec.default is not MISSING else value
        return cls(**values)

    def store(self, args) -> None:
        """Put the values on the trainer's `args` as `medclip_*` attributes (its params.txt lists them)."""
        for spec in fields(self):
            setattr(args, PREFIX + spec.name, getattr(self, spec.name))

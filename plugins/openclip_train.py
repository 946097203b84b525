"""Host glue for `open_clip_train`: the only place that touches the trainer's internals.

OpenCLIP 3.3's trainer has no plugin hooks for a loss, a dataset or a model class, so both front doors run the
unmodified `open_clip_train.main.main` with names in its module namespace rebound (each is a name bound by
`from X import Y` or a module global, so rebinding it in the using module is what takes effect):
- `parse_args`: adds the `--medclip-*` values to the trainer's namespace;
- `create_model_and_transforms`: swaps the model's class for a parameter-free subclass that strips the label
  columns packed into the text tensor (`labels.unpack_batch`) and returns them as `image_labels`/`text_labels`,
  and puts MedCLIP's training augmentation in place of OpenCLIP's;
- `create_loss`: `SemanticMatchingLoss` (or label-tolerant `ClipLoss` for `--medclip-loss clip`), and says which;
- `get_data`, via `open_clip_train.data.get_dataset_fn` during the call: label-aware streams;
- `train_one_epoch`: per-epoch seeds, samples/s and data-wait fraction (`open_clip_medclip.throughput`);
- `torch` (a proxy whose `save` is `checkpoints.atomic_save`), `get_latest_checkpoint` (skips unreadable
  files), `pt_load` (names an unreadable `--resume` file): crash-safe checkpoints;
- `optim` (a proxy whose `AdamW` is fused when every parameter is on CUDA);
- `setup_logging`: third-party loggers keep their levels (3.3 sets every logger to INFO: BertConfig dumps);
- `open_clip_train.train.zero_shot_eval`: adds the metrics of registered zero-shot hooks (`register_zero_shot_eval`),
  and `train_one_epoch` then calls `evaluate` even without `--val-data`/ImageNet (3.3 gates it on those);
- `torch.nn.parallel.DistributedDataParallel`: drops `device_ids` for CPU modules (3.3 passes them and fails).
`medclip train` installs these for one run (`patched_trainer`). Plain `python -m open_clip_train.main` (and
`torchrun -m open_clip_train.main`) gets them through the opt-in autoload (`open_clip_medclip.autoload`), which
wraps `open_clip_train.params.parse_args` (`plugins/openclip_main.py`); `host_parse_args` then installs them into
the calling module's namespace only for MedCLIP models, the full set only when the data are MedCLIP shards.
Every model, MedCLIP or not, gets the webdataset fix below once this module is imported: webdataset >= 0.2.96 ends
each shard with an empty `{}` marker that 3.3's `group_by_keys_nothrow` cannot take (`KeyError: 'fname'`).
Every attribute touched is checked at import; a missing one fails loudly with the attribute's name.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import sys
import tarfile
import time
import types
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import open_clip
import open_clip_train
import open_clip_train.data
import open_clip_train.main
import open_clip_train.params
import open_clip_train.precision
import open_clip_train.train
import torch
from open_clip import factory, model
from open_clip_medclip.plugins import HostMismatchError, missing_attributes, require_host  # noqa: F401
from open_clip_medclip.plugins.openclip_models import enable_padding_free_text

from open_clip_medclip import checkpoints, labels
from open_clip_medclip.augment import medclip_train_transform
from open_clip_medclip.errors import USER_ERROR_EXIT_CODE, UserError
from open_clip_medclip.findings import NUM_FINDINGS
from open_clip_medclip.loss import create_medclip_loss
from open_clip_medclip.options import MedclipOptions
from open_clip_medclip.streams.faults import ShardSourceError
from open_clip_medclip.streams.plan import check_shards_exist, preflight_shards
from open_clip_medclip.streams.stages import get_medclip_wds_dataset
from open_clip_medclip.text_width import MEDCLIP_POOLERS, text_pooler_type
from open_clip_medclip.throughput import TimedLoader, log_throughput

log = logging.getLogger("open_clip_medclip")

# Names rebound in the trainer's module namespace (open_clip_train.main, or __main__ under `python -m`).
_NAMESPACE_NAMES = (
    "main",
    "parse_args",
    "create_model_and_transforms",
    "create_loss",
    "get_data",
    "train_one_epoch",
    "setup_logging",
    "get_latest_checkpoint",
    "natural_key",
    "pt_load",
    "torch",
    "optim",
)
_REQUIRED = {
    open_clip_train.main: _NAMESPACE_NAMES,
    open_clip_train.params: ("parse_args",),
    open_clip_train.precision: ("get_autocast",),
    open_clip_train.data: (
        "get_data",
        "get_dataset_fn",
        "expand_urls",
        "tar_file_expander",
        "tarfile_to_samples_nothrow",
        "group_by_keys_nothrow",
    ),
    open_clip_train.train: ("train_one_epoch", "zero_shot_eval", "evaluate"),
    model: ("CustomTextCLIP", "CLIP", "get_model_preprocess_cfg"),
    factory: ("get_model_config",),
    torch.nn.parallel: ("DistributedDataParallel",),
}


def check_host() -> None:
    """Fail loudly, naming each attribute, if an open_clip_train internal we rebind has gone."""
    missing = missing_attributes(_REQUIRED)
    if not missing and open_clip_train.main.torch is not torch:
        missing = ["open_clip_train.main.torch (the torch module)"]
    require_host(missing, "open_clip_torch 3.3.x (open_clip_train)", f"open_clip {open_clip.__version__}",
                 "open_clip_torch>=3.3,<3.4")


check_host()


# ----------------------------------------------------------------------------------------------------------------
# webdataset end-of-shard markers (every model)
# ----------------------------------------------------------------------------------------------------------------
_ORIGINAL_TAR_FILE_EXPANDER = open_clip_train.data.tar_file_expander


def tar_file_expander_without_markers(data, *args, **kwargs):
    """webdataset's `tar_file_expander` minus the empty `{}` end-of-shard markers (webdataset >= 0.2.96), which
    open_clip_train 3.3's `group_by_keys_nothrow` reads as a file record (`KeyError: 'fname'`)."""
    for sample in _ORIGINAL_TAR_FILE_EXPANDER(data, *args, **kwargs):
        if sample:
            yield sample


def install_webdataset_fix() -> None:
    """Idempotent; `open_clip_train.data.tarfile_to_samples_nothrow` looks the expander up at call time."""
    open_clip_train.data.tar_file_expander = tar_file_expander_without_markers


install_webdataset_fix()


# ----------------------------------------------------------------------------------------------------------------
# Model: label passthrough without new parameters (checkpoints stay plain OpenCLIP state dicts)
# ----------------------------------------------------------------------------------------------------------------
class LabelPassthroughMixin:
    """Strips packed label columns from `text` (`labels.unpack_batch`) and returns them in the output dict.

    Only tensors made by `labels.pack_batch` (recognised by their marker column) are unpacked, so `encode_text`,
    zero-shot classifiers and unpacked evaluation data see the model unchanged.
    """

    medclip_context_length = 77  # informational: packed rows carry their own width
    medclip_num_labels = NUM_FINDINGS

    def forward(self, image=None, text=None):
        image_labels = text_labels = None
        if text is not None:
            text, image_labels, text_labels = labels.unpack_batch(text)
        out = super().forward(image, text)
        if image_labels is not None:
            if not isinstance(out, dict):
                raise RuntimeError("label passthrough needs output_dict=True models (open_clip_train uses them)")
            out["image_labels"] = image_labels
            out["text_labels"] = text_labels
        return out


_PASSTHROUGH_CLASSES: dict[type, type] = {}


def passthrough_class(base: type) -> type:
    """`Medclip<Base>`: the label-passthrough subclass of an OpenCLIP model class (cached, no new state)."""
    if base not in _PASSTHROUGH_CLASSES:
        _PASSTHROUGH_CLASSES[base] = type(f"Medclip{base.__name__}", (LabelPassthroughMixin, base), {})
    return _PASSTHROUGH_CLASSES[base]


def enable_label_passthrough(clip_model: torch.nn.Module, context_length: int = 77) -> torch.nn.Module:
    """Swap `clip_model`'s class in place; valid because the subclass adds no parameters or buffers."""
    base = type(clip_model)
    if isinstance(clip_model, LabelPassthroughMixin):
        clip_model.medclip_context_length = context_length
        return clip_model
    if base not in (model.CustomTextCLIP, model.CLIP):
        raise TypeError(f"label passthrough supports CLIP and CustomTextCLIP models, not {base.__name__}")
    state_before = set(clip_model.state_dict())
    clip_model.__class__ = passthrough_class(base)
    clip_model.medclip_context_length = context_length
    assert set(clip_model.state_dict()) == state_before
    return clip_model


def model_context_length(model_name: str, force_context_length: int | None = None) -> int:
    """Token width of the model's tokenizer (before any per-batch trimming)."""
    if force_context_length:
        return int(force_context_length)
    config = factory.get_model_config(model_name)
    if config and config.get("text_cfg", {}).get("context_length"):
        return int(config["text_cfg"]["context_length"])
    return int(open_clip.get_tokenizer(model_name).context_length)


def is_medclip_config(model_name: str | None) -> bool:
    """Whether `--model` names a MedCLIP model: its text tower uses a MedCLIP pooler."""
    return text_pooler_type(model_name) in MEDCLIP_POOLERS


# ----------------------------------------------------------------------------------------------------------------
# MedCLIP shards: a cheap look at the first sample of the first shard
# ----------------------------------------------------------------------------------------------------------------
def _is_tar_data(path, dataset_type: str) -> bool:
    if dataset_type == "webdataset":
        return True
    return dataset_type == "auto" and isinstance(path, str) and path.split(".")[-1] == "tar"


def first_shard(train_data: str) -> str | None:
    try:
        urls, _ = open_clip_train.data.expand_urls(train_data)
    except Exception:  # malformed brace notation etc.: the trainer reports it itself
        return None
    return urls[0] if urls else None


def shard_carries_medclip_labels(url: str, max_members: int = 64, timeout: float | None = None) -> bool:
    """True when the first `.json` member of shard `url` is a MedCLIP sample record (`kind` and `labels`).

    Reads one shard's first members through `openclip_data.open_url` (local paths, `pipe:`, http(s) and fsspec
    URLs; remote reads with the --medclip-shard-timeout). A shard that cannot be read at all (server down, HTTP
    error, stalled, a failing `pipe:` command) raises `ShardSourceError`: treating it as plain OpenCLIP data would
    train the wrong way, silently. A readable file that is not a tar, or holds no MedCLIP record, is plain data.
    """
    import json

    from open_clip_medclip.plugins.openclip_data import open_url

    from open_clip_medclip.shards.format import KINDS
    from open_clip_medclip.streams.faults import ShardFailurePolicy, is_remote_url

    if timeout is None and is_remote_url(url):
        timeout = ShardFailurePolicy.from_args().timeout
    stream = None
    try:
        stream = open_url(url, timeout)
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for count, member in enumerate(archive):
                if count >= max_members:
                    return False
                if not member.isfile() or not member.name.endswith(".json"):
                    continue
                handle = archive.extractfile(member)
                record = json.loads(handle.read().decode("utf-8")) if handle else None
                return isinstance(record, dict) and record.get("kind") in KINDS and "labels" in record
    except (tarfile.TarError, ValueError, UnicodeDecodeError):
        return False
    except OSError as exc:  # TimeoutError included
        if not is_remote_url(url):
            return False  # a local file: the trainer names it itself
        raise ShardSourceError(
            f"cannot read the first shard {url} to tell MedCLIP shards from plain OpenCLIP data: "
            f"{type(exc).__name__}: {exc}; check that the shard source is up, then rerun") from None
    finally:
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.close()
    return False


def data_has_medclip_labels(args) -> tuple[bool, str | None]:
    """(are the data MedCLIP shards, the first shard looked at): `--train-data`, else `--val-data`."""
    data = getattr(args, "train_data", None) or getattr(args, "val_data", None)
    if not data or not _is_tar_data(data, getattr(args, "dataset_type", "auto")):
        return False, None
    url = first_shard(data)
    timeout = MedclipOptions.from_args(args).shard_timeout
    return (bool(url) and shard_carries_medclip_labels(url, timeout=timeout)), url


# ----------------------------------------------------------------------------------------------------------------
# CPU DDP shim
# ----------------------------------------------------------------------------------------------------------------
_OriginalDDP = torch.nn.parallel.DistributedDataParallel


class CpuFriendlyDDP(_OriginalDDP):
    """DistributedDataParallel that ignores `device_ids` for CPU modules.

    open_clip_train 3.3 always passes `device_ids=[device]`; torch rejects that for CPU modules, so multi-process
    CPU runs (gloo, CI) fail without this. GPU behaviour is unchanged.
    """

    def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids, output_device = None, None
        super().__init__(module, device_ids, output_device, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Crash-safe checkpoints, fused AdamW, quiet third-party loggers
# ----------------------------------------------------------------------------------------------------------------
class TrainerTorch(types.ModuleType):
    """`torch` as the trainer's module sees it during a MedCLIP run: `torch.save` writes atomically; `saved` lists
    the paths written (the run's checkpoints)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.saved: list[str] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def save(self, obj, f, *args, **kwargs):
        checkpoints.atomic_save(obj, f, save=lambda o, handle: torch.save(o, handle, *args, **kwargs))
        if isinstance(f, (str, os.PathLike)):
            self.saved.append(os.fspath(f))


def fused_adamw_kwargs(params, kwargs: dict) -> tuple[list, dict]:
    """(params as a list, kwargs with `fused=True` when every parameter is a floating CUDA tensor)."""
    params = list(params)
    if "fused" in kwargs or "foreach" in kwargs or not torch.cuda.is_available():
        return params, kwargs
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    if tensors and all(isinstance(t, torch.Tensor) and t.is_cuda and t.is_floating_point() for t in tensors):
        kwargs = {**kwargs, "fused": True}
    return params, kwargs


class TrainerOptim(types.ModuleType):
    """`torch.optim` as the trainer's module sees it during a MedCLIP run: AdamW is fused on CUDA."""

    def __init__(self) -> None:
        super().__init__("torch.optim")

    def __getattr__(self, name):
        return getattr(torch.optim, name)

    @staticmethod
    def AdamW(params, *args, **kwargs):  # noqa: N802 (torch's name)
        params, kwargs = fused_adamw_kwargs(params, kwargs)
        return torch.optim.AdamW(params, *args, **kwargs)


_KEEP_TRAINER_LEVEL = ("open_clip", "webdataset")  # open_clip, open_clip_train, open_clip_medclip


def _setup_logging(original: Callable) -> Callable:
    def setup_logging(log_file, level, include_host=False):
        before = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
                  if isinstance(logger, logging.Logger)}
        original(log_file, level, include_host=include_host)
        if level > logging.DEBUG:  # --debug keeps the trainer's everything-at-DEBUG
            for name, logger in list(logging.root.manager.loggerDict.items()):
                # placeholders (e.g. 'torch._subclasses') became loggers at INFO: they go back to NOTSET
                if isinstance(logger, logging.Logger) and not name.startswith(_KEEP_TRAINER_LEVEL):
                    logger.setLevel(before.get(name, logging.NOTSET))

    return setup_logging


def _get_latest_checkpoint(original: Callable, natural_key: Callable) -> Callable:
    def get_latest_checkpoint(path: str, remote: bool):
        if remote:
            return original(path, remote)
        candidates = sorted(glob.glob(path + "**/*.pt", recursive=True), key=natural_key)
        chosen, skipped = checkpoints.newest_readable(candidates)
        if skipped:
            logging.warning(
                "--resume latest: skipped %d unreadable checkpoint(s): %s; %s", len(skipped),
                checkpoints.describe_skipped(skipped),
                f"resuming from {chosen}" if chosen else "no readable checkpoint left, starting from scratch",
            )
        return chosen

    return get_latest_checkpoint


def _pt_load(original: Callable) -> Callable:
    def pt_load(file_path, map_location=None):
        if isinstance(file_path, (str, os.PathLike)) and os.path.isfile(file_path):
            reason = checkpoints.unreadable_reason(os.fspath(file_path))
            if reason:
                raise RuntimeError(f"--resume {file_path}: the checkpoint is {reason}; pass an intact checkpoint, "
                                   "or --resume latest (it skips unreadable files)")
        return original(file_path, map_location=map_location)

    return pt_load


# ----------------------------------------------------------------------------------------------------------------
# The patched functions
# ----------------------------------------------------------------------------------------------------------------
def seed_epoch(args, epoch: int) -> None:
    """Seed python, numpy and torch from (seed, rank, epoch) at each epoch start.

    open_clip_train seeds once per process, so a resumed run's dropout and augmentation draws differ from the
    uninterrupted run's; per-epoch seeds (with the seeded medclip streams) make epoch N identical either way.
    """
    import random

    import numpy as np

    seed = random.Random(f"medclip-epoch:{args.seed}:{getattr(args, 'rank', 0)}:{epoch}").getrandbits(63)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


ZeroShotHook = Callable[..., dict]
_ZERO_SHOT_HOOKS: list[ZeroShotHook] = []


def register_zero_shot_eval(hook: ZeroShotHook) -> ZeroShotHook:
    """Add `hook(model, data, epoch, args, tokenizer=None) -> {metric: value}` to the trainer's evaluation.

    Called on the master rank with the unwrapped model, wherever open_clip_train runs zero-shot evaluation; the
    metrics land in `results.jsonl` and tensorboard/wandb `val/...`. The hook decides its own frequency.
    """
    if hook not in _ZERO_SHOT_HOOKS:
        _ZERO_SHOT_HOOKS.append(hook)
    return hook


def unregister_zero_shot_eval(hook: ZeroShotHook) -> None:
    if hook in _ZERO_SHOT_HOOKS:
        _ZERO_SHOT_HOOKS.remove(hook)


def _zero_shot_eval(model, data, epoch, args, tokenizer=None):
    metrics = dict(_ORIGINAL.zero_shot_eval(model, data, epoch, args, tokenizer=tokenizer))
    inner = model.module if hasattr(model, "module") else model
    for hook in _ZERO_SHOT_HOOKS:
        metrics.update(hook(inner, data, epoch, args, tokenizer=tokenizer))
    return metrics


def _unwrapped(function: Callable) -> Callable:
    return getattr(function, "__wrapped__", function)


_ORIGINAL = SimpleNamespace(
    zero_shot_eval=open_clip_train.train.zero_shot_eval,
    parse_args=_unwrapped(open_clip_train.main.parse_args),
    create_model_and_transforms=open_clip_train.main.create_model_and_transforms,
    create_loss=open_clip_train.main.create_loss,
    get_data=open_clip_train.main.get_data,
    train_one_epoch=open_clip_train.main.train_one_epoch,
    setup_logging=open_clip_train.main.setup_logging,
    get_latest_checkpoint=open_clip_train.main.get_latest_checkpoint,
    natural_key=open_clip_train.main.natural_key,
    pt_load=open_clip_train.main.pt_load,
    get_dataset_fn=open_clip_train.data.get_dataset_fn,
    ddp=_OriginalDDP,
)


class _Run:
    """The patched entry points for one `open_clip_train.main.main` call, closed over the `--medclip-*` values.

    `streams=False` (a MedCLIP model on data without MedCLIP labels): OpenCLIP's own data and ClipLoss, with the
    crash-safe checkpoints, logging and seeding of a MedCLIP run.
    """

    def __init__(self, options: MedclipOptions, streams: bool = True, data_note: str | None = None,
                 front_door: str = "medclip") -> None:
        self.options = options
        self.front_door = front_door  # "medclip" (`medclip train`) or "host" (plain open_clip_train.main)
        self.streams = streams
        self.data_note = data_note
        self.args = None
        self.tokenizer = None
        self.torch = TrainerTorch()
        self.epochs_run = 0  # train_one_epoch calls that returned
        self.steps = 0  # batches trained on
        self.host_result = None  # what open_clip_train.main.main returned (-1: it refused to run)
        self.host_messages: list[str] = []  # the lines it printed starting with "Error"

    def parse_args(self, argv):
        args = _ORIGINAL.parse_args(argv)
        self.options.store(args)
        self.args = args
        if self.streams and _is_tar_data(args.train_data or args.val_data, getattr(args, "dataset_type", "auto")):
            preflight(args, "medclip train")
        return args

    def create_model_and_transforms(self, model_name, *pos, **kwargs):
        clip_model, preprocess_train, preprocess_val = _ORIGINAL.create_model_and_transforms(model_name, *pos, **kwargs)
        inner = clip_model.module if hasattr(clip_model, "module") else clip_model
        if self.options.padding_free:
            enable_padding_free_text(inner)
            logging.info("open_clip_medclip: %s text tower runs padding-free (--medclip-padding-free)", model_name)
        if not self.streams:
            return clip_model, preprocess_train, preprocess_val
        context_length = model_context_length(model_name, kwargs.get("force_context_length"))
        enable_label_passthrough(inner, context_length)
        if self.options.augment == "medclip":
            cfg = model.get_model_preprocess_cfg(inner)
            size = cfg.get("size", 224)
            size = size[0] if isinstance(size, (tuple, list)) else size
            preprocess_train = medclip_train_transform(int(size), mean=cfg["mean"], std=cfg["std"])
        return clip_model, preprocess_train, preprocess_val

    def announce(self, args) -> str:
        """The log line saying which loss trains on which data."""
        if not self.streams:
            return (f"open_clip_medclip: plain InfoNCE (OpenCLIP's ClipLoss on OpenCLIP's streams): {args.model} is a "
                    f"MedCLIP model but the training data carry no MedCLIP labels ({self.data_note}); build MedCLIP "
                    "shards with `medclip shards build` for the semantic matching loss")
        options = MedclipOptions.from_args(args)
        if options.loss == "clip":
            what = "plain InfoNCE (--medclip-loss clip)"
        else:
            what = (f"the semantic matching loss (label similarity {options.label_similarity},"
                    f" uncertain labels as {options.uncertain})")
        return (f"open_clip_medclip: training {args.model} with {what} on MedCLIP label-aware streams, "
                f"{options.augment} augmentation")

    def create_loss(self, args):
        from open_clip_train.distributed import is_master

        if is_master(args):
            logging.info(self.announce(args))
        if not self.streams:
            return _ORIGINAL.create_loss(args)
        return create_medclip_loss(args, self.options)

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None):
        self.tokenizer = tokenizer
        if not self.streams:
            return _ORIGINAL.get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)

        def dataset_fn(data_path, dataset_type):
            if _is_tar_data(data_path, dataset_type):
                return get_medclip_wds_dataset
            return _ORIGINAL.get_dataset_fn(data_path, dataset_type)

        open_clip_train.data.get_dataset_fn = dataset_fn
        try:
            return _ORIGINAL.get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        finally:
            open_clip_train.data.get_dataset_fn = _ORIGINAL.get_dataset_fn

    def train_one_epoch(self, clip_model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        from open_clip_train.distributed import is_master

        seed_epoch(args, epoch)
        info = data["train"]
        timed = TimedLoader(info.dataloader)
        info.dataloader = timed
        start = time.perf_counter()
        try:
            result = _ORIGINAL.train_one_epoch(
                clip_model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=tb_writer
            )
        except ShardSourceError as exc:  # raised in a loader worker: the DataLoader wrapped it in a traceback
            self.stop(ShardSourceError.line(exc))
        finally:
            info.dataloader = timed.dataloader
        self.epochs_run += 1
        self.steps += timed.batches
        if is_master(args):
            log_throughput(args, epoch, timed, time.perf_counter() - start, tb_writer)
        if _ZERO_SHOT_HOOKS and not any(key in data for key in ("val", "imagenet-val", "imagenet-v2")):
            # main.py only evaluates when val/ImageNet data exist; run the registered zero-shot hooks anyway
            # (non-master ranks return at once; main.py's barrier after checkpointing keeps ranks in step)
            open_clip_train.train.evaluate(clip_model, data, epoch + 1, args, tb_writer=tb_writer,
                                           tokenizer=self.tokenizer)
        return result

    def stop(self, line: str):
        """End the run on one line (the shard source failed): `medclip train` prints it and exits 3; plain
        `open_clip_train.main` (autoload) prints it as its own error and exits 3, instead of a worker traceback."""
        log.error("open_clip_medclip: %s", line)
        if self.front_door == "host":
            print(f"open_clip_train.main: error: {line}", file=sys.stderr, flush=True)
            raise SystemExit(ShardSourceError.exit_code)
        raise ShardSourceError(line) from None

    def namespace_replacements(self, namespace: dict, with_parse_args: bool) -> dict:
        replacements = {
            "create_model_and_transforms": self.create_model_and_transforms,
            "create_loss": self.create_loss,
            "get_data": self.get_data,
            "train_one_epoch": self.train_one_epoch,
            "setup_logging": _setup_logging(namespace["setup_logging"]),
            "get_latest_checkpoint": _get_latest_checkpoint(namespace["get_latest_checkpoint"],
                                                            namespace["natural_key"]),
            "pt_load": _pt_load(namespace["pt_load"]),
            "torch": self.torch,
            "optim": TrainerOptim(),
        }
        if with_parse_args:
            replacements["parse_args"] = self.parse_args
        return replacements


_GLOBAL_TARGETS = (
    (open_clip_train.train, "zero_shot_eval", lambda: _zero_shot_eval),
    (torch.nn.parallel, "DistributedDataParallel", lambda: CpuFriendlyDDP),
)


def _install(namespace: dict, replacements: dict) -> dict:
    """Rebind names in `namespace` and the global targets; returns what `_restore` needs."""
    saved = {"namespace": {name: namespace[name] for name in replacements},
             "globals": [(owner, attr, getattr(owner, attr)) for owner, attr, _ in _GLOBAL_TARGETS]}
    namespace.update(replacements)
    for owner, attr, value in _GLOBAL_TARGETS:
        setattr(owner, attr, value())
    return saved


def _restore(namespace: dict, saved: dict) -> None:
    namespace.update(saved["namespace"])
    for owner, attr, value in saved["globals"]:
        setattr(owner, attr, value)
    open_clip_train.data.get_dataset_fn = _ORIGINAL.get_dataset_fn


@contextlib.contextmanager
def patched_trainer(options: MedclipOptions, namespace: dict | None = None) -> Iterator[_Run]:
    """Rebind the trainer's entry points for the duration of one run; restored on exit, even after errors."""
    namespace = vars(open_clip_train.main) if namespace is None else namespace
    run = _Run(options)
    root_logger = logging.getLogger()
    handlers_before = list(root_logger.handlers)
    # setup_logging also sets the level of every logger that exists (torch's too); restore them all afterwards.
    levels_before = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
                     if isinstance(logger, logging.Logger)}
    levels_before[""] = root_logger.level
    saved = _install(namespace, run.namespace_replacements(namespace, with_parse_args=True))
    try:
        yield run
    finally:
        _restore(namespace, saved)
        # open_clip_train's setup_logging adds handlers (out.log) to the root logger and never removes them;
        # drop them so a second run in the same process does not write into the first run's log.
        for handler in root_logger.handlers[:]:
            if handler not in handlers_before:
                root_logger.removeHandler(handler)
                handler.close()
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):  # loggers created during the run inherit again
                logger.setLevel(levels_before.get(name, logging.NOTSET))
        root_logger.setLevel(levels_before[""])


class _ErrorLines:
    """stdout passed through, keeping the lines that start with "Error" (how open_clip_train says it refuses)."""

    def __init__(self, stream, kept: list[str]) -> None:
        self.stream, self.kept, self.pending = stream, kept, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        self.kept.extend(line.strip() for line in lines if line.lstrip().startswith("Error"))
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run_trainer(trainer_argv: list[str], options: MedclipOptions) -> _Run:
    """`open_clip_train.main.main(trainer_argv)` with the MedCLIP entry points in place; the run says what
    happened (`args`, `host_result`, `host_messages`, `epochs_run`, `steps`, `torch.saved`)."""
    with patched_trainer(options) as run, contextlib.redirect_stdout(_ErrorLines(sys.stdout, run.host_messages)):
        run.host_result = open_clip_train.main.main(trainer_argv)
    return run


# ----------------------------------------------------------------------------------------------------------------
# Plain `python -m open_clip_train.main` (autoload): decide per run from --model and --train-data
# ----------------------------------------------------------------------------------------------------------------
_HOST_INSTALLED: dict[int, tuple[dict, dict, ZeroShotHook | None]] = {}


def medclip_options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="open_clip_train.main", usage=argparse.SUPPRESS, add_help=False, allow_abbrev=False,
        description="open_clip_medclip (autoload): with --model medclip-* and MedCLIP shards this trainer uses the "
        "semantic matching loss on label-aware streams; the flags below tune it. OpenCLIP's own options follow.")
    MedclipOptions.add_arguments(parser)
    return parser


def host_refusal(message: str, exit_code: int = USER_ERROR_EXIT_CODE):
    """Plain `open_clip_train.main` (autoload) refuses in one line, argparse style, exit 2 (or `exit_code`)."""
    print(f"open_clip_train.main: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(exit_code)


@contextlib.contextmanager
def _refused_on_one_line():
    try:
        yield
    except UserError as exc:
        host_refusal(str(exc), exc.exit_code)


def preflight(args, program: str) -> None:
    """`streams.preflight_shards` with the world size the trainer will find (torchrun/SLURM/MPI environment):
    missing shards and too few shards for ranks x workers are one line before the model is built."""
    from open_clip_train.distributed import world_info_from_env

    _, rank, world_size = world_info_from_env()
    note = preflight_shards(args, max(1, world_size))
    if note and rank == 0:
        print(f"{program}: note: {note}", file=sys.stderr, flush=True)


def is_trainer_namespace(namespace: dict) -> bool:
    return all(name in namespace for name in _NAMESPACE_NAMES)


def host_parse_args(original: Callable, argv, namespace: dict):
    """`parse_args` of a plain open_clip_train run with the autoload: `--medclip-*` flags are accepted; MedCLIP
    models get the MedCLIP entry points in `namespace` (the calling trainer module), other models none."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not is_trainer_namespace(namespace):
        return original(argv)
    previous = _HOST_INSTALLED.pop(id(namespace), None)
    if previous is not None:  # an earlier run in this process
        _restore(previous[0], previous[1])
        if previous[2] is not None:
            unregister_zero_shot_eval(previous[2])
    parser = medclip_options_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print()
        return original(argv)
    parsed, rest = parser.parse_known_args(argv)
    options = MedclipOptions.from_args(parsed)
    args = original(rest)
    if not is_medclip_config(args.model):
        given = sorted({a.split("=")[0] for a in argv if a.startswith("--medclip-")})
        if given:
            host_refusal(f"{', '.join(given)}: for MedCLIP models only; --model {args.model} is not one "
                         "(open_clip_medclip autoload)")
        return args
    if options.padding_free and text_pooler_type(args.model) != "medclip_masked_pooler":
        host_refusal(f"--medclip-padding-free: --model {args.model} averages padding in its text pooler "
                     "(medclip_pooler); padding-free needs medclip_masked_pooler (the medclip-*-masked models)")
    options.store(args)
    if _is_tar_data(args.train_data or args.val_data, getattr(args, "dataset_type", "auto")):
        with _refused_on_one_line():  # before the first shard is opened: "no such file", with the pattern
            check_shards_exist("--train-data", args.train_data)
            check_shards_exist("--val-data", args.val_data)
    with _refused_on_one_line():  # an unreadable first shard (server down): exit 3, not silently plain data
        labelled, url = data_has_medclip_labels(args)
    if labelled:
        with _refused_on_one_line():
            preflight(args, "open_clip_train.main")
    note = None if labelled else (f"first shard {url}" if url else f"--train-data {args.train_data}")
    run = _Run(options, streams=labelled, data_note=note, front_door="host")
    run.args = args
    hook = None
    if labelled and options.zeroshot_suite:
        hook = register_zero_shot_eval(suite_zero_shot_hook(options.zeroshot_suite))
    saved = _install(namespace, run.namespace_replacements(namespace, with_parse_args=False))
    _HOST_INSTALLED[id(namespace)] = (namespace, saved, hook)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Host pieces the library needs outside a training run (so no module outside plugins/ imports open_clip_train)
# ----------------------------------------------------------------------------------------------------------------
def trainer_parse_args(argv: list[str]):
    """open_clip_train's own argument parser (flag checks and `medclip train --help`)."""
    return open_clip_train.params.parse_args(argv)


def get_autocast(precision: str, device_type: str = "cuda"):
    """open_clip_train's autocast factory for a `--precision` value."""
    return open_clip_train.precision.get_autocast(precision, device_type=device_type)


def eval_preprocess(clip_model: torch.nn.Module):
    """The evaluation image transform a model's own preprocess config describes."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**clip_model.visual.preprocess_cfg), is_train=False)


def suite_zero_shot_hook(suites: list[str]):
    """A trainer zero-shot hook evaluating built suites, following open_clip_train's --zeroshot-frequency rule."""

    def hook(model, data, epoch, args, tokenizer=None) -> dict[str, float]:
        frequency = args.zeroshot_frequency
        if not frequency or (epoch % frequency != 0 and epoch != args.epochs):
            return {}
        import open_clip

        from open_clip_medclip.eval.zeroshot import zero_shot_metrics
        preprocess = eval_preprocess(model)
        tokenizer = tokenizer or open_clip.get_tokenizer(args.model)
        device_type = str(args.device).split(":")[0]
        metrics: dict[str, float] = {}
        for suite in suites:
            metrics.update(zero_shot_metrics(model, suite, tokenizer, preprocess, args.device,
                                             autocast=lambda: get_autocast(args.precision, device_type=device_type)()))
        return metrics

    return hook

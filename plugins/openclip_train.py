"""Host glue for `open_clip_train`: the only place that touches the trainer's internals.

OpenCLIP 3.3's trainer has no plugin hooks for a loss, a dataset or a model class, so `open_clip_medclip.train`
runs the unmodified `open_clip_train.main.main` with these module attributes rebound for the duration of a run
(each is a name bound by `from X import Y`, so rebinding it in the using module is what takes effect):
- `open_clip_train.main.parse_args`: adds the `--medclip-*` values to the trainer's namespace;
- `open_clip_train.main.create_model_and_transforms`: swaps the model's class for a parameter-free subclass that
  strips the label columns packed into the text tensor and returns them as `image_labels`/`text_labels`, and
  puts MedCLIP's training augmentation in place of OpenCLIP's;
- `open_clip_train.main.create_loss`: `SemanticMatchingLoss` (or label-tolerant `ClipLoss` for baselines);
- `open_clip_train.main.get_data`, via `open_clip_train.data.get_dataset_fn` during the call: label-aware streams;
- `open_clip_train.main.train_one_epoch`: times data waiting and logs samples/s and the data-wait fraction;
- `open_clip_train.train.zero_shot_eval`: adds the metrics of registered zero-shot hooks (`register_zero_shot_eval`),
  and `train_one_epoch` then calls `evaluate` even without `--val-data`/ImageNet (3.3 gates it on those);
- `torch.nn.parallel.DistributedDataParallel`: drops `device_ids` for CPU modules (3.3 passes them and fails).
Every attribute touched is checked at import; a missing one fails loudly with the attribute's name.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import open_clip
import open_clip_train
import open_clip_train.data
import open_clip_train.main
import open_clip_train.train
import torch
from open_clip import factory, model
from open_clip_medclip.plugins import HostMismatchError, missing_attributes, require_host  # noqa: F401

from open_clip_medclip.findings import NUM_FINDINGS
from open_clip_medclip.loss import create_medclip_loss
from open_clip_medclip.streams import get_medclip_wds_dataset, medclip_train_transform, unpack_labels

log = logging.getLogger("open_clip_medclip")

_REQUIRED = {
    open_clip_train.main: (
        "main",
        "parse_args",
        "create_model_and_transforms",
        "create_loss",
        "get_data",
        "train_one_epoch",
    ),
    open_clip_train.data: (
        "get_data",
        "get_dataset_fn",
        "DataInfo",
        "SharedEpoch",
        "ResampledShards2",
        "detshuffle2",
        "group_by_keys_nothrow",
        "log_and_continue",
        "_SHARD_SHUFFLE_SIZE",
        "_SHARD_SHUFFLE_INITIAL",
        "_SAMPLE_SHUFFLE_SIZE",
        "_SAMPLE_SHUFFLE_INITIAL",
    ),
    open_clip_train.train: ("train_one_epoch", "zero_shot_eval", "evaluate"),
    model: ("CustomTextCLIP", "CLIP", "get_model_preprocess_cfg"),
    factory: ("get_model_config",),
    torch.nn.parallel: ("DistributedDataParallel",),
}


def check_host() -> None:
    """Fail loudly, naming each attribute, if an open_clip_train internal we rebind has gone."""
    require_host(missing_attributes(_REQUIRED), "open_clip_torch 3.3.x (open_clip_train)",
                 f"open_clip {open_clip.__version__}", "open_clip_torch>=3.3,<3.4")


check_host()


# ----------------------------------------------------------------------------------------------------------------
# Model: label passthrough without new parameters (checkpoints stay plain OpenCLIP state dicts)
# ----------------------------------------------------------------------------------------------------------------
class LabelPassthroughMixin:
    """Strips packed label columns from `text` and returns them in the output dict.

    Only rows exactly `medclip_context_length + 2 * medclip_num_labels` wide are unpacked, so `encode_text`,
    zero-shot classifiers and unpacked evaluation data see the model unchanged.
    """

    medclip_context_length = 77
    medclip_num_labels = NUM_FINDINGS

    def forward(self, image=None, text=None):
        image_labels = text_labels = None
        if text is not None:
            text, image_labels, text_labels = unpack_labels(text, self.medclip_context_length, self.medclip_num_labels)
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


def enable_label_passthrough(clip_model: torch.nn.Module, context_length: int) -> torch.nn.Module:
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
    """Token width of the model's tokenizer: what the packed text rows start with."""
    if force_context_length:
        return int(force_context_length)
    config = factory.get_model_config(model_name)
    if config and config.get("text_cfg", {}).get("context_length"):
        return int(config["text_cfg"]["context_length"])
    return int(open_clip.get_tokenizer(model_name).context_length)


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
# Throughput: samples/s and the fraction of step time spent waiting for data
# ----------------------------------------------------------------------------------------------------------------
class TimedLoader:
    """Wraps a DataInfo's dataloader; counts batches, samples and seconds spent in `next()`."""

    def __init__(self, dataloader) -> None:
        self.dataloader = dataloader
        self.num_batches = dataloader.num_batches
        self.num_samples = dataloader.num_samples
        self.wait_seconds = 0.0
        self.batches = 0
        self.samples = 0

    def __len__(self) -> int:
        return len(self.dataloader)

    def __getattr__(self, name):
        return getattr(self.dataloader, name)

    def __iter__(self) -> Iterator:
        iterator = iter(self.dataloader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - start
            self.batches += 1
            self.samples += len(batch[0])
            yield batch


def _log_throughput(args, epoch: int, loader: TimedLoader, seconds: float, tb_writer=None) -> dict:
    world = getattr(args, "world_size", 1) or 1
    stats = {
        "epoch": epoch,
        "steps": loader.batches // max(1, args.accum_freq),
        "samples": loader.samples * world,
        "seconds": round(seconds, 4),
        "samples_per_second": loader.samples * world / seconds if seconds > 0 else 0.0,
        "data_wait_fraction": loader.wait_seconds / seconds if seconds > 0 else 0.0,
    }
    log.info(
        "medclip epoch %d: %.1f samples/s, %.1f%% of step time waiting for data (%d steps, %.1f s)",
        epoch,
        stats["samples_per_second"],
        100 * stats["data_wait_fraction"],
        stats["steps"],
        seconds,
    )
    logs, name = getattr(args, "logs", None), getattr(args, "name", None)
    if logs and name and os.path.isdir(os.path.join(logs, name)):
        with open(os.path.join(logs, name, "medclip_throughput.jsonl"), "a") as handle:
            handle.write(json.dumps(stats) + "\n")
    if tb_writer is not None:
        step = (epoch + 1) * max(1, loader.num_batches // max(1, args.accum_freq))
        tb_writer.add_scalar("train/medclip_samples_per_second", stats["samples_per_second"], step)
        tb_writer.add_scalar("train/medclip_data_wait_fraction", stats["data_wait_fraction"], step)
    return stats


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


# ----------------------------------------------------------------------------------------------------------------
# The patched functions and the context manager that installs them
# ----------------------------------------------------------------------------------------------------------------
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


_ORIGINAL = SimpleNamespace(
    zero_shot_eval=open_clip_train.train.zero_shot_eval,
    parse_args=open_clip_train.main.parse_args,
    create_model_and_transforms=open_clip_train.main.create_model_and_transforms,
    create_loss=open_clip_train.main.create_loss,
    get_data=open_clip_train.main.get_data,
    train_one_epoch=open_clip_train.main.train_one_epoch,
    get_dataset_fn=open_clip_train.data.get_dataset_fn,
    ddp=_OriginalDDP,
)


def _is_tar_data(path, dataset_type: str) -> bool:
    if dataset_type == "webdataset":
        return True
    return dataset_type == "auto" and isinstance(path, str) and path.split(".")[-1] == "tar"


class _Run:
    """The patched entry points for one `open_clip_train.main.main` call, closed over the `--medclip-*` values."""

    def __init__(self, medclip_args) -> None:
        self.medclip_args = medclip_args
        self.args = None
        self.tokenizer = None

    def parse_args(self, argv):
        args = _ORIGINAL.parse_args(argv)
        for key, value in vars(self.medclip_args).items():
            setattr(args, key, value)
        self.args = args
        return args

    def create_model_and_transforms(self, model_name, *pos, **kwargs):
        clip_model, preprocess_train, preprocess_val = _ORIGINAL.create_model_and_transforms(model_name, *pos, **kwargs)
        context_length = model_context_length(model_name, kwargs.get("force_context_length"))
        inner = clip_model.module if hasattr(clip_model, "module") else clip_model
        enable_label_passthrough(inner, context_length)
        if getattr(self.medclip_args, "medclip_augment", "medclip") == "medclip":
            cfg = model.get_model_preprocess_cfg(inner)
            size = cfg.get("size", 224)
            size = size[0] if isinstance(size, (tuple, list)) else size
            preprocess_train = medclip_train_transform(int(size), mean=cfg["mean"], std=cfg["std"])
        return clip_model, preprocess_train, preprocess_val

    def create_loss(self, args):
        return create_medclip_loss(args)

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None):
        def dataset_fn(data_path, dataset_type):
            if _is_tar_data(data_path, dataset_type):
                return get_medclip_wds_dataset
            return _ORIGINAL.get_dataset_fn(data_path, dataset_type)

        self.tokenizer = tokenizer
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
        finally:
            info.dataloader = timed.dataloader
        if is_master(args):
            _log_throughput(args, epoch, timed, time.perf_counter() - start, tb_writer)
        if _ZERO_SHOT_HOOKS and not any(key in data for key in ("val", "imagenet-val", "imagenet-v2")):
            # main.py only evaluates when val/ImageNet data exist; run the registered zero-shot hooks anyway
            # (non-master ranks return at once; main.py's barrier after checkpointing keeps ranks in step)
            open_clip_train.train.evaluate(clip_model, data, epoch + 1, args, tb_writer=tb_writer,
                                           tokenizer=self.tokenizer)
        return result


@contextlib.contextmanager
def patched_trainer(medclip_args) -> Iterator[_Run]:
    """Rebind the trainer's entry points for the duration of one run; restored on exit, even after errors."""
    run = _Run(medclip_args)
    root_logger = logging.getLogger()
    handlers_before = list(root_logger.handlers)
    # setup_logging also sets the level of every logger that exists (torch's too); restore them all afterwards.
    levels_before = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
                     if isinstance(logger, logging.Logger)}
    levels_before[""] = root_logger.level
    main = open_clip_train.main
    main.parse_args = run.parse_args
    main.create_model_and_transforms = run.create_model_and_transforms
    main.create_loss = run.create_loss
    main.get_data = run.get_data
    main.train_one_epoch = run.train_one_epoch
    open_clip_train.train.zero_shot_eval = _zero_shot_eval
    torch.nn.parallel.DistributedDataParallel = CpuFriendlyDDP
    try:
        yield run
    finally:
        main.parse_args = _ORIGINAL.parse_args
        main.create_model_and_transforms = _ORIGINAL.create_model_and_transforms
        main.create_loss = _ORIGINAL.create_loss
        main.get_data = _ORIGINAL.get_data
        main.train_one_epoch = _ORIGINAL.train_one_epoch
        open_clip_train.data.get_dataset_fn = _ORIGINAL.get_dataset_fn
        open_clip_train.train.zero_shot_eval = _ORIGINAL.zero_shot_eval
        torch.nn.parallel.DistributedDataParallel = _ORIGINAL.ddp
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


def run_trainer(trainer_argv: list[str], medclip_args):
    """`open_clip_train.main.main(trainer_argv)` with the MedCLIP entry points in place."""
    with patched_trainer(medclip_args) as run:
        open_clip_train.main.main(trainer_argv)
    return run.args


# ----------------------------------------------------------------------------------------------------------------
# Opt-in autoload: plain `python -m open_clip_train.main --model medclip-swin` finds our configs
# ----------------------------------------------------------------------------------------------------------------
AUTOLOAD_MODULE = "open_clip_medclip_autoload"
AUTOLOAD_PTH = "open_clip_medclip_autoload.pth"
_AUTOLOAD_SOURCE = '''"""Imports open_clip_medclip right after open_clip (written by `medclip train --install-autoload`).

A top-level module so start-up imports nothing heavy: a meta-path finder waits for `import open_clip`.
"""
import importlib.abc
import sys


class _AfterOpenClip(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "open_clip":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                import open_clip_medclip  # noqa: F401
            except Exception as exc:  # never break plain open_clip
                print(f"open_clip_medclip autoload failed: {exc!r}", file=sys.stderr)

        spec.loader.exec_module = exec_then_register
        return spec


if "open_clip" not in sys.modules:
    sys.meta_path.insert(0, _AfterOpenClip())
'''


def default_site_dir() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def install_autoload(site_dir: str | None = None) -> list[str]:
    """Write the `.pth` hook and its module into `site_dir` (default: this interpreter's site-packages)."""
    site_dir = site_dir or default_site_dir()
    module_path = os.path.join(site_dir, AUTOLOAD_MODULE + ".py")
    pth_path = os.path.join(site_dir, AUTOLOAD_PTH)
    with open(module_path, "w") as handle:
        handle.write(_AUTOLOAD_SOURCE)
    with open(pth_path, "w") as handle:
        handle.write(f"import {AUTOLOAD_MODULE}\n")
    return [pth_path, module_path]


def uninstall_autoload(site_dir: str | None = None) -> list[str]:
    """Remove what `install_autoload` wrote; returns the files removed."""
    site_dir = site_dir or default_site_dir()
    removed = []
    for name in (AUTOLOAD_PTH, AUTOLOAD_MODULE + ".py"):
        path = os.path.join(site_dir, name)
        if os.path.exists(path):
            os.remove(path)
            removed.append(path)
    return removed


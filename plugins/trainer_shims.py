"""Trainer shims for `open_clip_train` 3.3: what a MedCLIP run swaps in besides the model, loss and data.

Host names touched: `torch.nn.parallel.DistributedDataParallel` (CPU-friendly subclass), `open_clip_train.data.
tar_file_expander` (webdataset end-of-shard markers dropped, every model), the trainer's `torch` (atomic `save`),
`optim` (fused AdamW on CUDA), `setup_logging`, `get_latest_checkpoint`, `pt_load` (wrapped originals, installed by
`openclip_train`), `open_clip_train.precision.get_autocast`, `open_clip.transform` (the suite hook's preprocess).
"""
from __future__ import annotations

import glob
import logging
import os
import types
from collections.abc import Callable

import open_clip
import open_clip_train
import open_clip_train.data
import open_clip_train.precision
import torch

from open_clip_medclip import checkpoints

_ORIGINAL_TAR_FILE_EXPANDER: Callable | None = None  # set by install_webdataset_fix, after openclip_train's checks


def tar_file_expander_without_markers(data, *args, **kwargs):
    """webdataset's `tar_file_expander` minus the empty `{}` end-of-shard markers (webdataset >= 0.2.96), which
    open_clip_train 3.3's `group_by_keys_nothrow` reads as a file record (`KeyError: 'fname'`)."""
    for sample in _ORIGINAL_TAR_FILE_EXPANDER(data, *args, **kwargs):
        if sample:
            yield sample


def install_webdataset_fix() -> None:
    """Idempotent; `open_clip_train.data.tarfile_to_samples_nothrow` looks the expander up at call time."""
    global _ORIGINAL_TAR_FILE_EXPANDER
    if open_clip_train.data.tar_file_expander is not tar_file_expander_without_markers:
        _ORIGINAL_TAR_FILE_EXPANDER = open_clip_train.data.tar_file_expander
    open_clip_train.data.tar_file_expander = tar_file_expander_without_markers


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


def suite_zero_shot_hook(suites: list[str]):
    """A trainer zero-shot hook evaluating built suites, following open_clip_train's --zeroshot-frequency rule."""

    def hook(model, data, epoch, args, tokenizer=None) -> dict[str, float]:
        frequency = args.zeroshot_frequency
        if not frequency or (epoch % frequency != 0 and epoch != args.epochs):
            return {}

        from open_clip.transform import PreprocessCfg, image_transform_v2

        from open_clip_medclip.eval.zeroshot import zero_shot_metrics

        preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        tokenizer = tokenizer or open_clip.get_tokenizer(args.model)
        autocast = open_clip_train.precision.get_autocast(args.precision, device_type=str(args.device).split(":")[0])
        metrics: dict[str, float] = {}
        for suite in suites:
            metrics.update(zero_shot_metrics(model, suite, tokenizer, preprocess, args.device, autocast=autocast))
        return metrics

    return hook

"""Host glue for `open_clip_train`: namespace patching, the one job of this module (plugins/README.md has the why).

The trainer has no plugin hooks, so both front doors run the unmodified `open_clip_train.main.main` with names
rebound in its module namespace: `parse_args`, `create_model_and_transforms` (label passthrough, MedCLIP augmentation
via `open_clip.model.get_model_preprocess_cfg`), `create_loss`, `get_data` (with `open_clip_train.data.get_dataset_fn`
during the call), `train_one_epoch`, `setup_logging`, `get_latest_checkpoint`, `pt_load`, `torch`, `optim`; globally
`open_clip_train.train.zero_shot_eval` and `torch.nn.parallel.DistributedDataParallel`; all restored after the run.
`medclip train` installs them for one run (`patched_trainer`), plain `open_clip_train.main` through the opt-in
autoload (`host_parse_args`). Every attribute used is checked at import (`check_host`).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
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
from open_clip import model
from open_clip_medclip.plugins import HostMismatchError, host_args, missing_attributes, require_host  # noqa: F401
from open_clip_medclip.plugins.label_passthrough import enable_label_passthrough
from open_clip_medclip.plugins.openclip_models import enable_padding_free_text
from open_clip_medclip.plugins.trainer_shims import (
    CpuFriendlyDDP,
    TrainerOptim,
    TrainerTorch,
    _get_latest_checkpoint,
    _OriginalDDP,
    _pt_load,
    _setup_logging,
    install_webdataset_fix,
    seed_epoch,
    suite_zero_shot_hook,
)

from open_clip_medclip.augment import medclip_train_transform
from open_clip_medclip.loss import create_medclip_loss
from open_clip_medclip.options import MedclipOptions
from open_clip_medclip.streams.faults import ShardSourceError
from open_clip_medclip.streams.plan import check_shards_exist
from open_clip_medclip.streams.stages import get_medclip_wds_dataset
from open_clip_medclip.text_width import is_medclip_model, text_pooler_type
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
install_webdataset_fix()  # every model (see the module docstring)


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
    parse_args=getattr(open_clip_train.main.parse_args, "__wrapped__", open_clip_train.main.parse_args),
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
        data = args.train_data or args.val_data
        if self.streams and host_args.is_tar_data(data, getattr(args, "dataset_type", "auto")):
            host_args.preflight(args, "medclip train")
        return args

    def create_model_and_transforms(self, model_name, *pos, **kwargs):
        clip_model, preprocess_train, preprocess_val = _ORIGINAL.create_model_and_transforms(model_name, *pos, **kwargs)
        inner = clip_model.module if hasattr(clip_model, "module") else clip_model
        if self.options.padding_free:
            enable_padding_free_text(inner)
            logging.info("open_clip_medclip: %s text tower runs padding-free (--medclip-padding-free)", model_name)
        if not self.streams:
            return clip_model, preprocess_train, preprocess_val
        enable_label_passthrough(inner)
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
            if host_args.is_tar_data(data_path, dataset_type):
                return get_medclip_wds_dataset
            return _ORIGINAL.get_dataset_fn(data_path, dataset_type)

        open_clip_train.data.get_dataset_fn = dataset_fn
        # a data refusal (e.g. no sentence bank) is one line on the host front door too, not the trainer's traceback
        refusals = host_args.refused_on_one_line() if self.front_door == "host" else contextlib.nullcontext()
        try:
            with refusals:
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
            host_args.host_refusal(line, ShardSourceError.exit_code)
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
    happened (`args`, `host_result`, `host_messages`, `epochs_run`, `steps`, `torch.saved`). `--medclip-zeroshot-suite`
    suites are evaluated through a zero-shot hook registered for the run."""
    hook = register_zero_shot_eval(suite_zero_shot_hook(options.zeroshot_suite)) if options.zeroshot_suite else None
    try:
        with patched_trainer(options) as run, contextlib.redirect_stdout(_ErrorLines(sys.stdout, run.host_messages)):
            run.host_result = open_clip_train.main.main(trainer_argv)
    finally:
        if hook is not None:
            unregister_zero_shot_eval(hook)
    return run


# Plain `python -m open_clip_train.main` (autoload): decide per run from --model and --train-data
_HOST_INSTALLED: dict[int, tuple[dict, dict, ZeroShotHook | None]] = {}


def host_parse_args(original: Callable, argv, namespace: dict):
    """`parse_args` of a plain open_clip_train run with the autoload: `--medclip-*` flags are accepted; MedCLIP
    models get the MedCLIP entry points in `namespace` (the calling trainer module), other models none."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not all(name in namespace for name in _NAMESPACE_NAMES):
        return original(argv)
    previous = _HOST_INSTALLED.pop(id(namespace), None)
    if previous is not None:  # an earlier run in this process
        _restore(previous[0], previous[1])
        if previous[2] is not None:
            unregister_zero_shot_eval(previous[2])
    parser = host_args.medclip_options_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print()
        return original(argv)
    parsed, rest = parser.parse_known_args(argv)
    options = MedclipOptions.from_args(parsed)
    args = original(rest)
    if not is_medclip_model(args.model):
        given = sorted({a.split("=")[0] for a in argv if a.startswith("--medclip-")})
        if given:
            host_args.host_refusal(f"{', '.join(given)}: for MedCLIP models only; --model {args.model} is not one "
                         "(open_clip_medclip autoload)")
        return args
    if options.padding_free and text_pooler_type(args.model) != "medclip_masked_pooler":
        host_args.host_refusal(f"--medclip-padding-free: --model {args.model} averages padding in its text pooler "
                     "(medclip_pooler); padding-free needs medclip_masked_pooler (the medclip-*-masked models)")
    options.store(args)
    if host_args.is_tar_data(args.train_data or args.val_data, getattr(args, "dataset_type", "auto")):
        with host_args.refused_on_one_line():  # before the first shard is opened: "no such file", with the pattern
            check_shards_exist("--train-data", args.train_data)
            check_shards_exist("--val-data", args.val_data)
    with host_args.refused_on_one_line():  # an unreadable first shard (server down): exit 3, not silently plain data
        labelled, url = host_args.data_has_medclip_labels(args)
    if labelled:
        with host_args.refused_on_one_line():
            host_args.preflight(args, "open_clip_train.main")
    note = None if labelled else (f"first shard {url}" if url else f"--train-data {args.train_data}")
    run = _Run(options, streams=labelled, data_note=note, front_door="host")
    run.args = args
    hook = None
    if labelled and options.zeroshot_suite:
        hook = register_zero_shot_eval(suite_zero_shot_hook(options.zeroshot_suite))
    saved = _install(namespace, run.namespace_replacements(namespace, with_parse_args=False))
    _HOST_INSTALLED[id(namespace)] = (namespace, saved, hook)
    return args



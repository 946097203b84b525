"""`medclip train` / `python -m open_clip_medclip.train`: MedCLIP training inside OpenCLIP's own trainer.

Accepts every `open_clip_train.main` flag plus the `--medclip-*` flags below, then runs the unmodified
`open_clip_train.main.main` (DDP, `--accum-freq`, precision, `--resume`, checkpoints, tensorboard/wandb) with the
semantic matching loss and label-aware streams plugged in by `open_clip_medclip.plugins.openclip_train`.

    medclip train --model medclip-swin --train-data 'shards/train-{000000..000099}.tar' --batch-size 100 ...
    torchrun --nproc_per_node 2 -m open_clip_medclip.train -- --model medclip-tiny ... --dist-backend gloo

Checkpoints are plain OpenCLIP checkpoints: `open_clip.create_model(name, pretrained='epoch_N.pt')` loads them;
they are written atomically and `--resume latest` skips unreadable ones (`open_clip_medclip.checkpoints`).

`medclip train --install-autoload` (opt-in) makes OpenCLIP's own `python -m open_clip_train.main --model medclip-*`
(and `torchrun -m open_clip_train.main -- ...`) do the same, with the same `--medclip-*` flags, whenever the data
are MedCLIP shards (see `open_clip_medclip.autoload`).

Mistakes are one line (`medclip train: ...`, exit 2 through the `medclip` entry point): an unknown flag with close
matches and a short usage, an unknown model name with close matches, `--device cuda` on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from open_clip_medclip.errors import UserError, WorkNotDone, did_you_mean, resolve_device
from open_clip_medclip.labels import TRAINING_POLICIES
from open_clip_medclip.loss import LABEL_SIMILARITIES, LOSS_KINDS

# Defaults of the --medclip-shard-* options, sized for object stores: a failing shard is read 5 times within
# ~15 s of backoff (1+2+4+8), a read stalled for 30 s fails, and a dead source stops the run within about a minute.
SHARD_FAILURE_DEFAULTS = {"retries": 4, "timeout": 30.0, "backoff": 1.0, "max_failures": 3, "max_skipped": 0.05}


def add_medclip_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `--medclip-*` flags, shared by `medclip train` and plain `open_clip_train.main` with the autoload."""
    group = parser.add_argument_group("MedCLIP options")
    group.add_argument(
        "--medclip-loss",
        choices=LOSS_KINDS,
        default="soft",
        help="soft: semantic matching loss (label-similarity targets); clip: plain InfoNCE on the same streams",
    )
    group.add_argument(
        "--medclip-label-similarity",
        choices=LABEL_SIMILARITIES,
        default="dot",
        help="image-label × text-label similarity: dot (MedCLIP's code, default) or cosine (the paper's wording)",
    )
    group.add_argument(
        "--medclip-label-temperature",
        type=float,
        default=1.0,
        help="targets = softmax(similarity / temperature); MedCLIP uses 1",
    )
    group.add_argument(
        "--medclip-uncertain",
        choices=TRAINING_POLICIES,
        default="zeros",
        help="how uncertain (-1) labels count for pairing and targets; blank is always 0 (MedCLIP: zeros)",
    )
    group.add_argument(
        "--medclip-bank-data",
        default=None,
        help="extra shards (brace/:: notation) whose sentences fill the sentence bank without being trained on "
        "as images; text-only and paired shards in --train-data always fill it",
    )
    group.add_argument(
        "--medclip-bank-kinds",
        default="text,paired",
        type=lambda s: tuple(k.strip() for k in s.split(",") if k.strip()),
        help="sample kinds whose sentences go into the bank (comma-separated; default text,paired)",
    )
    group.add_argument(
        "--medclip-index",
        default=None,
        metavar="LOCATION[::LOCATION...]",
        help="shard index location per --train-data group (default: the folder of each group's shards)",
    )
    group.add_argument(
        "--medclip-bank-index",
        default=None,
        metavar="LOCATION[::LOCATION...]",
        help="shard index location per --medclip-bank-data group (default: beside those shards)",
    )
    group.add_argument(
        "--medclip-val-own-bank",
        action="store_true",
        help="validation data draw texts from their own sentence bank instead of the training bank",
    )
    group.add_argument(
        "--medclip-text-multiple",
        default="auto",
        metavar="auto|N",
        help="trim each batch's texts to its longest text rounded up to a multiple of N (0: keep the tokenizer's "
        "width; auto: from the model's text tower)",
    )
    group.add_argument(
        "--medclip-text-bucket",
        type=int,
        default=0,
        metavar="N",
        help="length bucketing (training stream, default 0: off): sort N batches' worth of samples by text length, "
        "cut them into batches, shuffle the batch order; batches get narrower (less text-tower work) but each "
        "batch's negatives are sentences of similar length. The epoch's samples and batch count do not change; "
        "each dataloader worker holds N x batch size decoded samples",
    )
    group.add_argument(
        "--medclip-padding-free",
        action="store_true",
        help="run the text tower padding-free: only real tokens pass BERT's layers (same embeddings, less work); "
        "models with medclip_masked_pooler only (medclip-*-masked), as the reference pooler averages padding",
    )
    group.add_argument(
        "--medclip-augment",
        choices=("medclip", "openclip"),
        default="medclip",
        help="training image transform: MedCLIP's augmentation (default) or OpenCLIP's (--aug-cfg)",
    )
    group.add_argument(
        "--medclip-zeroshot-suite",
        action="append",
        default=None,
        metavar="SUITE",
        help="built evaluation suite (folder from `medclip eval build-suite`, repeatable) evaluated zero-shot on the "
        "master rank every --zeroshot-frequency epochs and at the end; metrics go to results.jsonl and tb/wandb",
    )
    # Failing shard sources (http(s), pipe:, fsspec URLs): bounded retries, then a clean stop (streams.ShardFailurePolicy)
    shard_defaults = SHARD_FAILURE_DEFAULTS
    group.add_argument(
        "--medclip-shard-retries", type=int, default=shard_defaults["retries"], metavar="N",
        help=f"re-reads of a remote shard whose read fails (default {shard_defaults['retries']}), waiting "
        "--medclip-shard-backoff, then 2x, 4x ... seconds; samples already delivered are not repeated",
    )
    group.add_argument(
        "--medclip-shard-timeout", type=float, default=shard_defaults["timeout"], metavar="SECONDS",
        help=f"an http(s) or pipe: shard read that gets no byte for this long fails (the pipe: command is killed; default {shard_defaults['timeout']:g})",
    )
    group.add_argument(
        "--medclip-shard-backoff", type=float, default=shard_defaults["backoff"], metavar="SECONDS",
        help=f"wait before the first retry, doubled at each next one, at most 60 (default {shard_defaults['backoff']:g})",
    )
    group.add_argument(
        "--medclip-shard-max-failures", type=int, default=shard_defaults["max_failures"], metavar="N",
        help=f"stop the run when N remote shards in a row fail after their retries (default "
        f"{shard_defaults['max_failures']}); exit code 3, checkpoints kept, continue with --resume latest",
    )
    group.add_argument(
        "--medclip-shard-max-skipped", type=float, default=shard_defaults["max_skipped"], metavar="FRACTION",
        help=f"stop the run when a loader worker skips more than this fraction of its shards in an epoch (default "
        f"{shard_defaults['max_skipped']:g}; with few shards per worker, one failed shard stops it)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """`medclip train`'s own flags; everything else goes to open_clip_train's own parser."""
    parser = argparse.ArgumentParser(
        prog="medclip train",
        description="Train MedCLIP inside open_clip_train. All open_clip_train flags are accepted as well "
        "(see the second help section).",
        add_help=False,
        allow_abbrev=False,
    )
    add_medclip_options(parser)
    group = parser.add_argument_group("autoload (plain `python -m open_clip_train.main` trains MedCLIP too)")
    group.add_argument(
        "--install-autoload",
        action="store_true",
        help="write a .pth hook so plain `python -m open_clip_train.main --model medclip-*` (and torchrun) train "
        "MedCLIP with the semantic matching loss, and open_clip/clip_benchmark find our models",
    )
    group.add_argument("--uninstall-autoload", action="store_true", help="remove the .pth hook")
    group.add_argument("--autoload-site-dir", default=None, help="where the hook goes (default: site-packages)")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and open_clip_train's")
    return parser


SHORT_USAGE = (
    "usage: medclip train --model NAME --train-data SHARDS [open_clip_train options] [--medclip-* options]\n"
    "       medclip train --install-autoload | --uninstall-autoload [--autoload-site-dir DIR]\n"
    "Run 'medclip train --help' for every option."
)


class _ParserError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


def _check_trainer_flags(trainer_argv: list[str], medclip_parser: argparse.ArgumentParser) -> None:
    """Run open_clip_train's own parser on the flags; a mistake is one line with close matches and a short
    usage (its own error would print 55 lines of open_clip_train usage)."""
    from open_clip_medclip.plugins.openclip_train import trainer_parse_args as parse_args

    original_error = argparse.ArgumentParser.error

    def error(self, message):
        raise _ParserError(self, message)

    argparse.ArgumentParser.error = error
    try:
        parse_args(trainer_argv)
    except _ParserError as exc:
        message = str(exc)
        known = [*exc.parser._option_string_actions, *medclip_parser._option_string_actions]
        if message.startswith("unrecognized arguments:"):
            hints = []
            for token in message.split(":", 1)[1].split():
                if token.startswith("-"):
                    hints.append(f"{token}{did_you_mean(token.split('=')[0], known)}")
            message = "unrecognized arguments: " + ", ".join(hints) if hints else message
        print(SHORT_USAGE, file=sys.stderr)
        raise UserError(message) from None
    finally:
        argparse.ArgumentParser.error = original_error


def _flag_value(argv: list[str], flag: str) -> str | None:
    value = None
    for index, token in enumerate(argv):
        if token == flag and index + 1 < len(argv):
            value = argv[index + 1]
        elif token.startswith(flag + "="):
            value = token.split("=", 1)[1]
    return value


def _check_model_name(name: str | None) -> None:
    if name:
        from open_clip_medclip.model_names import check_model_name

        check_model_name(name)


def _print_help(parser: argparse.ArgumentParser) -> None:
    parser.print_help()
    print("\nopen_clip_train options:\n")
    from open_clip_medclip.plugins.openclip_train import trainer_parse_args as parse_args

    try:
        parse_args(["--help"])
    except SystemExit:
        pass


class TrainingNotDone(WorkNotDone):
    """The trainer ran but did not do the work asked for (it refused, trained no step, saved no checkpoint)."""


def check_work_done(run) -> None:
    """Raise `TrainingNotDone` (one line, exit 1) when open_clip_train refused to run, trained zero steps, or
    wrote no checkpoint although saving was asked for (`--logs` set); evaluation-only runs train nothing."""
    args = run.args
    if run.host_result is not None and run.host_result != 0:
        said = "; ".join(run.host_messages)
        if "Experiment already exists" in said and args is not None:
            raise TrainingNotDone(
                f"open_clip_train refused to run: experiment {args.name!r} already exists in "
                f"{os.path.join(args.logs, args.name)}; pass a new --name, or --resume latest to continue it")
        raise TrainingNotDone(f"open_clip_train refused to run: {said or f'it returned {run.host_result}'}")
    if args is None or not getattr(args, "train_data", None):
        return
    if not run.steps:
        where = f" (resumed from {args.resume})" if getattr(args, "resume", None) else ""
        what = (f"no epoch was left to train: --epochs {args.epochs}{where}" if not run.epochs_run else
                f"{run.epochs_run} epoch(s) gave no batch")
        raise TrainingNotDone(f"0 steps trained: {what}")
    if getattr(args, "save_logs", False) and not run.torch.saved:
        raise TrainingNotDone(f"0 checkpoints written to {getattr(args, 'checkpoint_path', args.logs)} although "
                              "saving was asked for (--logs)")


def _summary(args) -> dict:
    from open_clip_medclip.checkpoints import unreadable_reason

    log_dir = os.path.join(args.logs, args.name) if getattr(args, "logs", None) and args.name else None
    summary = {"log_dir": log_dir, "checkpoints": [], "throughput": None}
    if log_dir:  # only checkpoints that load (a 0-byte file that --resume latest skipped is not one)
        summary["checkpoints"] = sorted(path for path in glob.glob(os.path.join(log_dir, "checkpoints", "*.pt"))
                                        if unreadable_reason(path) is None)
        throughput = os.path.join(log_dir, "medclip_throughput.jsonl")
        if os.path.exists(throughput):
            with open(throughput) as handle:
                lines = [json.loads(line) for line in handle if line.strip()]
            summary["throughput"] = lines[-1] if lines else None
    return summary


def suite_zero_shot_hook(suites: list[str]):
    """A trainer zero-shot hook evaluating built suites, following open_clip_train's --zeroshot-frequency rule."""

    def hook(model, data, epoch, args, tokenizer=None) -> dict[str, float]:
        frequency = args.zeroshot_frequency
        if not frequency or (epoch % frequency != 0 and epoch != args.epochs):
            return {}
        import open_clip

        from open_clip_medclip.eval.zeroshot import zero_shot_metrics
        from open_clip_medclip.plugins.openclip_train import eval_preprocess, get_autocast

        preprocess = eval_preprocess(model)
        tokenizer = tokenizer or open_clip.get_tokenizer(args.model)
        device_type = str(args.device).split(":")[0]
        metrics: dict[str, float] = {}
        for suite in suites:
            metrics.update(zero_shot_metrics(model, suite, tokenizer, preprocess, args.device,
                                             autocast=lambda: get_autocast(args.precision, device_type=device_type)()))
        return metrics

    return hook


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    parser = build_parser()
    medclip_args, trainer_argv = parser.parse_known_args(argv)
    if medclip_args.help:
        _print_help(parser)
        return 0

    if medclip_args.install_autoload or medclip_args.uninstall_autoload:
        from open_clip_medclip import autoload

        if medclip_args.install_autoload:
            files = autoload.install_autoload(medclip_args.autoload_site_dir)
            print(json.dumps({"installed": files}))
        else:
            files = autoload.uninstall_autoload(medclip_args.autoload_site_dir)
            print(json.dumps({"removed": files}))
        return 0

    _check_trainer_flags(trainer_argv, parser)
    device = _flag_value(trainer_argv, "--device")
    if device is not None:
        resolve_device(device)  # the device policy of every command: a missing accelerator is a user error
    import open_clip_medclip  # noqa: F401  (registers the MedCLIP model configs)

    _check_model_name(_flag_value(trainer_argv, "--model") or "RN50")
    from open_clip_medclip.plugins import openclip_train

    for key in ("install_autoload", "uninstall_autoload", "autoload_site_dir", "help"):
        delattr(medclip_args, key)
    hook = suite_zero_shot_hook(medclip_args.medclip_zeroshot_suite) if medclip_args.medclip_zeroshot_suite else None
    if hook is not None:
        openclip_train.register_zero_shot_eval(hook)
    try:
        run = openclip_train.run_trainer(trainer_argv, medclip_args)
    finally:
        if hook is not None:
            openclip_train.unregister_zero_shot_eval(hook)
    args = run.args
    check_work_done(run)
    if args is not None and getattr(args, "rank", 0) == 0 and getattr(args, "train_data", None):
        summary = _summary(args)
        print(json.dumps(summary))
        throughput = summary["throughput"] or {}
        print(
            f"Trained {args.model} with the {'semantic matching' if args.medclip_loss == 'soft' else 'InfoNCE'} loss "
            f"for {args.epochs} epoch(s); logs in {summary['log_dir']}, {len(summary['checkpoints'])} checkpoint(s). "
            f"Last epoch: {throughput.get('samples_per_second', 0):.1f} samples/s, "
            f"{100 * throughput.get('data_wait_fraction', 0):.1f}% of step time waiting for data."
        )
    return 0


if __name__ == "__main__":
    from open_clip_medclip.cli import run_command

    raise SystemExit(run_command("train", lambda: main()))

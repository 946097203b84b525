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

from open_clip_medclip import hosted
from open_clip_medclip.errors import UserError, WorkNotDone, did_you_mean, resolve_device
from open_clip_medclip.options import MedclipOptions


def build_parser() -> argparse.ArgumentParser:
    """`medclip train`'s own flags; everything else goes to open_clip_train's own parser."""
    parser = argparse.ArgumentParser(
        prog="medclip train",
        description="Train MedCLIP inside open_clip_train. All open_clip_train flags are accepted as well "
        "(see the second help section).",
        add_help=False,
        allow_abbrev=False,
    )
    MedclipOptions.add_arguments(parser)
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


def _check_trainer_flags(trainer_argv: list[str], medclip_parser: argparse.ArgumentParser, parse_args) -> None:
    """Run open_clip_train's own parser (`parse_args`) on the flags; a mistake is one line with close matches and a
    short usage (its own error would print 55 lines of open_clip_train usage)."""
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    parser = build_parser()
    medclip_args, trainer_argv = parser.parse_known_args(argv)
    if medclip_args.help:
        parser.print_help()
        print("\nopen_clip_train options:\n")
        try:
            hosted.piece("trainer_parse_args")(["--help"])
        except SystemExit:
            pass
        return 0

    if medclip_args.install_autoload or medclip_args.uninstall_autoload:
        from open_clip_medclip import autoload

        if medclip_args.install_autoload:
            print(json.dumps({"installed": autoload.install_autoload(medclip_args.autoload_site_dir)}))
        else:
            print(json.dumps({"removed": autoload.uninstall_autoload(medclip_args.autoload_site_dir)}))
        return 0

    _check_trainer_flags(trainer_argv, parser, hosted.piece("trainer_parse_args"))
    device = _flag_value(trainer_argv, "--device")
    if device is not None:
        resolve_device(device)  # the device policy of every command: a missing accelerator is a user error
    import open_clip_medclip  # noqa: F401  (registers the MedCLIP model configs)
    from open_clip_medclip.model_names import check_model_name

    check_model_name(_flag_value(trainer_argv, "--model") or "RN50")

    options = MedclipOptions.from_args(medclip_args)
    run = hosted.piece("run_trainer")(trainer_argv, options)
    args = run.args
    check_work_done(run)
    if args is not None and getattr(args, "rank", 0) == 0 and getattr(args, "train_data", None):
        summary = _summary(args)
        print(json.dumps(summary))
        throughput = summary["throughput"] or {}
        print(
            f"Trained {args.model} with the {'semantic matching' if options.loss == 'soft' else 'InfoNCE'} loss "
            f"for {args.epochs} epoch(s); logs in {summary['log_dir']}, {len(summary['checkpoints'])} checkpoint(s). "
            f"Last epoch: {throughput.get('samples_per_second', 0):.1f} samples/s, "
            f"{100 * throughput.get('data_wait_fraction', 0):.1f}% of step time waiting for data."
        )
    return 0


if __name__ == "__main__":
    from open_clip_medclip.cli import run_command

    raise SystemExit(run_command("train", lambda: main()))

"""`medclip eval {zeroshot,retrieval,linear-probe,finetune,build-suite}`: thin commands over the eval library.

Each evaluation writes, per suite, `<out>/<suite>/<task>.json` (all metrics with bootstrap CIs, prompts,
manifest hash), a markdown table and PNGs (t-SNE, ROC, confusion matrix), and prints the table plus a short
summary.

Failing safely: the suites are opened and the device is checked before the model loads; a user error (a missing
image, an unknown model name, a CUDA device this machine lacks) is one line and exit code 2 (through
`medclip eval` or `python -m open_clip_medclip.eval.cli`). A suite's outputs are written to a hidden staging folder
and replace the previous ones only once all of them are written, so a failed or interrupted run never overwrites a
previous run's results; suites that finished keep their new results if a later suite fails, and the combined
`<out>/<task>.md` is only rewritten when every suite succeeded. Staging folders left by a killed run are removed
by the next run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from open_clip_medclip.atomic import pid_alive, write_text
from open_clip_medclip.errors import UserError, resolve_device
from open_clip_medclip.eval import plots
from open_clip_medclip.eval.metrics import DEFAULT_BOOTSTRAP, RETRIEVAL_KS, markdown_table, softmax
from open_clip_medclip.eval.suites.build import build_suite
from open_clip_medclip.eval.suites.definitions import SuiteError, available_suites, csv_definition, suites_root
from open_clip_medclip.eval.suites.export import CUSTOM_TEMPLATES_JSON, TEMPLATES_TXT
from open_clip_medclip.eval.suites.load import load_suite

TABLE_COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _common(parser: argparse.ArgumentParser, seed_help: str = "bootstrap (and probe) seed") -> None:
    parser.add_argument("--model", required=True, help="OpenCLIP model name, e.g. medclip-swin or medclip-tiny")
    parser.add_argument("--pretrained", default=None, help="checkpoint file/dir or tag; omit or 'none' for random weights")
    parser.add_argument("--suite", nargs="+", required=True,
                        help="built suite folder, suite CSV, or a name built under $MEDCLIP_SUITES_ROOT "
                             f"(default {suites_root()})")
    parser.add_argument("--out", default="medclip_eval", help="output folder (one subfolder per suite)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu; a missing one is an error)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples for 95%% CIs (0 = none)")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N test images (smoke runs)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _plots(prefix: Path, title: str, features, targets, scores, classes, confusion, multilabel: bool) -> list[str]:
    """t-SNE (unless `features` is None), ROC and, given a confusion matrix, the matrix; the paths written."""
    written = []
    path = None if features is None else plots.tsne_png(features, targets, classes, f"{prefix}_tsne.png",
                                                        title=f"{title}: t-SNE")
    if path:
        written.append(str(path))
    probabilities = scores if multilabel else softmax(scores)
    written.append(str(plots.roc_png(targets, probabilities, classes, f"{prefix}_roc.png", title=f"{title}: ROC")))
    if confusion is not None:
        written.append(str(plots.confusion_png(confusion, classes, f"{prefix}_confusion.png", title=f"{title}: confusion")))
    return written


STAGING_MARK = ".tmp-"


def clean_stale_staging(out: Path) -> list[Path]:
    """Remove staging folders (`.<suite>.tmp-<pid>-*`) that a killed run left in `out`; returns those removed."""
    removed = []
    for path in out.glob(f".*{STAGING_MARK}*") if out.is_dir() else []:
        try:
            pid = int(path.name.split(STAGING_MARK, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if path.is_dir() and (pid == os.getpid() or not pid_alive(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staged_outputs(out: Path, name: str):
    """Yield an empty staging folder; when the block succeeds its files replace those of `out/name` (each by an
    atomic rename), otherwise it is removed and `out/name` is left as it was."""
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}{STAGING_MARK}{os.getpid()}-", dir=out))
    try:
        yield stage
        final = out / name
        final.mkdir(parents=True, exist_ok=True)
        for path in sorted(stage.iterdir()):
            os.replace(path, final / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _finish(task: str, rows: list[tuple[str, dict]], columns, out: Path, failures: list[str],
            table: str | None = None) -> int:
    """Print the table (`markdown_table(rows, columns)` unless given); write `<out>/<task>.md` only when every suite
    succeeded; a failure is a UserError."""
    table = markdown_table(rows, columns) if table is None else table
    if rows:
        print(table)
    extras = "" if task == "retrieval" else " (+ PNGs)"
    if failures:
        if rows:
            print(f"\n{task}: {len(rows)} suite(s) evaluated, results in {out}/<suite>/{task}.json{extras}; "
                  f"{out}/{task}.md left as it was because {len(failures)} suite(s) failed.")
        raise UserError("; ".join(failures))
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{task}.md", table + "\n")
    print(f"\n{task}: {len(rows)} suite(s) evaluated, results in {out}/<suite>/{task}.json{extras} and {out}/{task}.md; "
          f"values are point estimates with bootstrap 95% CIs in brackets.")
    return 0


def _failure(name: str, exc: Exception) -> str:
    message = str(exc)
    return message if message.startswith(str(name)) else f"{name}: {message}"


def _open_suites(args: argparse.Namespace) -> list:
    """Every --suite opened (manifests read) before the model loads; the first bad one is a UserError."""
    suites = []
    for name in args.suite:
        try:
            suites.append((name, load_suite(name)))
        except (SuiteError, FileNotFoundError, ValueError) as exc:
            raise UserError(_failure(name, exc)) from exc
    return suites


def _each_suite(args: argparse.Namespace, suites: list, evaluate, failures: list[str]):
    """(suite, result, staging folder) for each suite that evaluates; the staging folder's files replace
    `<out>/<suite>/` when the caller's loop body finishes. A failing suite is added to `failures` (its previous
    outputs untouched) and the others still run."""
    clean_stale_staging(Path(args.out))
    for name, suite in suites:
        try:
            result = evaluate(suite)
        except (SuiteError, FileNotFoundError, ValueError) as exc:
            failures.append(_failure(name, exc))
            continue
        with staged_outputs(Path(args.out), suite.name) as stage:
            yield suite, result, stage


def _final_paths(paths: list[str], folder: Path) -> list[str]:
    """Where staged files will be once the staging folder is committed."""
    return [str(folder / Path(p).name) for p in paths]


def eval_options(args: argparse.Namespace):
    """The flags as the one options object (`eval.options.EvalOptions`; a flag a subcommand lacks keeps its default)."""
    from dataclasses import fields

    from open_clip_medclip.eval.options import EvalOptions

    given = {f.name: getattr(args, f.name) for f in fields(EvalOptions) if hasattr(args, f.name)}
    if given.get("prompts_per_class", "default") is None:
        given["prompts_per_class"] = "default"
    if hasattr(args, "k"):
        given["ks"] = args.k
    return EvalOptions(**given, progress=not args.quiet)


def _evaluated(args: argparse.Namespace, run, failures: list[str]):
    """Suites first, then the device policy, then the model (cheap checks fail before the model loads); then
    `_each_suite` over `run(model, suite, tokenizer, preprocess, device, options)`."""
    suites = _open_suites(args)
    device = resolve_device(args.device)
    from open_clip_medclip.eval.embed import load_model

    model, preprocess, tokenizer = load_model(args.model, args.pretrained, device)
    options = eval_options(args)
    return _each_suite(args, suites, lambda suite: run(model, suite, tokenizer, preprocess, device, options), failures)


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from open_clip_medclip.eval.zeroshot import run_zeroshot

    rows, failures = [], []
    for suite, result, stage in _evaluated(args, run_zeroshot, failures):
        folder = Path(args.out) / suite.name
        metrics = {**result.metrics, "model": args.model, "pretrained": args.pretrained}
        columns = ("macro_auc",) if suite.multilabel else TABLE_COLUMNS
        (stage / "zeroshot.md").write_text(markdown_table([(suite.name, metrics)], columns) + "\n", encoding="utf-8")
        if not args.no_plots:
            metrics["plots"] = _final_paths(
                _plots(stage / "zeroshot", suite.name, result.features, result.targets, result.scores, suite.classes,
                       metrics.get("confusion_matrix"), suite.multilabel), folder)
        _write_json(stage / "zeroshot.json", metrics)
        if metrics["num_excluded_corrupt"]:
            print(f"{suite.name}: {metrics['num_excluded_corrupt']} corrupt image(s) excluded "
                  f"(listed under 'excluded_corrupt' in {folder / 'zeroshot.json'})", file=sys.stderr)
        rows.append((suite.name, metrics))
    return _finish("zeroshot", rows, TABLE_COLUMNS, Path(args.out), failures)


def cmd_retrieval(args: argparse.Namespace) -> int:
    from open_clip_medclip.eval.retrieval import run_retrieval

    rows, failures = [], []
    for suite, result, stage in _evaluated(args, run_retrieval, failures):
        metrics = result.metrics
        metrics.update({"model": args.model, "pretrained": args.pretrained})
        _write_json(stage / "retrieval.json", metrics)
        rows.append((suite.name, metrics["image_to_text"]))
    columns = [f"precision@{k}" for k in args.k] + [f"recall@{k}" for k in args.k]
    return _finish("retrieval", rows, columns, Path(args.out), failures)


def cmd_linear_probe(args: argparse.Namespace) -> int:
    from open_clip_medclip.eval.linear_probe import run_linear_probe

    def run(model, suite, _tokenizer, preprocess, device, options):
        return run_linear_probe(model, suite, preprocess, device, options)

    rows, failures = [], []
    for suite, result, stage in _evaluated(args, run, failures):
        folder, metrics = Path(args.out) / suite.name, result.metrics
        metrics.update({"model": args.model, "pretrained": args.pretrained})
        if not args.no_plots:
            metrics["plots"] = _final_paths(
                _plots(stage / "linear_probe", f"{suite.name} (probe)", result.features, result.targets,
                       np.maximum(result.scores, -1e9), suite.classes, metrics["confusion_matrix"], False), folder)
        _write_json(stage / "linear_probe.json", metrics)
        rows.append((suite.name, metrics))
    return _finish("linear_probe", rows, TABLE_COLUMNS, Path(args.out), failures)


def cmd_finetune(args: argparse.Namespace) -> int:
    from open_clip_medclip.demo_results import environment
    from open_clip_medclip.eval.finetune import RUNS_FOLDER, run_finetune

    options = eval_options(args)
    options.check()
    suites = _open_suites(args)
    device = resolve_device(args.device)
    rows, tables, failures = [], [], []

    def evaluate(suite):
        return run_finetune(suite, args.model, args.init, args.pretrained, options, device,
                            Path(args.out) / suite.name / RUNS_FOLDER, restart=args.restart)

    for suite, result, stage in _each_suite(args, suites, evaluate, failures):
        summary = result.metrics
        summary["environment"] = {**environment(), "device": str(device)}
        if not args.no_plots:
            summary["plots"] = _final_paths(_finetune_plots(stage, suite, summary), Path(args.out) / suite.name)
        (stage / "finetune.md").write_text(summary["table"] + "\n", encoding="utf-8")
        _write_json(stage / "finetune.json", summary)
        tables.append(f"{suite.name} ({summary['num_test']} test images, {len(summary['seeds'])} seed(s); "
                      f"mean over seeds, bootstrap 95% CIs over test images and seeds):\n\n{summary['table']}")
        rows.append((suite.name, summary))
    if rows:
        print(f"\nClassifiers: {Path(args.out)}/<suite>/{RUNS_FOLDER}/<start>-seed<k>/classifier.safetensors "
              "(load with open_clip_medclip.eval.classifier.load_classifier).")
    return _finish("finetune", rows, (), Path(args.out), failures, table="\n\n".join(tables))


def _finetune_plots(stage: Path, suite, summary: dict) -> list[str]:
    """ROC and confusion matrix of each start's first seed."""
    written = []
    for start, row in summary["starts"].items():
        first = row["runs"][0]
        logits = np.asarray(first["test_logits"])
        scores = 1 / (1 + np.exp(-logits)) if suite.multilabel else logits  # _plots applies softmax to multi-class
        written += _plots(stage / f"finetune_{start}",
                          f"{suite.name}: {summary['model']} fine-tuned from {start}, seed {first['seed']}", None,
                          np.asarray(summary["test_targets"]), scores, suite.classes,
                          None if suite.multilabel else first["metrics"]["confusion_matrix"], suite.multilabel)
    return written


def cmd_build_suite(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else suites_root() / Path(args.name).stem
    definition: str | dict = args.name
    if str(args.name).lower().endswith(".csv"):  # the no-code format: the CSV is both definition and raw data
        definition = csv_definition(args.name)
        args.raw = args.raw or args.name
    if not args.raw:
        raise UserError("build-suite: --raw is required for a packaged or JSON suite "
                        "(a raw dataset folder or label file, or 'sample' for the bundled sample)")
    try:
        result = build_suite(definition, args.raw, out, skip_missing=args.skip_missing, progress=not args.quiet)
    except (SuiteError, FileNotFoundError, ValueError) as exc:
        raise UserError(f"build-suite: {exc}") from exc
    summary = {"suite": str(args.name), "out": str(result.out), "manifest_sha256": result.manifest_sha256,
               "counts": result.counts, "num_rejected": result.num_rejected, "rejects": str(result.rejects_path)}
    print(json.dumps(summary, indent=2))
    tests = sum(result.counts["test"].values())
    trains = sum(result.counts["train"].values())
    print(f"Built suite {args.name} in {result.out}: {tests} test and {trains} train images, manifest sha256 "
          f"{result.manifest_sha256[:16]}..., {result.num_rejected} input(s) rejected (see {result.rejects_path}). "
          f"CLIP_benchmark layout in {result.out / 'wds'}.")
    if not (result.out / "wds" / TEMPLATES_TXT).is_file():
        print(f"Note: the suite's prompts are class-specific, which CLIP_benchmark's {TEMPLATES_TXT} cannot hold; "
              f"they are in {result.out / 'wds' / CUSTOM_TEMPLATES_JSON}. `python -m open_clip_medclip.benchmark eval` "
              "(and plain `clip_benchmark eval` with `medclip train --install-autoload`) use them; otherwise pass "
              f"--custom_template_file {result.out / 'wds' / CUSTOM_TEMPLATES_JSON}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclip eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    zs = sub.add_parser("zeroshot", help="zero-shot classification on one or more suites")
    _common(zs)
    zs.add_argument("--prompts", default=None, help="prompt set name or JSON file overriding the suite's")
    zs.add_argument("--prompts-per-class", type=int, default=None, help="prompts sampled per class (default: suite's)")
    zs.add_argument("--prompt-seed", type=int, default=None, help="seed of the prompt draw (default: suite's, 42)")
    zs.add_argument("--prompt-runs", type=int, default=None, help="prompt re-draws reported as mean/std (default: suite's)")
    zs.add_argument("--ensemble", choices=("logit", "embed", "max"), default=None,
                    help="logit = MedCLIP (reference), embed = OpenCLIP/CLIP_benchmark, max = MedCLIP ensemble=False")
    zs.add_argument("--verify-hashes", action="store_true", help="check every image against its manifest sha256")
    zs.set_defaults(func=cmd_zeroshot)

    rt = sub.add_parser("retrieval", help="class-based image-text retrieval (P@k, R@k)")
    _common(rt)
    rt.add_argument("--texts", default=None, help="CSV text,label for the sentence pool (default: the suite's prompts)")
    rt.add_argument("--k", type=int, nargs="+", default=list(RETRIEVAL_KS))
    rt.set_defaults(func=cmd_retrieval)

    lp = sub.add_parser("linear-probe", help="logistic regression on frozen image embeddings (train -> test split)")
    _common(lp)
    lp.add_argument("--train-fraction", type=float, default=1.0, help="seeded per-class fraction of the train split")
    lp.set_defaults(func=cmd_linear_probe)

    ft = sub.add_parser("finetune", help="fine-tune the image tower + a linear head (train -> val selection -> test); "
                        "several starts and seeds in one call")
    _common(ft, seed_help="seed of the validation carve and train fraction, of the first run and of the bootstrap")
    ft.add_argument("--init", nargs="+", choices=("checkpoint", "imagenet", "random"), default=["checkpoint"],
                    help="starts, compared on identical splits, seeds and budget (paired differences vs the first): "
                         "checkpoint = the --pretrained checkpoint's image tower, imagenet = the tower's timm ImageNet "
                         "weights where available offline, random")
    ft.add_argument("--freeze", action="store_true",
                    help="train only a linear head on the frozen tower: the linear probe (same numbers)")
    ft.add_argument("--epochs", type=int, default=10)
    ft.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate (warm-up then cosine)")
    ft.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on biases and norms)")
    ft.add_argument("--warmup-fraction", type=float, default=0.1, help="share of the steps spent warming up")
    ft.add_argument("--train-fraction", type=float, default=1.0,
                    help="seeded per-class fraction of the train split trained on (e.g. 0.01, 0.1, 1)")
    ft.add_argument("--val-fraction", type=float, default=0.2,
                    help="seeded per-class share of the train split held out for model selection (0 = last epoch)")
    ft.add_argument("--seeds", type=int, default=1, help="runs per start, seeds --seed .. --seed+N-1 (spread reported)")
    ft.add_argument("--patience", type=int, default=None, help="stop after N epochs without a better validation score")
    ft.add_argument("--select", choices=("accuracy", "macro_auc", "loss"), default=None,
                    help="validation metric choosing the epoch (default: accuracy; mean AUC for multi-label)")
    ft.add_argument("--precision", choices=("amp", "fp32"), default="amp", help="amp = bf16 autocast on CUDA")
    ft.add_argument("--restart", action="store_true", help="discard finished and interrupted runs and train again")
    ft.set_defaults(func=cmd_finetune)

    bs = sub.add_parser("build-suite", help="pin a suite from raw data: manifest + sha256 + CLIP_benchmark wds layout")
    bs.add_argument("name", help=f"packaged suite ({', '.join(available_suites())}), a definition JSON or a suite CSV")
    bs.add_argument("--raw", default=None,
                    help="raw dataset folder or label file; 'sample' = the bundled sample (not needed for a CSV suite)")
    bs.add_argument("--out", default=None, help=f"output folder (default {suites_root()}/NAME)")
    bs.add_argument("--skip-missing", action="store_true", help="reject missing images instead of stopping")
    bs.add_argument("--quiet", action="store_true")
    bs.set_defaults(func=cmd_build_suite)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    from open_clip_medclip.cli import run_command  # one line + exit 2 for user errors, as `medclip eval`

    raise SystemExit(run_command("eval", main))

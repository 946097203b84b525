"""`medclip eval {zeroshot,retrieval,linear-probe,build-suite}`: thin commands over the eval library.

Each evaluation writes, per suite, `<out>/<suite>/<task>.json` (all metrics with bootstrap CIs, prompts,
manifest hash), a markdown table and PNGs (t-SNE, ROC, confusion matrix), and prints the table plus a short
summary. Results of finished suites stay on disk if a later suite fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from open_clip_medclip.eval import plots
from open_clip_medclip.eval.metrics import DEFAULT_BOOTSTRAP, RETRIEVAL_KS, markdown_table, softmax
from open_clip_medclip.eval.suites import (
    SuiteError,
    available_suites,
    build_suite,
    csv_definition,
    load_suite,
    suites_root,
)

TABLE_COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")


def load_model(name: str, pretrained: str | None, device: str):
    """(model, val preprocess, tokenizer) through OpenCLIP after registering the MedCLIP configs."""
    import open_clip

    import open_clip_medclip  # noqa: F401  (registers medclip-* model configs)

    pretrained = None if not pretrained or pretrained.lower() == "none" else pretrained
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _common(parser: argparse.ArgumentParser, needs_text: bool = True) -> None:
    parser.add_argument("--model", required=True, help="OpenCLIP model name, e.g. medclip-swin or medclip-tiny")
    parser.add_argument("--pretrained", default=None, help="checkpoint file/dir or tag; omit or 'none' for random weights")
    parser.add_argument("--suite", nargs="+", required=True,
                        help="built suite folder, suite CSV, or a name built under $MEDCLIP_SUITES_ROOT "
                             f"(default {suites_root()})")
    parser.add_argument("--out", default="medclip_eval", help="output folder (one subfolder per suite)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples for 95%% CIs (0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap (and probe) seed")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N test images (smoke runs)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _plots(prefix: Path, title: str, features, targets, scores, classes, confusion, multilabel: bool) -> list[str]:
    written = []
    path = plots.tsne_png(features, targets, classes, f"{prefix}_tsne.png", title=f"{title}: t-SNE")
    if path:
        written.append(str(path))
    probabilities = scores if multilabel else softmax(scores)
    written.append(str(plots.roc_png(targets, probabilities, classes, f"{prefix}_roc.png", title=f"{title}: ROC")))
    if confusion is not None:
        written.append(str(plots.confusion_png(confusion, classes, f"{prefix}_confusion.png", title=f"{title}: confusion")))
    return written


def _finish(task: str, rows: list[tuple[str, dict]], columns, out: Path, failures: list[str]) -> int:
    table = markdown_table(rows, columns)
    (out / f"{task}.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    extras = "" if task == "retrieval" else " (+ PNGs)"
    print(f"\n{task}: {len(rows)} suite(s) evaluated, results in {out}/<suite>/{task}.json{extras} and {out}/{task}.md; "
          f"values are point estimates with bootstrap 95% CIs in brackets."
          + (f" {len(failures)} suite(s) failed: {'; '.join(failures)}" if failures else ""))
    return 1 if failures else 0


def _each_suite(args: argparse.Namespace, command: str, evaluate, failures: list[str]):
    """(suite, result, output folder) for each --suite that evaluates; a failing suite is reported on stderr and
    added to `failures`, and the others still run."""
    for name in args.suite:
        try:
            suite = load_suite(name)
            result = evaluate(suite)
        except (SuiteError, FileNotFoundError, ValueError) as exc:
            print(f"medclip eval {command}: {name}: {exc}", file=sys.stderr)
            failures.append(f"{name}: {exc}")
            continue
        folder = Path(args.out) / suite.name
        folder.mkdir(parents=True, exist_ok=True)
        yield suite, result, folder


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from open_clip_medclip.eval.zeroshot import run_zeroshot

    model, preprocess, tokenizer = load_model(args.model, args.pretrained, args.device)
    rows, failures = [], []

    def evaluate(suite):
        return run_zeroshot(model, suite, tokenizer, preprocess, args.device, prompts=args.prompts,
                            prompts_per_class=args.prompts_per_class if args.prompts_per_class is not None else "default",
                            prompt_seed=args.prompt_seed, prompt_runs=args.prompt_runs, ensemble=args.ensemble,
                            batch_size=args.batch_size, num_workers=args.workers, num_resamples=args.bootstrap,
                            bootstrap_seed=args.seed, max_images=args.max_images, verify_hashes=args.verify_hashes,
                            progress=not args.quiet)

    for suite, result, folder in _each_suite(args, "zeroshot", evaluate, failures):
        metrics = {**result.metrics, "model": args.model, "pretrained": args.pretrained}
        _write_json(folder / "zeroshot.json", metrics)
        columns = ("macro_auc",) if suite.multilabel else TABLE_COLUMNS
        (folder / "zeroshot.md").write_text(markdown_table([(suite.name, metrics)], columns) + "\n", encoding="utf-8")
        if not args.no_plots:
            metrics["plots"] = _plots(folder / "zeroshot", suite.name, result.features, result.targets, result.scores,
                                      suite.classes, metrics.get("confusion_matrix"), suite.multilabel)
            _write_json(folder / "zeroshot.json", metrics)
        if metrics["num_excluded_corrupt"]:
            print(f"{suite.name}: {metrics['num_excluded_corrupt']} corrupt image(s) excluded "
                  f"(listed under 'excluded_corrupt' in {folder / 'zeroshot.json'})", file=sys.stderr)
        rows.append((suite.name, metrics))
    return _finish("zeroshot", rows, TABLE_COLUMNS, Path(args.out), failures)


def cmd_retrieval(args: argparse.Namespace) -> int:
    from open_clip_medclip.eval.retrieval import run_retrieval

    model, preprocess, tokenizer = load_model(args.model, args.pretrained, args.device)
    rows, failures = [], []

    def evaluate(suite):
        return run_retrieval(model, suite, tokenizer, preprocess, args.device, texts_csv=args.texts, ks=args.k,
                             batch_size=args.batch_size, num_workers=args.workers, num_resamples=args.bootstrap,
                             bootstrap_seed=args.seed, max_images=args.max_images, progress=not args.quiet)

    for suite, metrics, folder in _each_suite(args, "retrieval", evaluate, failures):
        metrics.update({"model": args.model, "pretrained": args.pretrained})
        _write_json(folder / "retrieval.json", metrics)
        rows.append((suite.name, metrics["image_to_text"]))
    columns = [f"precision@{k}" for k in args.k] + [f"recall@{k}" for k in args.k]
    return _finish("retrieval", rows, columns, Path(args.out), failures)


def cmd_linear_probe(args: argparse.Namespace) -> int:
    from open_clip_medclip.eval.linear_probe import run_linear_probe

    model, preprocess, _ = load_model(args.model, args.pretrained, args.device)
    rows, failures = [], []

    def evaluate(suite):
        return run_linear_probe(model, suite, preprocess, args.device, train_fraction=args.train_fraction,
                                seed=args.seed, batch_size=args.batch_size, num_workers=args.workers,
                                num_resamples=args.bootstrap, progress=not args.quiet)

    for suite, (metrics, features, targets, logits), folder in _each_suite(args, "linear-probe", evaluate, failures):
        metrics.update({"model": args.model, "pretrained": args.pretrained})
        _write_json(folder / "linear_probe.json", metrics)
        if not args.no_plots:
            metrics["plots"] = _plots(folder / "linear_probe", f"{suite.name} (probe)", features, targets,
                                      np.maximum(logits, -1e9), suite.classes, metrics["confusion_matrix"], False)
            _write_json(folder / "linear_probe.json", metrics)
        rows.append((suite.name, metrics))
    return _finish("linear_probe", rows, TABLE_COLUMNS, Path(args.out), failures)


def cmd_build_suite(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else suites_root() / Path(args.name).stem
    definition: str | dict = args.name
    if str(args.name).lower().endswith(".csv"):  # the no-code format: the CSV is both definition and raw data
        definition = csv_definition(args.name)
        args.raw = args.raw or args.name
    if not args.raw:
        print("medclip eval build-suite: --raw is required for a packaged or JSON suite", file=sys.stderr)
        return 2
    try:
        result = build_suite(definition, args.raw, out, skip_missing=args.skip_missing, progress=not args.quiet)
    except (SuiteError, FileNotFoundError, ValueError) as exc:
        print(f"medclip eval build-suite: {exc}", file=sys.stderr)
        return 2
    summary = {"suite": str(args.name), "out": str(result.out), "manifest_sha256": result.manifest_sha256,
               "counts": result.counts, "num_rejected": result.num_rejected, "rejects": str(result.rejects_path)}
    print(json.dumps(summary, indent=2))
    tests = sum(result.counts["test"].values())
    trains = sum(result.counts["train"].values())
    print(f"Built suite {args.name} in {result.out}: {tests} test and {trains} train images, manifest sha256 "
          f"{result.manifest_sha256[:16]}..., {result.num_rejected} input(s) rejected (see {result.rejects_path}). "
          f"CLIP_benchmark layout in {result.out / 'wds'}.")
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
    raise SystemExit(main())

"""The README's fine-tuning table: `medclip eval finetune` on the pediatric suite, demo checkpoint vs ImageNet vs random.

    medclip demo --full-towers --seeds 1 --no-plots --out medclip_demo        # the demo's checkpoint (semantic matching, seed 0)
    python tests/benchmarks/finetune_table.py --demo-dir medclip_demo [--seeds 3] [--epochs 2] [--machine TEXT]

Runs `medclip eval finetune --init checkpoint imagenet random` (the command the README shows) on the demo's
pediatric-pneumonia suite (400 train images, of which 80 are carved off for validation, 200 held-out test images)
from the demo's `medclip-demo-soft-seed0` checkpoint, and writes the table, per-start spreads, selected epochs,
timings and how the checkpoint was made to tests/benchmarks/results/finetune_pediatric.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import add_output_arguments, write_results  # noqa: E402

CHECKPOINT = Path("runs") / "medclip-demo-soft-seed0" / "checkpoints" / "epoch_2.pt"
SUITE = Path("suites") / "pediatric-pneumonia"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", required=True, help="the --out folder of `medclip demo --full-towers --seeds 1`")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", default=None, help="finetune output folder (default: a temporary one)")
    add_output_arguments(parser, "finetune_pediatric")
    args = parser.parse_args(argv)
    demo = Path(args.demo_dir)
    checkpoint, suite = demo / CHECKPOINT, demo / SUITE
    for path in (checkpoint, suite):
        if not path.exists():
            parser.error(f"{path} is missing: run `medclip demo --full-towers --seeds 1 --no-plots --out {demo}` first")
    from open_clip_medclip.eval.cli import main as eval_main

    work = Path(args.work or tempfile.mkdtemp(prefix="finetune_table_"))
    command = ["finetune", "--model", "medclip-demo", "--pretrained", str(checkpoint), "--suite", str(suite),
               "--init", "checkpoint", "imagenet", "random", "--seeds", str(args.seeds), "--epochs",
               str(args.epochs), "--out", str(work), "--no-plots", "--quiet"]
    started = time.perf_counter()
    if eval_main(command) != 0:
        return 1
    seconds = time.perf_counter() - started
    summary = json.loads((work / "pediatric-pneumonia" / "finetune.json").read_text(encoding="utf-8"))
    starts = {}
    for start, row in summary["starts"].items():
        epochs = [h for run in row["runs"] for h in run["history"]]
        starts[start] = {"paired": row["paired"], "spread": row["spread"], "selected_epochs": row["selected_epochs"],
                         "run_seconds": [run["seconds"] for run in row["runs"]],
                         "train_images_per_s_per_epoch": [h["train_images_per_s"] for h in epochs]}
    results = {
        "finetune_command": (f"medclip eval finetune --model medclip-demo --pretrained medclip_demo/{CHECKPOINT} "
                             f"--suite medclip_demo/{SUITE} --init checkpoint imagenet random --seeds {args.seeds} "
                             f"--epochs {args.epochs} --out ft"),
        "checkpoint": {
            "path_in_demo_dir": str(CHECKPOINT),
            "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
            "how_made": "`medclip demo --full-towers --seeds 1 --no-plots --out medclip_demo` (defaults: medclip-demo from ImageNet "
                        "EfficientNet-Lite0 + all-MiniLM-L6-v2, semantic matching loss, seed 0, 2 epochs x 1024 "
                        "samples, batch 32, lr 2e-4, half NIH / half pediatric training images, 128 px): the run "
                        "medclip-demo-soft-seed0, final checkpoint. Its training stream includes the pediatric "
                        "suite's train images (paired with report sentences sharing their finding), never its "
                        "held-out test images.",
        },
        "suite": {"name": summary["suite"], "manifest_sha256": summary["manifest_sha256"],
                  "num_train": summary["num_train"], "num_val": summary["num_val"], "num_test": summary["num_test"]},
        "options": summary["options"],
        "seeds": summary["seeds"],
        "table": summary["table"],
        "starts": starts,
        "total_seconds": seconds,
        "environment": summary["environment"],
    }
    print(summary["table"])
    print(f"{seconds:.0f} s in all")
    write_results(args, results, argv, __file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())

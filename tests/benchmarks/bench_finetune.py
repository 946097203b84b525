"""Fine-tuning loop speed: `eval.finetune_train.train_classifier` vs a bare PyTorch loop, same data and model, one run.

    python tests/benchmarks/bench_finetune.py [--repeats 2] [--batch-size 32] [--model medclip-demo] [--machine TEXT]

Both loops train the same classifier (the model's image tower + a linear head, `build_classifier`) on the bundled
pediatric suite's 400 train images with MedCLIP's training augmentation, AdamW and cross-entropy, batch 32, on CPU.
The bare loop is a plain Dataset (PIL open + the same transform), the default collate and forward / backward / step;
the finetune loop adds what the command needs (corrupt-image tolerance, the per-step cosine schedule, progress
bars, the atomic `progress.pt` after every epoch). Epochs alternate between the two (bare, finetune, finetune,
bare, ...) so load changes on a shared machine hit both. Reported: training images/s per epoch (the loop only, as
the finetune history records it) and wall images/s (the whole `train_classifier` call, with its checkpoint save).
Writes tests/benchmarks/results/bench_finetune.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import add_output_arguments, write_results  # noqa: E402


def bare_epoch(model, entries, labels, transform, batch_size: int, optimizer, seed: int) -> tuple[int, float]:
    """One epoch of the textbook loop; returns (images, seconds)."""
    import torch
    from PIL import Image

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(entries)

        def __getitem__(self, i):
            with Image.open(entries[i].image_path) as image:
                return transform(image), int(labels[i])

    loader = torch.utils.data.DataLoader(Images(), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    model.train()
    started, seen = time.perf_counter(), 0
    for images, targets in loader:
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(targets)
    return seen, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="epochs per loop (alternating)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: medclip-demo when installed, else medclip-tiny")
    add_output_arguments(parser, "bench_finetune")
    args = parser.parse_args(argv)
    import torch

    from open_clip_medclip.demo import default_model
    from open_clip_medclip.eval.classifier import build_classifier
    from open_clip_medclip.eval.finetune_train import train_classifier
    from open_clip_medclip.eval.options import EvalOptions
    from open_clip_medclip.eval.suites.build import build_suite
    from open_clip_medclip.eval.suites.load import load_suite

    model_name = args.model or default_model()
    init = "imagenet" if model_name == "medclip-demo" else "random"
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    build_suite("pediatric-pneumonia", "sample", work / "suite", progress=False)
    suite = load_suite(work / "suite")
    train = suite.split("train")
    labels = suite.label_index(train)
    options = EvalOptions(epochs=1, batch_size=args.batch_size, val_fraction=0.0)
    finetuned = build_classifier(model_name, init, suite.classes, seed=0)
    bare = build_classifier(model_name, init, suite.classes, seed=0)
    bare_optimizer = torch.optim.AdamW(bare.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    transform = bare.train_transform()
    epochs: list[dict] = []
    for repeat in range(args.repeats):
        order = ("bare", "finetune") if repeat % 2 == 0 else ("finetune", "bare")
        for loop in order:
            if loop == "bare":
                images, seconds = bare_epoch(bare, train, labels, transform, args.batch_size, bare_optimizer, repeat)
                epochs.append({"loop": "bare", "images": images, "seconds": seconds, "images_per_s": images / seconds})
            else:
                started = time.perf_counter()
                result = train_classifier(finetuned, suite, train, [], options, repeat, "cpu", work / f"run{repeat}",
                                          f"bench-{repeat}", progress=False)
                wall = time.perf_counter() - started
                epoch = result["history"][0]
                epochs.append({"loop": "finetune", "images": epoch["train_images"], "seconds": epoch["train_seconds"],
                               "images_per_s": epoch["train_images_per_s"], "wall_seconds": wall,
                               "wall_images_per_s": epoch["train_images"] / wall})
            print(f"  {epochs[-1]['loop']:8s} epoch: {epochs[-1]['images']} images, {epochs[-1]['seconds']:.1f} s, "
                  f"{epochs[-1]['images_per_s']:.1f} images/s", flush=True)

    def mean(loop: str, key: str) -> float:
        values = [e[key] for e in epochs if e["loop"] == loop]
        return sum(values) / len(values)

    ratio = mean("finetune", "images_per_s") / mean("bare", "images_per_s")
    wall_ratio = mean("finetune", "wall_images_per_s") / mean("bare", "images_per_s")
    print(f"{model_name} ({init} start), {len(train)} train images, batch {args.batch_size}, CPU, "
          f"{torch.get_num_threads()} torch thread(s):")
    print(f"  bare PyTorch loop : {mean('bare', 'images_per_s'):7.2f} images/s per epoch")
    print(f"  finetune loop     : {mean('finetune', 'images_per_s'):7.2f} images/s per epoch ({ratio:.2f}x); "
          f"{mean('finetune', 'wall_images_per_s'):.2f} with the per-epoch checkpoint save ({wall_ratio:.2f}x)")
    write_results(args, {"model": model_name, "init": init, "train_images": len(train), "batch_size": args.batch_size,
                         "image_size": bare.preprocess_cfg["size"], "torch_threads": torch.get_num_threads(),
                         "epochs": epochs, "bare_images_per_s": mean("bare", "images_per_s"),
                         "finetune_images_per_s": mean("finetune", "images_per_s"),
                         "finetune_wall_images_per_s": mean("finetune", "wall_images_per_s"),
                         "ratio_finetune_to_bare": ratio, "ratio_finetune_wall_to_bare": wall_ratio, "goal": 0.8},
                  argv, __file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())

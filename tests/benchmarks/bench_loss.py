"""Loss forward+backward: SemanticMatchingLoss vs OpenCLIP's ClipLoss, measured side by side in one run.

    python tests/benchmarks/bench_loss.py [--batch-sizes 256 1024 4096] [--dim 512] [--repeats 5] [--device cpu]

Prints one JSON line per batch size and a summary; the issue's target is a ratio <= 1.10.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from open_clip_medclip.loss import SemanticMatchingLoss


def _inputs(batch: int, dim: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device).requires_grad_(True)
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device).requires_grad_(True)
    image_labels = torch.randint(2, (batch, 14), generator=g).float().to(device)
    text_labels = torch.randint(2, (batch, 14), generator=g).float().to(device)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    return image, text, scale, image_labels, text_labels


def _step(loss_fn, inputs, soft: bool, device: str) -> float:
    image, text, scale, image_labels, text_labels = inputs
    image.grad = text.grad = scale.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if soft:
        loss = loss_fn(image, text, scale, image_labels=image_labels, text_labels=text_labels)
    else:
        loss = loss_fn(image, text, scale)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(batch: int, dim: int, repeats: int, device: str) -> dict:
    inputs = _inputs(batch, dim, device)
    soft_loss, clip_loss = SemanticMatchingLoss(), ClipLoss()
    for _ in range(2):  # warm-up
        _step(soft_loss, inputs, True, device)
        _step(clip_loss, inputs, False, device)
    soft_times, clip_times = [], []
    for _ in range(repeats):  # interleaved so machine noise hits both alike
        clip_times.append(_step(clip_loss, inputs, False, device))
        soft_times.append(_step(soft_loss, inputs, True, device))
    soft_ms, clip_ms = 1000 * statistics.median(soft_times), 1000 * statistics.median(clip_times)
    return {"batch": batch, "dim": dim, "device": device, "soft_ms": round(soft_ms, 3),
            "clip_ms": round(clip_ms, 3), "ratio": round(soft_ms / clip_ms, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(b, args.dim, args.repeats, args.device) for b in args.batch_sizes]
    for row in rows:
        print(json.dumps(row))
    ratios = ", ".join(f"B={r['batch']}: {r['ratio']:.3f}x ({r['soft_ms']:.1f} vs {r['clip_ms']:.1f} ms)" for r in rows)
    print(f"SemanticMatchingLoss / ClipLoss forward+backward (median of {args.repeats}, {args.device}, "
          f"{torch.get_num_threads()} threads): {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

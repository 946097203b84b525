"""Loss forward+backward: SemanticMatchingLoss vs OpenCLIP's ClipLoss, measured side by side in one run.

    python tests/benchmarks/bench_loss.py [--batch-sizes 256 1024 4096] [--dim 512] [--repeats 5] [--device cpu]
        [--kernels auto square rows]

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

from open_clip_medclip.loss import LOSS_KERNELS, SemanticMatchingLoss


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


def measure(batch: int, dim: int, repeats: int, device: str, kernels: list[str]) -> dict:
    inputs = _inputs(batch, dim, device)
    soft_losses = {kernel: SemanticMatchingLoss(kernel=kernel) for kernel in kernels}
    clip_loss = ClipLoss()
    for _ in range(2):  # warm-up
        _step(clip_loss, inputs, False, device)
        for soft_loss in soft_losses.values():
            _step(soft_loss, inputs, True, device)
    times = {kernel: [] for kernel in ["clip", *kernels]}
    for _ in range(repeats):  # interleaved so machine noise hits all alike
        times["clip"].append(_step(clip_loss, inputs, False, device))
        for kernel, soft_loss in soft_losses.items():
            times[kernel].append(_step(soft_loss, inputs, True, device))
    ms = {kernel: 1000 * statistics.median(values) for kernel, values in times.items()}
    row = {"batch": batch, "dim": dim, "device": device, "clip_ms": round(ms["clip"], 3)}
    for kernel in kernels:
        row[f"soft_{kernel}_ms"] = round(ms[kernel], 3)
        row[f"ratio_{kernel}"] = round(ms[kernel] / ms["clip"], 3)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernels", nargs="+", choices=LOSS_KERNELS, default=["auto"],
                        help="SemanticMatchingLoss kernels to time (auto = what training uses on this device)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(b, args.dim, args.repeats, args.device, args.kernels) for b in args.batch_sizes]
    for row in rows:
        print(json.dumps(row))
    for kernel in args.kernels:
        ratios = ", ".join(
            f"B={r['batch']}: {r[f'ratio_{kernel}']:.3f}x ({r[f'soft_{kernel}_ms']:.2f} vs {r['clip_ms']:.2f} ms)"
            for r in rows
        )
        print(f"SemanticMatchingLoss[{kernel}] / ClipLoss forward+backward (median of {args.repeats}, "
              f"{args.device}, {torch.get_num_threads()} threads): {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

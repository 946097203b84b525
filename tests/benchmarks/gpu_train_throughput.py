"""GPU training throughput of `medclip-swin` inside OpenCLIP's own `train_one_epoch`: samples/s and MFU.

    python tests/benchmarks/gpu_train_throughput.py                      # medclip-swin, bf16, batch 128
    python tests/benchmarks/gpu_train_throughput.py --channels-last --loss clip
    python tests/benchmarks/gpu_train_throughput.py --model medclip-tiny --device cpu --precision fp32 \\
        --batch-size 4 --steps 2 --warmup-steps 1                        # CPU smoke run

Synthetic-size inputs (random 224² images, tokenized sentences with packed labels) are fed from memory, so the
number measures the model step (forward, semantic matching loss, backward, AdamW, logit-scale clamp), not the
loader. Model FLOPs per step are counted once with `torch.utils.flop_counter` (matmuls and convolutions,
forward + backward); MFU = achieved FLOP/s / the GPU's dense bf16 peak (override with --peak-tflops).
Prints one JSON line and a one-line summary.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return PEAK_BF16_TFLOPS[key]
    return None


class RepeatLoader:
    """The same batch `steps` times, with the attributes open_clip_train's loop reads."""

    def __init__(self, batch, steps: int) -> None:
        self.batch, self.num_batches = batch, steps
        self.num_samples = steps * len(batch[0])

    def __iter__(self):
        for _ in range(self.num_batches):
            yield self.batch


def synthetic_batch(model_name: str, batch_size: int, image_size: int):
    import open_clip

    from open_clip_medclip.streams import pack_labels

    tokenizer = open_clip.get_tokenizer(model_name)
    sentences = ["there is mild cardiomegaly with small bilateral pleural effusions .",
                 "no acute cardiopulmonary abnormality .", "right lower lobe consolidation concerning for pneumonia ."]
    tokens = tokenizer([sentences[i % len(sentences)] for i in range(batch_size)])
    g = torch.Generator().manual_seed(0)
    image_labels = torch.randint(2, (batch_size, 14), generator=g).float()
    text_labels = torch.randint(2, (batch_size, 14), generator=g).float()
    texts = torch.stack([pack_labels(tokens[i], image_labels[i], text_labels[i]) for i in range(batch_size)])
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    if torch.cuda.is_available():
        images, texts = images.pin_memory(), texts.pin_memory()
    return images, texts


def count_step_flops(model, loss_fn, batch, device, autocast) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    images = batch[0].to(device)
    texts = batch[1].to(device)
    with FlopCounterMode(display=False) as counter:
        with autocast():
            out = model(images, texts)
            loss = loss_fn(**out)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def profile_steps(run, steps: int, device: torch.device) -> dict:
    """Profile `steps` steps: print the top ops by self device time; return device busy ms and kernels per step.

    Busy time well under the step time means the step waits on the host (Python, kernel launches), not the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = run(steps)
    averages = prof.key_averages()
    on_device = device.type == "cuda"
    sort_key = "self_device_time_total" if on_device else "self_cpu_time_total"
    print(averages.table(sort_by=sort_key, row_limit=25, max_name_column_width=60))
    kernels = [e for e in prof.events() if on_device and e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time_total for e in kernels) if on_device else 0.0
    return {
        "profiled_step_ms": round(1000 * seconds / steps, 2),
        "device_busy_ms_per_step": round(busy_us / 1000 / steps, 2) if on_device else None,
        "kernels_per_step": round(len(kernels) / steps) if on_device else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medclip-swin")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="amp_bf16", help="open_clip_train precision (amp_bf16, fp32, ...)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--loss", choices=("soft", "clip"), default="soft")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (as --torchcompile does)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many steps and print the top kernels and device busy time")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    args = parser.parse_args(argv)

    import open_clip
    from open_clip_medclip.plugins import openclip_train
    from open_clip_train.data import DataInfo
    from open_clip_train.params import parse_args
    from open_clip_train.precision import get_autocast
    from open_clip_train.train import train_one_epoch

    import open_clip_medclip  # noqa: F401
    from open_clip_medclip.loss import create_medclip_loss

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, output_dict=True, device=device)
    openclip_train.enable_label_passthrough(model, openclip_train.model_context_length(args.model))
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    batch = synthetic_batch(args.model, args.batch_size, size)
    if args.channels_last:
        batch = (batch[0].contiguous(memory_format=torch.channels_last), batch[1])

    train_args = parse_args(["--model", args.model, "--precision", args.precision, "--batch-size",
                             str(args.batch_size), "--lr", "1e-5", "--device", str(device)])
    train_args.device, train_args.distill, train_args.rank, train_args.local_rank = str(device), False, 0, 0
    train_args.world_size, train_args.wandb, train_args.skip_scheduler = 1, False, True
    train_args.log_every_n_steps = 10**9
    train_args.medclip_loss = args.loss
    loss_fn = create_medclip_loss(train_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler() if args.precision == "amp" else None
    autocast = get_autocast(args.precision, device_type=device.type)

    flops_per_step = count_step_flops(model, loss_fn, batch, device, autocast)
    step_model = torch.compile(model) if args.compile else model

    def run(steps: int) -> float:
        data = {"train": DataInfo(RepeatLoader(batch, steps))}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_one_epoch(step_model, data, loss_fn, 0, optimizer, scaler, None, None, train_args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(args.warmup_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = run(args.steps)
    samples_per_s = args.steps * args.batch_size / seconds
    achieved_tflops = flops_per_step * args.steps / seconds / 1e12
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "loss": args.loss,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "steps": args.steps,
        "step_ms": round(1000 * seconds / args.steps, 2),
        "samples_per_s": round(samples_per_s, 1),
        "model_tflop_per_step": round(flops_per_step / 1e12, 4),
        "achieved_tflops": round(achieved_tflops, 2),
        "peak_tflops": peak,
        "mfu": round(achieved_tflops / peak, 4) if peak else None,
        "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    if args.profile:
        result.update(profile_steps(run, args.profile, device))
    print(json.dumps(result))
    mfu = f"{100 * result['mfu']:.1f}% MFU of {peak} TFLOP/s" if peak else "MFU n/a (no peak known)"
    print(f"{args.model} on {result['device']} ({args.precision}, batch {args.batch_size}, {args.loss} loss"
          f"{', channels-last' if args.channels_last else ''}): {result['samples_per_s']} samples/s, "
          f"{result['step_ms']} ms/step, {result['achieved_tflops']} TFLOP/s achieved, {mfu}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU training throughput of `medclip-swin` inside OpenCLIP's own `train_one_epoch`: samples/s and MFU.

    python tests/benchmarks/gpu_train_throughput.py                      # medclip-swin, bf16, batch 128, soft loss
    python tests/benchmarks/gpu_train_throughput.py --loss soft clip --compile --batch-size 256
    python tests/benchmarks/gpu_train_throughput.py --text-width padded  # every text 77 tokens (the old baseline)
    python tests/benchmarks/gpu_train_throughput.py --model medclip-tiny --device cpu --precision fp32 \\
        --batch-size 4 --steps 2 --warmup-steps 1                        # CPU smoke run

Inputs are fed from memory, so the number measures the model step (forward, loss, backward, AdamW, logit-scale
clamp), not the loader: random 224² images and `--distinct-batches` text batches of real IU report sentences
(the bundled sample, labelled by the bundled labeler; image labels = the report's, text labels = the sentence's),
packed with `labels.pack_batch`, each trimmed to its longest sentence rounded up to 8 tokens as the streams do
(`--text-width padded`: 77 tokens). The steps cycle through those batches, so a compiled model meets several
widths, as in training. Model FLOPs are counted for each batch with `torch.utils.flop_counter` (matmuls,
convolutions, attention; forward + backward); MFU = achieved FLOP/s / the GPU's dense bf16 peak (override with
--peak-tflops). With several `--loss` values the same (compiled) model is timed with each loss in turn.
`--padding-free on|both` runs the text tower padding-free (models with `medclip_masked_pooler` only; `both` times
the same model padded, then padding-free, and prints the ratio).
Swin attention runs through timm's fused kernel (`models.enable_fused_attention`) unless --no-fused-swin.
Prints one JSON line per loss and a one-line summary each.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

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


class CycleLoader:
    """`steps` batches cycling through `batches`, with the attributes open_clip_train's loop reads."""

    def __init__(self, batches: list, steps: int, start: int = 0) -> None:
        self.batches, self.num_batches, self.start = batches, steps, start
        self.num_samples = sum(len(batches[(start + i) % len(batches)][0]) for i in range(steps))

    def __iter__(self):
        for i in range(self.num_batches):
            yield self.batches[(self.start + i) % len(self.batches)]


SAMPLE_REPORTS = Path(__file__).resolve().parents[2] / "open_clip_medclip" / "sample_data" / "iu_reports" / \
    "NLMCXR_reports.tgz"


def iu_pairs(max_reports: int | None = None) -> list[tuple[str, list[float], list[float]]]:
    """(sentence, report labels, sentence labels) for every labelled sentence of the bundled IU reports (zeros policy)."""
    from open_clip_medclip.knowledge import Labeler
    from open_clip_medclip.sources.reports import iter_reports

    def zeros(values):
        return [1.0 if value == 1 else 0.0 for value in values]

    labeler = Labeler()
    pairs = []
    for number, (_, text) in enumerate(iter_reports(SAMPLE_REPORTS)):
        if max_reports is not None and number >= max_reports:
            break
        result = labeler.label_report(text)
        pairs.extend((s.text, zeros(result.labels), zeros(s.labels)) for s in result.sentences if s.text.strip())
    return pairs


def text_batches(model_name: str, batch_size: int, image_size: int, count: int, width: str,
                 max_reports: int | None = None, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (images, packed texts) batches of IU sentences; texts trimmed to the batch's longest (x8) or 77."""
    import open_clip

    from open_clip_medclip.labels import pack_batch

    tokenizer = open_clip.get_tokenizer(model_name)
    pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", 0) or 0
    pairs = iu_pairs(max_reports)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        chosen = [pairs[i] for i in torch.randint(len(pairs), (batch_size,), generator=g).tolist()]
        tokens = tokenizer([sentence for sentence, _, _ in chosen])
        if width == "trimmed":
            longest = int((tokens != pad).sum(1).max())
            tokens = tokens[:, :min(tokens.shape[1], -(-longest // 8) * 8)]
        texts = pack_batch(tokens, torch.tensor([p[1] for p in chosen]), torch.tensor([p[2] for p in chosen]))
        images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        if torch.cuda.is_available():
            images, texts = images.pin_memory(), texts.pin_memory()
        batches.append((images, texts))
    return batches


def text_width(texts: torch.Tensor) -> int:
    from open_clip_medclip.labels import unpack_batch

    return unpack_batch(texts)[0].shape[1]


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
    parser.add_argument("--steps", type=int, default=30, help="timed steps (per loss)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (per loss)")
    parser.add_argument("--loss", choices=("soft", "clip"), nargs="+", default=["soft"])
    parser.add_argument("--text-width", choices=("trimmed", "padded"), default="trimmed",
                        help="texts trimmed to each batch's longest sentence (x8), or padded to 77 (old baseline)")
    parser.add_argument("--distinct-batches", type=int, default=8, help="different text batches the steps cycle through")
    parser.add_argument("--iu-reports", type=int, default=None, help="draw sentences from the first N IU reports only")
    parser.add_argument("--padding-free", choices=("off", "on", "both"), default="off",
                        help="padding-free text tower (--medclip-padding-free; masked-pooler models); both: off, then on")
    parser.add_argument("--no-fused-swin", action="store_true", help="leave timm's Swin attention unfused")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (as --torchcompile does)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many steps and print the top kernels and device busy time")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    args = parser.parse_args(argv)

    import open_clip
    from open_clip_medclip.plugins import openclip_models, openclip_train
    from open_clip_train.data import DataInfo
    from open_clip_train.params import parse_args
    from open_clip_train.precision import get_autocast
    from open_clip_train.train import train_one_epoch

    import open_clip_medclip  # noqa: F401
    from open_clip_medclip import models
    from open_clip_medclip.loss import create_medclip_loss

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, output_dict=True, device=device)
    openclip_train.enable_label_passthrough(model)
    fused_swin = 0 if args.no_fused_swin else models.enable_fused_attention(model)
    text_attention = getattr(getattr(getattr(model, "text", None), "transformer", None), "config", None)
    text_attention = getattr(text_attention, "_attn_implementation", None)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    batches = text_batches(args.model, args.batch_size, size, args.distinct_batches, args.text_width, args.iu_reports)
    if args.channels_last:
        batches = [(images.contiguous(memory_format=torch.channels_last), texts) for images, texts in batches]
    widths = [text_width(texts) for _, texts in batches]

    train_args = parse_args(["--model", args.model, "--precision", args.precision, "--batch-size",
                             str(args.batch_size), "--lr", "1e-5", "--device", str(device)])
    train_args.device, train_args.distill, train_args.rank, train_args.local_rank = str(device), False, 0, 0
    train_args.world_size, train_args.wandb, train_args.skip_scheduler = 1, False, True
    train_args.log_every_n_steps = 10**9
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler() if args.precision == "amp" else None
    autocast = get_autocast(args.precision, device_type=device.type)
    step_model = torch.compile(model) if args.compile else model
    peak = peak_tflops(device, args.peak_tflops)

    variants = [(padding_free, loss_kind) for padding_free in {"off": [False], "on": [True], "both": [False, True]}[
        args.padding_free] for loss_kind in args.loss]
    rates = {}
    for padding_free, loss_kind in variants:
        if padding_free:
            openclip_models.enable_padding_free_text(model)  # in place: the optimizer's parameters stay the same
        train_args.medclip_loss = loss_kind
        loss_fn = create_medclip_loss(train_args)
        flops = [count_step_flops(model, loss_fn, batch, device, autocast) for batch in batches]
        position = 0

        def run(steps: int, loss_fn=loss_fn, flops=flops) -> tuple[float, float]:
            """(seconds, model FLOPs) of `steps` steps, continuing the cycle through the batches."""
            nonlocal position
            data = {"train": DataInfo(CycleLoader(batches, steps, position))}
            work = sum(flops[(position + i) % len(batches)] for i in range(steps))
            position = (position + steps) % len(batches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_one_epoch(step_model, data, loss_fn, 0, optimizer, scaler, None, None, train_args)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, work

        run(max(args.warmup_steps, 2 * len(batches) if args.compile else 0))  # compiled: meet every width twice
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, work = run(args.steps)
        samples_per_s = args.steps * args.batch_size / seconds
        achieved_tflops = work / seconds / 1e12
        result = {
            "model": args.model,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "precision": args.precision,
            "batch_size": args.batch_size,
            "loss": loss_kind,
            "text_width": args.text_width,
            "padding_free": padding_free,
            "widths": widths,
            "mean_width": round(sum(widths) / len(widths), 1),
            "text_attention": text_attention,
            "fused_swin_attention_modules": fused_swin,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "steps": args.steps,
            "step_ms": round(1000 * seconds / args.steps, 2),
            "samples_per_s": round(samples_per_s, 1),
            "model_tflop_per_step": round(work / args.steps / 1e12, 4),
            "model_flop_per_step": int(work / args.steps),
            "achieved_tflops": round(achieved_tflops, 2),
            "peak_tflops": peak,
            "mfu": round(achieved_tflops / peak, 4) if peak else None,
            "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        }
        if args.profile:
            result.update(profile_steps(lambda steps: run(steps)[0], args.profile, device))
        print(json.dumps(result))
        mfu = f"{100 * result['mfu']:.1f}% MFU of {peak} TFLOP/s" if peak else "MFU n/a (no peak known)"
        print(f"{args.model} on {result['device']} ({args.precision}, batch {args.batch_size}, {loss_kind} loss, "
              f"{'compiled' if args.compile else 'eager'}, texts {args.text_width} (mean width {result['mean_width']})"
              f"{', padding-free text tower' if padding_free else ''}"
              f"{', channels-last' if args.channels_last else ''}): {result['samples_per_s']} samples/s, "
              f"{result['step_ms']} ms/step, {result['achieved_tflops']} TFLOP/s achieved, {mfu}.")
        rates[padding_free, loss_kind] = result["samples_per_s"]
    for loss_kind in args.loss:
        if (True, loss_kind) in rates and (False, loss_kind) in rates:
            ratio = rates[True, loss_kind] / rates[False, loss_kind]
            print(json.dumps({"model": args.model, "loss": loss_kind, "padding_free_over_padded_samples_per_s":
                              round(ratio, 3)}))
            print(f"padding-free text tower, {loss_kind} loss: {ratio:.2f}x the samples/s of the trimmed padded tower")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

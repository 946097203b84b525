"""Loss forward+backward: SemanticMatchingLoss vs OpenCLIP's ClipLoss, time and memory side by side in one run.

    python tests/benchmarks/bench_loss.py [--batch-sizes 256 1024 4096] [--dim 512] [--repeats 5] [--device cpu]
        [--kernels auto] [--targets auto dense] [--labels iu|random]
        [--local-loss-batch 32768 --world-size 8] [--machine TEXT] [--out PATH | --no-out]

Labels: `iu` (default) draws image labels from the bundled IU reports' report-level labels and text labels from
their sentence labels (`zeros` policy), as a paired medclip stream would; `random` draws independent 0/1 vectors
(every row distinct: the worst case for the grouped targets, which then fall back to dense).
Memory is the peak of tensor bytes allocated by one loss forward+backward beyond its inputs (CUDA: the allocator's
peak; CPU: live tensor storages counted op by op). `--local-loss-batch N --world-size W` simulates rank 0 of a
`--local-loss` run with global batch N on W ranks (the other ranks' features and labels are random stand-ins).
Prints one JSON line per measurement and a summary; the issue's targets: time <= 1.10x, local-loss memory <= 1.2x.
Results go to tests/benchmarks/results/bench_loss_cpu.json (bench_loss_gpu.json with --device cuda) with provenance.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn.functional as F
from benchresults import RESULTS_DIR, add_output_arguments, write_results  # noqa: E402
from open_clip.loss import ClipLoss

import open_clip_medclip.loss as medclip_loss
from open_clip_medclip.loss import LOSS_KERNELS, TARGET_MODES, SemanticMatchingLoss

SAMPLE_REPORTS = Path(__file__).resolve().parents[2] / "open_clip_medclip" / "sample_data" / "iu_reports" / \
    "NLMCXR_reports.tgz"


# ------------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------------
def _zeros_policy(values) -> list[float]:
    return [1.0 if value == 1 else 0.0 for value in values]  # MedCLIP's default: uncertain and blank count as 0


def iu_label_pools(max_reports: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(report-level label vectors, sentence label vectors) of the bundled IU reports, `zeros` policy."""
    from open_clip_medclip.knowledge import Labeler
    from open_clip_medclip.sources.reports import iter_reports

    labeler = Labeler()
    reports, sentences = [], []
    for number, (_, text) in enumerate(iter_reports(SAMPLE_REPORTS)):
        if max_reports is not None and number >= max_reports:
            break
        result = labeler.label_report(text)
        reports.append(_zeros_policy(result.labels))
        sentences.extend(_zeros_policy(s.labels) for s in result.sentences if s.text.strip())
    return np.asarray(reports, dtype=np.float32), np.asarray(sentences, dtype=np.float32)


def draw_labels(batch: int, pools: tuple[np.ndarray, np.ndarray] | None, g: torch.Generator):
    if pools is None:
        return torch.randint(2, (batch, 14), generator=g).float(), torch.randint(2, (batch, 14), generator=g).float()
    image_pool, text_pool = (torch.from_numpy(pool) for pool in pools)
    return (image_pool[torch.randint(len(image_pool), (batch,), generator=g)],
            text_pool[torch.randint(len(text_pool), (batch,), generator=g)])


def _inputs(batch: int, dim: int, device: str, pools, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device).requires_grad_(True)
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device).requires_grad_(True)
    image_labels, text_labels = (labels.to(device) for labels in draw_labels(batch, pools, g))
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    return image, text, scale, image_labels, text_labels


@contextlib.contextmanager
def simulated_ranks(world_size: int, dim: int, pools, seed: int = 1):
    """Rank 0 of `world_size`: gathers return this rank's tensors followed by fixed random stand-ins for the others."""
    others: dict[tuple, torch.Tensor] = {}

    def stand_in(tensor: torch.Tensor, kind: str) -> torch.Tensor:
        key = (kind, tuple(tensor.shape), tensor.device.type)
        if key not in others:
            g = torch.Generator().manual_seed(seed + len(others))
            rows = tensor.shape[0] * (world_size - 1)
            if kind == "labels":
                other = draw_labels(rows, pools, g)[0]
            else:
                other = F.normalize(torch.randn(rows, tensor.shape[1], generator=g), dim=-1)
            others[key] = other.to(tensor.device, tensor.dtype)
        return others[key]

    def gather(image_features, text_features, local_loss=False, gather_with_grad=False, **_):
        def one(features, kind):
            own = features if (gather_with_grad or not local_loss) else features.detach()
            return torch.cat([own, stand_in(features, kind)])
        return one(image_features, "image"), one(text_features, "text")

    def gather_labels(tensor, _world_size, _use_horovod):
        return torch.cat([tensor, stand_in(tensor, "labels")])

    import open_clip.loss as host_loss

    saved = host_loss.gather_features, medclip_loss.gather_features, medclip_loss._all_gather_nograd
    host_loss.gather_features = medclip_loss.gather_features = gather
    medclip_loss._all_gather_nograd = gather_labels
    try:
        yield
    finally:
        host_loss.gather_features, medclip_loss.gather_features, medclip_loss._all_gather_nograd = saved


# ------------------------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------------------------
def _peak_counter():
    """A TorchDispatchMode counting the peak of live tensor storages created under it (CPU memory profile)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class PeakBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, int] = {}
            self.current = self.peak = 0

        def _free(self, key: int) -> None:
            self.current -= self.live.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key in inputs or key in self.live or storage.nbytes() == 0:
                    continue  # a view of an input, or already counted
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
            return out

    return PeakBytes()


def _call(loss_fn, inputs, soft: bool):
    image, text, scale, image_labels, text_labels = inputs
    image.grad = text.grad = scale.grad = None
    if soft:
        loss = loss_fn(image, text, scale, image_labels=image_labels, text_labels=text_labels)
    else:
        loss = loss_fn(image, text, scale)
    loss.backward()


def _time(loss_fn, inputs, soft: bool, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    _call(loss_fn, inputs, soft)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_bytes(loss_fn, inputs, soft: bool, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _call(loss_fn, inputs, soft)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    counter = _peak_counter()
    with counter:
        _call(loss_fn, inputs, soft)
    return counter.peak


def _variants(kernels: list[str], targets: list[str], **loss_kwargs) -> dict:
    return {f"{kernel}/{mode}": SemanticMatchingLoss(kernel=kernel, targets=mode, **loss_kwargs)
            for kernel in kernels for mode in targets}


def measure(batch: int, dim: int, repeats: int, device: str, kernels: list[str], targets: list[str], pools,
            world_size: int = 1) -> dict:
    """Median time and peak memory of ClipLoss and each soft variant; world_size > 1: simulated local loss."""
    local = world_size > 1
    rows = batch // world_size
    common = dict(local_loss=local, world_size=world_size, rank=0, cache_labels=True)
    with simulated_ranks(world_size, dim, pools) if local else contextlib.nullcontext():
        inputs = _inputs(rows, dim, device, pools)
        soft_losses = _variants(kernels, targets, **common)
        clip_loss = ClipLoss(**common)
        for _ in range(1 if repeats > 1 else 0):  # warm-up
            _time(clip_loss, inputs, False, device)
            for soft_loss in soft_losses.values():
                _time(soft_loss, inputs, True, device)
        times = {name: [] for name in ["clip", *soft_losses]}
        for _ in range(repeats):  # interleaved so machine noise hits all alike
            times["clip"].append(_time(clip_loss, inputs, False, device))
            for name, soft_loss in soft_losses.items():
                times[name].append(_time(soft_loss, inputs, True, device))
        peaks = {"clip": _peak_bytes(clip_loss, inputs, False, device)}
        peaks.update({name: _peak_bytes(fn, inputs, True, device) for name, fn in soft_losses.items()})
        image_groups = len(torch.unique(torch.cat([inputs[3], medclip_loss._all_gather_nograd(inputs[3], 0, False)])
                                        if local else inputs[3], dim=0))
        text_groups = len(torch.unique(torch.cat([inputs[4], medclip_loss._all_gather_nograd(inputs[4], 0, False)])
                                       if local else inputs[4], dim=0))
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    row = {"global_batch": batch, "rows_per_rank": rows, "world_size": world_size, "local_loss": local, "dim": dim,
           "device": device, "distinct_image_labels": image_groups, "distinct_text_labels": text_groups,
           "clip_ms": round(ms["clip"], 3), "clip_peak_mib": round(peaks["clip"] / 2**20, 1)}
    for name, soft_loss in soft_losses.items():
        row[f"soft_{name}_ms"] = round(ms[name], 3)
        row[f"soft_{name}_time_ratio"] = round(ms[name] / ms["clip"], 3)
        row[f"soft_{name}_peak_mib"] = round(peaks[name] / 2**20, 1)
        row[f"soft_{name}_memory_ratio"] = round(peaks[name] / peaks["clip"], 3)
        row[f"soft_{name}_used"] = soft_loss.last_target_mode
    return row


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads ({platform.processor() or 'cpu'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernels", nargs="+", choices=LOSS_KERNELS, default=["auto"],
                        help="logits layouts to time (auto = what training uses on this device)")
    parser.add_argument("--targets", nargs="+", choices=TARGET_MODES, default=["auto", "dense"],
                        help="soft-target modes to time (auto = what training uses)")
    parser.add_argument("--labels", choices=("iu", "random"), default="iu")
    parser.add_argument("--iu-reports", type=int, default=None, help="use only the first N bundled IU reports")
    parser.add_argument("--local-loss-batch", type=int, default=0, help="also simulate --local-loss at this global batch")
    parser.add_argument("--world-size", type=int, default=8, help="simulated ranks for --local-loss-batch")
    parser.add_argument("--local-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a busy machine)")
    add_output_arguments(parser, "bench_loss_cpu")
    parser.add_argument("--no-tf32", action="store_true",
                        help="CUDA: keep fp32 matmuls exact (OpenCLIP's trainer allows TF32, so the default does too)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    if args.device == "cuda" and args.out == str(RESULTS_DIR / "bench_loss_cpu.json"):
        args.out = str(RESULTS_DIR / "bench_loss_gpu.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    pools = iu_label_pools(args.iu_reports) if args.labels == "iu" else None
    rows = [measure(b, args.dim, args.repeats, args.device, args.kernels, args.targets, pools)
            for b in args.batch_sizes]
    if args.local_loss_batch:
        rows.append(measure(args.local_loss_batch, args.dim, args.local_repeats, args.device, args.kernels,
                            args.targets, pools, world_size=args.world_size))
    for row in rows:
        print(json.dumps(row))
    names = [f"{kernel}/{mode}" for kernel in args.kernels for mode in args.targets]
    summary = []
    for row in rows:
        where = (f"global {row['global_batch']} on {row['world_size']} simulated ranks, --local-loss, rank 0"
                 if row["local_loss"] else f"B={row['global_batch']}")
        parts = "; ".join(
            f"soft[{name}→{row[f'soft_{name}_used']}] {row[f'soft_{name}_time_ratio']:.2f}x time "
            f"({row[f'soft_{name}_ms']:.1f} ms), {row[f'soft_{name}_memory_ratio']:.2f}x memory "
            f"({row[f'soft_{name}_peak_mib']:.0f} MiB)" for name in names)
        summary.append(f"{where} ({row['distinct_image_labels']}/{row['distinct_text_labels']} distinct image/text "
                       f"label rows): ClipLoss {row['clip_ms']:.1f} ms, {row['clip_peak_mib']:.0f} MiB | {parts}")
    header = (f"SemanticMatchingLoss / ClipLoss forward+backward ({args.labels} labels, median of {args.repeats}, "
              f"{machine(args.device)}):")
    print(header)
    for line in summary:
        print("  " + line)
    if args.device == "cuda" and not args.machine:
        args.machine = machine(args.device)
    write_results(args, {"labels": args.labels, "threads": torch.get_num_threads(),
                         "tf32": args.device == "cuda" and not args.no_tf32, "rows": rows,
                         "summary": [header, *summary]}, argv, __file__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

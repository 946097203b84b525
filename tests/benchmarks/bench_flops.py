"""FLOPs per training sample (forward + backward), texts padded to 77 vs trimmed to each batch's longest vs bucketed.

    python tests/benchmarks/bench_flops.py [--model medclip-swin] [--batch-size 128] [--batches 500]
        [--bucket-pool 16] [--text-multiple auto] [--machine TEXT] [--out PATH | --no-out]

The CPU proxy of issue 15's GPU goal: batches of `--batch-size` sentences drawn (seeded, with replacement) from the
bundled IU reports' labelled sentences, tokenized by the model's tokenizer (Bio_ClinicalBERT's, bundled):
- `padded_77`: every batch 77 tokens wide (OpenCLIP's tokenizer);
- `trimmed`: each batch as wide as its longest text, rounded up to the training stream's multiple for this model
  (`--text-multiple auto`, the stream's own rule `text_width.text_multiple_for`: 1, i.e. exactly the longest text,
  for MedCLIP's reference pooler as in the authors' collator; 8 for masked poolers), at most 77;
- `trimmed_multiple_8`: the same rounded up to a multiple of 8 (shown when the model's multiple is not 8);
- `bucketed`: `--bucket-pool` batches' worth of samples sorted by length and cut into batches (length bucketing),
  then trimmed as `trimmed`;
- `padding_free` (models whose text pooler masks padding, e.g. medclip-swin-masked): the `trimmed` batches run
  through the padding-free text tower (`--medclip-padding-free`): only real tokens pass the linear layers, attention
  is re-padded to the batch width. Its text FLOPs are alpha*length + beta*width^2 + gamma per text (fitted from four
  one-text counts, checked by a direct count of a mixed batch).
FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention): forward + backward
of the image tower, of the text tower per token width, and of the loss at the full batch. Tower FLOPs are linear in
the batch at a fixed width (checked: a batch of 2 counts exactly twice a batch of 1), so each width is counted once
per sample and weighted by how often batches have it. A direct count of one whole trimmed training step (model
with packed labels, SemanticMatchingLoss, backward) must equal the prediction exactly (`direct_check`).
Attention is counted in its eager (matmul) form, which has the same FLOPs as the fused kernels.
Results go to tests/benchmarks/results/bench_flops.json with provenance.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import add_output_arguments, write_results  # noqa: E402

from open_clip_medclip.text_width import token_lengths as row_lengths  # noqa: E402
from open_clip_medclip.text_width import tokenizer_pad_id, trim_tokens, trimmed_width  # noqa: E402

SAMPLE_REPORTS = Path(__file__).resolve().parents[2] / "open_clip_medclip" / "sample_data" / "iu_reports" / \
    "NLMCXR_reports.tgz"


def iu_sentences(max_reports: int | None = None) -> list[str]:
    """Every labelled sentence of the bundled IU reports, as often as it occurs (what training pairs draw)."""
    from open_clip_medclip.knowledge import Labeler
    from open_clip_medclip.sources.reports import iter_reports

    labeler = Labeler()
    sentences = []
    for number, (_, text) in enumerate(iter_reports(SAMPLE_REPORTS)):
        if max_reports is not None and number >= max_reports:
            break
        sentences.extend(s.text for s in labeler.label_report(text).sentences if s.text.strip())
    return sentences


def token_lengths(tokenizer, sentences: list[str]) -> np.ndarray:
    """Tokens per sentence including [CLS]/[SEP], capped at the context length (what the tokenizer keeps)."""
    pad = tokenizer_pad_id(tokenizer)
    lengths = []
    for start in range(0, len(sentences), 1024):
        tokens = tokenizer(sentences[start:start + 1024])
        lengths.append(row_lengths(tokens, pad).numpy())
    return np.concatenate(lengths)


def draw_batches(lengths: np.ndarray, batch_size: int, batches: int, seed: int = 0) -> np.ndarray:
    """(batches, batch_size) token lengths of random training batches (seeded draws with replacement)."""
    rng = np.random.default_rng(seed)
    return lengths[rng.integers(len(lengths), size=(batches, batch_size))]


def batch_widths(drawn: np.ndarray, batch_size: int, context_length: int, bucket_pool: int,
                 multiple: int) -> dict[str, list[int]]:
    batches = len(drawn)
    longest = [int(row.max()) for row in drawn]
    widths = {"padded_77": [context_length] * batches,
              "trimmed": [trimmed_width(n, context_length, multiple) for n in longest]}
    if multiple != 8:
        widths["trimmed_multiple_8"] = [trimmed_width(n, context_length, 8) for n in longest]
    bucketed = []
    for start in range(0, batches, bucket_pool):
        pool = np.sort(drawn[start:start + bucket_pool].reshape(-1))
        bucketed.extend(trimmed_width(int(chunk.max()), context_length, multiple)
                        for chunk in np.split(pool, len(pool) // batch_size))
    widths["bucketed"] = bucketed
    return widths


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
        out.float().sum().backward()
    return int(counter.get_total_flops())


class TowerCounter:
    """Forward+backward FLOPs of the model's towers per sample, counted once per shape."""

    def __init__(self, model, image_size: int) -> None:
        self.model, self.image_size = model, image_size
        self._text: dict[int, int] = {}
        self._image: int | None = None

    def text(self, width: int, batch: int = 1) -> int:
        if batch != 1:
            return self._count_text(width, batch)
        if width not in self._text:
            self._text[width] = self._count_text(width, 1)
        return self._text[width]

    def _count_text(self, width: int, batch: int) -> int:
        return self.packed_text([width] * batch, width)

    def packed_text(self, lengths: list[int], width: int) -> int:
        """Direct count of the text tower (padding-free once switched on) on texts of `lengths` tokens, `width` wide."""
        tokens = torch.zeros(len(lengths), width, dtype=torch.long)
        for row, length in enumerate(lengths):
            tokens[row, :length] = 1000
            tokens[row, 0], tokens[row, length - 1] = 101, 102
        self.model.zero_grad(set_to_none=True)
        return _count(lambda: self.model.encode_text(tokens))

    def image(self, batch: int = 1) -> int:
        if batch != 1:
            return self._count_image(batch)
        if self._image is None:
            self._image = self._count_image(1)
        return self._image

    def _count_image(self, batch: int) -> int:
        images = torch.zeros(batch, 3, self.image_size, self.image_size)
        self.model.zero_grad(set_to_none=True)
        return _count(lambda: self.model.encode_image(images))


class PackedTextCost:
    """Padding-free text-tower FLOPs of one text: alpha*length + beta*width**2 + delta*width + gamma, fitted exactly."""

    def __init__(self, towers: TowerCounter) -> None:
        f = {(length, width): towers.packed_text([length], width) for length, width in ((2, 4), (4, 4), (2, 8), (2, 12))}
        self.alpha = (f[4, 4] - f[2, 4]) // 2
        # f(2,8)-f(2,4) = 48 beta + 4 delta; f(2,12)-f(2,8) = 80 beta + 4 delta
        self.beta = ((f[2, 12] - f[2, 8]) - (f[2, 8] - f[2, 4])) // 32
        self.delta = ((f[2, 8] - f[2, 4]) - 48 * self.beta) // 4
        self.gamma = f[2, 4] - 2 * self.alpha - 16 * self.beta - 4 * self.delta
        self.fit_points = {f"{length}x{width}": count for (length, width), count in f.items()}

    def __call__(self, length: int, width: int) -> int:
        return self.alpha * length + self.beta * width * width + self.delta * width + self.gamma


def loss_flops(model, batch: int) -> int:
    from open_clip_medclip.loss import SemanticMatchingLoss

    dim = model.text.proj.out_features if hasattr(model.text.proj, "out_features") else 512
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, dim, generator=g, requires_grad=True)
    text = torch.randn(batch, dim, generator=g, requires_grad=True)
    labels = torch.zeros(batch, 14)
    labels[:, 0] = 1
    scale = torch.tensor(10.0, requires_grad=True)
    return _count(lambda: SemanticMatchingLoss()(image, text, scale, image_labels=labels, text_labels=labels))


def direct_step_flops(model, tokenizer, sentences: list[str], batch: int, image_size: int,
                      multiple: int) -> tuple[int, int]:
    """(width, FLOPs) of one real trimmed training step: packed labels, passthrough model, soft loss, backward."""
    from open_clip_medclip.plugins import openclip_train

    from open_clip_medclip.labels import pack_batch
    from open_clip_medclip.loss import SemanticMatchingLoss

    tokens = tokenizer(sentences[:batch])
    trimmed = trim_tokens(tokens, multiple, tokenizer_pad_id(tokenizer))
    labels = torch.zeros(batch, 14)
    labels[:, 0] = 1
    texts = pack_batch(trimmed, labels, labels)
    images = torch.zeros(batch, 3, image_size, image_size)
    openclip_train.enable_label_passthrough(model)
    model.zero_grad(set_to_none=True)
    flops = _count(lambda: SemanticMatchingLoss()(**model(images, texts)))
    return trimmed.shape[1], flops


def padding_free_flops(model, towers: TowerCounter, drawn: np.ndarray, widths: list[int], check_batch: int) -> dict:
    """Text FLOPs per sample of the random trimmed batches through the padding-free tower (switched on here)."""
    from open_clip_medclip.plugins.openclip_models import enable_padding_free_text

    enable_padding_free_text(model)
    cost = PackedTextCost(towers)
    per_text = [cost(int(length), width) for row, width in zip(drawn, widths) for length in row]
    check_lengths = [int(n) for n in drawn[0][:check_batch]]
    check_width = max(check_lengths)
    return {
        "text_per_sample": float(np.mean(per_text)),
        "cost_per_text": {"alpha_per_token": cost.alpha, "beta_per_width_squared": cost.beta,
                          "delta_per_width": cost.delta, "gamma": cost.gamma, "fit_points": cost.fit_points},
        "direct_check": {"lengths": check_lengths, "width": check_width,
                         "counted": towers.packed_text(check_lengths, check_width),
                         "predicted": sum(cost(n, check_width) for n in check_lengths)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medclip-swin")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=500, help="batches drawn for the width distribution")
    parser.add_argument("--bucket-pool", type=int, default=16, help="batches per length-sorted bucketing pool")
    parser.add_argument("--iu-reports", type=int, default=None, help="use only the first N bundled IU reports")
    parser.add_argument("--check-batch", type=int, default=4, help="batch of the direct whole-step count")
    parser.add_argument("--text-multiple", default="auto",
                        help="width rounding of trimmed batches; auto: the training stream's rule for --model")
    parser.add_argument("--threads", type=int, default=None)
    add_output_arguments(parser, "bench_flops")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip

    import open_clip_medclip  # noqa: F401  (registers the models)
    from open_clip_medclip.text_width import text_multiple_for, text_pooler_type

    multiple = text_multiple_for(argparse.Namespace(model=args.model, medclip_text_multiple=args.text_multiple))
    if multiple <= 0:
        raise SystemExit(f"bench_flops: {args.model} trains without text trimming (text multiple {multiple})")

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, output_dict=True)
    model.train()
    transformer = getattr(model.text, "transformer", None)
    if transformer is not None and hasattr(transformer, "set_attn_implementation"):
        transformer.set_attn_implementation("eager")  # count attention as matmuls (same FLOPs as SDPA)
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    tokenizer = open_clip.get_tokenizer(args.model)
    context_length = int(tokenizer(["x"]).shape[1])

    sentences = iu_sentences(args.iu_reports)
    lengths = token_lengths(tokenizer, sentences)
    drawn = draw_batches(lengths, args.batch_size, args.batches)
    widths = batch_widths(drawn, args.batch_size, context_length, args.bucket_pool, multiple)

    towers = TowerCounter(model, size)
    linear_width = widths["trimmed"][0]
    linear = {"width": linear_width, "text_batch_1": towers.text(linear_width), "text_batch_2": towers.text(
        linear_width, 2), "image_batch_1": towers.image(), "image_batch_2": towers.image(2)}
    if linear["text_batch_2"] != 2 * linear["text_batch_1"] or linear["image_batch_2"] != 2 * linear["image_batch_1"]:
        raise RuntimeError(f"tower FLOPs are not linear in the batch; per-sample counting would be wrong: {linear}")
    loss_per_sample = loss_flops(model, args.batch_size) / args.batch_size
    image_per_sample = towers.image()

    per_sample, text_per_sample, histograms = {}, {}, {}
    for policy, batch_list in widths.items():
        text = float(np.mean([towers.text(w) for w in batch_list]))
        text_per_sample[policy] = text
        per_sample[policy] = image_per_sample + text + loss_per_sample
        histograms[policy] = dict(sorted(Counter(batch_list).items()))

    check_width, counted = direct_step_flops(model, tokenizer, sentences, args.check_batch, size, multiple)
    predicted = args.check_batch * (towers.image() + towers.text(check_width)) + loss_flops(model, args.check_batch)
    padding_free = None
    if text_pooler_type(model) == "medclip_masked_pooler":
        padding_free = padding_free_flops(model, towers, drawn, widths["trimmed"], args.check_batch)
        text_per_sample["padding_free"] = padding_free.pop("text_per_sample")
        per_sample["padding_free"] = image_per_sample + text_per_sample["padding_free"] + loss_per_sample
        widths["padding_free"] = widths["trimmed"]
        histograms["padding_free"] = histograms["trimmed"]

    ratios = {f"{policy}_over_padded": round(per_sample[policy] / per_sample["padded_77"], 4)
              for policy in widths if policy != "padded_77"}
    ratios.update({f"text_tower_{policy}_over_padded": round(text_per_sample[policy] / text_per_sample["padded_77"], 4)
                   for policy in widths if policy != "padded_77"})
    result = {
        "benchmark": "bench_flops", "model": args.model, "batch_size": args.batch_size, "batches": args.batches,
        "text_multiple": multiple,
        "bucket_pool": args.bucket_pool, "sentences": len(sentences),
        "token_length": {"median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)),
                         "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max())},
        "flops_per_sample": {k: int(v) for k, v in per_sample.items()},
        "gflops_per_sample": {k: round(v / 1e9, 3) for k, v in per_sample.items()},
        "text_tower_gflops_per_sample": {k: round(v / 1e9, 3) for k, v in text_per_sample.items()},
        "image_tower_gflops_per_sample": round(image_per_sample / 1e9, 3),
        "loss_gflops_per_sample": round(loss_per_sample / 1e9, 6),
        "ratios": ratios,
        "mean_width": {k: round(float(np.mean(v)), 2) for k, v in widths.items()},
        "width_histogram": histograms,
        "linearity_check": linear,
        "direct_check": {"batch": args.check_batch, "width": check_width, "counted": counted, "predicted": predicted},
        "padding_free": padding_free or "not applicable: the text pooler averages padding (reference pooler)",
    }
    if padding_free:
        result["mean_tokens_per_text"] = round(float(drawn.mean()), 2)
    print(json.dumps(result))
    g = result["gflops_per_sample"]
    print(f"{args.model}, batches of {args.batch_size} IU sentences (token length median {result['token_length']['median']:.0f}, "
          f"p99 {result['token_length']['p99']:.0f}, max {result['token_length']['max']}): forward+backward GFLOPs per "
          f"sample padded_77 {g['padded_77']:.2f} | trimmed (multiple {multiple}) {g['trimmed']:.2f} "
          f"({ratios['trimmed_over_padded']:.3f}x, mean width {result['mean_width']['trimmed']}) | bucketed {g['bucketed']:.2f} "
          f"({ratios['bucketed_over_padded']:.3f}x, mean width {result['mean_width']['bucketed']}); text tower alone "
          f"{ratios['text_tower_trimmed_over_padded']:.3f}x / {ratios['text_tower_bucketed_over_padded']:.3f}x. "
          f"Direct count of a trimmed step: {'equal' if counted == predicted else 'DIFFERENT'}.")
    exact = counted == predicted
    if padding_free:
        check = padding_free["direct_check"]
        print(f"padding-free text tower: {g['padding_free']:.2f} GFLOPs per sample "
              f"({ratios['padding_free_over_padded']:.3f}x padded, {ratios['text_tower_padding_free_over_padded']:.3f}x "
              f"for the text tower; {result['mean_tokens_per_text']} real tokens per text). Direct count of a mixed "
              f"batch: {'equal' if check['counted'] == check['predicted'] else 'DIFFERENT'}.")
        exact = exact and check["counted"] == check["predicted"]
    write_results(args, result, argv, __file__)
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())

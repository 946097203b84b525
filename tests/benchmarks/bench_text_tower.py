"""Text-tower step time, side by side: texts padded to 77 vs trimmed to each batch's longest (x8) vs padding-free.

    python tests/benchmarks/bench_text_tower.py [--model medclip-swin-masked] [--batch-size 32] [--batches 3]
        [--repeats 2] [--threads N] [--machine TEXT] [--out PATH | --no-out]

The wall-clock companion of bench_flops.py's FLOPs proxy, on whatever device runs it (CPU here): forward + backward
of the text tower alone (`encode_text`, normalised features, a fixed linear read-out as the loss) on the same
random batches of bundled IU sentences, each batch timed in the three layouts in turn (order rotated per repeat so
no layout always runs first). Dropout is off, so every layout computes the same features; the script checks they
agree and prints the time ratios against 77-padding. Needs a model whose pooler masks padding.
Results go to tests/benchmarks/results/bench_text_tower.json with provenance.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_flops import iu_sentences  # noqa: E402
from benchresults import add_output_arguments, write_results  # noqa: E402

from open_clip_medclip.text_width import tokenizer_pad_id, trim_tokens  # noqa: E402

LAYOUTS = ("padded_77", "trimmed", "padding_free")


def _step(model, tokens: torch.Tensor, readout: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    features = model.encode_text(tokens, normalize=True)
    (features * readout).sum().backward()
    return time.perf_counter() - start, features.detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medclip-swin-masked")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="different random batches timed")
    parser.add_argument("--repeats", type=int, default=2, help="timings per batch and layout (after one warm-up)")
    parser.add_argument("--iu-reports", type=int, default=None, help="use only the first N bundled IU reports")
    parser.add_argument("--threads", type=int, default=None)
    add_output_arguments(parser, "bench_text_tower")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip
    from open_clip_medclip.plugins.openclip_models import enable_padding_free_text

    import open_clip_medclip  # noqa: F401  (registers the models)

    def training_model_without_dropout():
        model = open_clip.create_model(args.model)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model.train()

    torch.manual_seed(0)
    padded_model = training_model_without_dropout()
    free_model = training_model_without_dropout()
    free_model.load_state_dict(padded_model.state_dict())
    enable_padding_free_text(free_model)  # refuses models whose pooler averages padding

    tokenizer = open_clip.get_tokenizer(args.model)
    pad = tokenizer_pad_id(tokenizer)
    sentences = iu_sentences(args.iu_reports)
    rng = np.random.default_rng(0)
    batches = [tokenizer([sentences[i] for i in rng.integers(len(sentences), size=args.batch_size)])
               for _ in range(args.batches)]
    layouts = {"padded_77": (padded_model, lambda t: t), "trimmed": (padded_model, lambda t: trim_tokens(t, 8, pad)),
               "padding_free": (free_model, lambda t: trim_tokens(t, 8, pad))}
    dim = padded_model.text.proj.out_features
    readout = torch.linspace(-1, 1, dim)

    seconds = {name: [] for name in LAYOUTS}
    widths, real_tokens, max_difference = [], [], 0.0
    for tokens in batches:
        widths.append(int(layouts["trimmed"][1](tokens).shape[1]))
        real_tokens.append(int((tokens != pad).sum()))
        features = {}
        for name in LAYOUTS:  # warm-up, and the features to compare
            model, layout = layouts[name]
            features[name] = _step(model, layout(tokens), readout)[1]
        max_difference = max(max_difference, *(float((features[n] - features["padded_77"]).abs().max())
                                                for n in LAYOUTS[1:]))
        for repeat in range(args.repeats):
            for name in LAYOUTS[repeat % 3:] + LAYOUTS[:repeat % 3]:
                model, layout = layouts[name]
                seconds[name].append(_step(model, layout(tokens), readout)[0])

    mean = {name: float(np.mean(values)) for name, values in seconds.items()}
    result = {
        "benchmark": "bench_text_tower", "model": args.model, "batch_size": args.batch_size,
        "batches": args.batches, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "mean_width_trimmed": round(float(np.mean(widths)), 2),
        "real_tokens_per_text": round(float(np.mean(real_tokens)) / args.batch_size, 2),
        "seconds_per_step": {name: round(value, 4) for name, value in mean.items()},
        "time_ratio_over_padded": {name: round(mean[name] / mean["padded_77"], 3) for name in LAYOUTS[1:]},
        "padding_free_over_trimmed": round(mean["padding_free"] / mean["trimmed"], 3),
        "max_feature_difference": max_difference,
    }
    print(json.dumps(result))
    ratio = result["time_ratio_over_padded"]
    print(f"{args.model} text tower, forward+backward, batches of {args.batch_size} IU sentences, "
          f"{result['threads']} threads: padded_77 {mean['padded_77']:.3f} s | trimmed {mean['trimmed']:.3f} s "
          f"({ratio['trimmed']:.3f}x, mean width {result['mean_width_trimmed']}) | padding-free "
          f"{mean['padding_free']:.3f} s ({ratio['padding_free']:.3f}x; {result['padding_free_over_trimmed']:.3f}x "
          f"trimmed, {result['real_tokens_per_text']} real tokens per text); features agree to {max_difference:.1e}.")
    write_results(args, result, argv, __file__)
    return 0 if max_difference <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The README's parity and preprocessing figures ("Models" and "Official MedCLIP weights"), as one script.

    python tests/benchmarks/parity_figures.py [--reference DIR] [--out PATH | --no-out] [--machine TEXT]

1. Parity with the authors' code, exactly as tests/models/test_parity.py checks it: the PyPI `medclip` 0.0.3
   package (transformers 4.24.0, in its own pip --target dir: --reference, $MEDCLIP_REFERENCE_PATH, .ref or .ci/ref;
   `bash tests/run.sh` installs it) builds both variants with random weights and saves them; our converter loads
   them; max |diff| of image/text embeddings and logits on two real X-rays and four sentences, token ids, and the
   preprocessing against its MedCLIPProcessor (exact pipeline and OpenCLIP's native 'longest').
2. OpenCLIP's resize-then-pad vs the reference pad-then-resize on a non-square (256x180) real X-ray.
3. What padding does to a text embedding under the unmasked reference pooler: `medclip-swin` (random init, bundled
   Bio_ClinicalBERT config), the four sentences padded to 77 (OpenCLIP) vs to the batch's longest text (the
   authors' collators), and the same with `medclip_masked_pooler`.
Writes tests/benchmarks/results/parity_figures.json. Deterministic (seeded); no timing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import add_output_arguments, write_results  # noqa: E402

from open_clip_medclip.sources import SAMPLE_DATA_DIR  # noqa: E402

SAMPLE = SAMPLE_DATA_DIR


def reference_dir(given: str | None) -> Path | None:
    candidates = [Path(given)] if given else (
        [Path(os.environ["MEDCLIP_REFERENCE_PATH"])] if os.environ.get("MEDCLIP_REFERENCE_PATH")
        else [REPO / ".ref", REPO / ".ci" / "ref"])
    return next((path for path in candidates if (path / "medclip").is_dir() and (path / "transformers").is_dir()),
                None)


def reference_parity(reference: Path) -> dict:
    import open_clip
    import torch

    from open_clip_medclip.models import BUNDLED_TOKENIZER_DIR
    from tests.models.test_parity import IMAGES, REFERENCE_SCRIPT, SENTENCES, parity_diffs, preprocessing_diffs

    images = [SAMPLE / name for name in IMAGES]
    env = {**os.environ, "PYTHONPATH": str(reference), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results = {"images": [str(path.relative_to(REPO)) for path in images], "sentences": SENTENCES}
    for variant, model_name in (("swin", "medclip-swin"), ("resnet50", "medclip-resnet50")):
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, str(REFERENCE_SCRIPT), variant, out, str(BUNDLED_TOKENIZER_DIR),
                                   *map(str, images)], env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise SystemExit(f"{REFERENCE_SCRIPT} {variant} failed:\n{done.stdout}\n{done.stderr[-4000:]}")
            print(done.stdout.strip().splitlines()[-1])
            ref = torch.load(Path(out) / "reference_outputs.pt", weights_only=True)
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(Path(out) / "pytorch_model.bin"))
            diffs = parity_diffs(model, ref)
            tokens_identical = bool(torch.equal(open_clip.get_tokenizer(model_name)(SENTENCES), ref["input_ids"]))
            preprocessing = preprocessing_diffs(model_name, images, ref)
        print(f"{model_name}: max |diff| image {diffs['image']:.2e}, text {diffs['text']:.2e}, logits "
              f"{diffs['logits']:.2e} (scale {ref['logit_scale_used'].exp().item():.1f}); token ids identical: "
              f"{tokens_identical}; preprocessing vs MedCLIPProcessor exact {preprocessing['exact']:.2e}, native "
              f"'longest' {preprocessing['native_longest']:.2e}")
        results[model_name] = {"max_abs_diff_image_embeddings": diffs["image"],
                               "max_abs_diff_text_embeddings": diffs["text"],
                               "max_abs_diff_logits": diffs["logits"],
                               "logit_scale": ref["logit_scale_used"].exp().item(),
                               "token_ids_identical": tokens_identical,
                               "preprocessing_max_abs_diff_exact_pipeline": preprocessing["exact"],
                               "preprocessing_max_abs_diff_native_longest": preprocessing["native_longest"]}
    return results


def non_square_preprocessing() -> dict:
    import open_clip
    from PIL import Image

    import open_clip_medclip

    _, _, native = open_clip.create_model_and_transforms("medclip-tiny", force_image_size=224)
    exact = open_clip_medclip.medclip_image_transform(224)
    path = SAMPLE / "nih_cxr14/images/00000061_015.jpg"
    image = Image.open(path).crop((0, 30, 256, 210))  # 256 x 180, as tests/models/test_preprocess.py
    diff = (exact(image) - native(image)).abs()
    print(f"256x180 X-ray, exact (pad, resize) vs native 'longest' (resize, pad): mean |diff| {diff.mean():.4f}, "
          f"max {diff.max():.4f}")
    return {"image": f"{path.relative_to(REPO)} cropped to (0, 30, 256, 210)", "mean_abs_diff": diff.mean().item(),
            "max_abs_diff": diff.max().item()}


def padding_effect() -> dict:
    import open_clip
    import torch

    from open_clip_medclip.models import MedclipMaskedPooler, MedclipPooler
    from tests.models.test_parity import SENTENCES

    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("medclip-swin")  # random init; unmasked reference pooler
    model.eval()
    tokenizer = open_clip.get_tokenizer("medclip-swin")
    padded = tokenizer(SENTENCES)  # 77
    longest = int((padded != 0).sum(1).max())
    trimmed = padded[:, :longest]  # = padding to the longest text of the batch
    results = {"model": "medclip-swin, random init (seed 0)", "context_77_vs_longest": [77, longest]}
    for name, pooler in (("medclip_pooler", MedclipPooler()), ("medclip_masked_pooler", MedclipMaskedPooler())):
        model.text.pooler = pooler
        with torch.no_grad():
            diff = (model.encode_text(padded, normalize=True) - model.encode_text(trimmed, normalize=True)).abs()
        print(f"{name}: normalised text embeddings, 77-padded vs padded to the longest ({longest}): "
              f"max |diff| {diff.max():.2e}")
        results[f"{name}_max_abs_diff"] = diff.max().item()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=None, help="pip --target dir with medclip 0.0.3 + transformers 4.24")
    add_output_arguments(parser, "parity_figures")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import open_clip_medclip  # noqa: F401  (registers the models)

    reference = reference_dir(args.reference)
    notes = []
    results = {}
    if reference is None:
        message = ("skipped the parity with the authors' code: no reference environment (pass --reference DIR or "
                   "run `bash tests/run.sh` once, which installs it into .ci/ref)")
        print(message)
        notes.append(message)
    else:
        results["reference_parity"] = reference_parity(reference)
    results["non_square_preprocessing"] = non_square_preprocessing()
    results["padding_effect_on_text_embeddings"] = padding_effect()
    write_results(args, results, argv, __file__, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

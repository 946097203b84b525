"""Parity with the authors' code: their random-weight model, saved as they save it, loaded through our converter."""
from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

import open_clip_medclip  # noqa: F401
from open_clip_medclip.models import BUNDLED_TOKENIZER_DIR

REFERENCE_SCRIPT = Path(__file__).resolve().parents[1] / "reference" / "make_reference_outputs.py"
TOLERANCE = 1e-5
SENTENCES = [
    "Heart size normal and lungs are clear.",
    "Left pleural effusion with adjacent atelectasis. Right effusion is also present.",
    "Minimal patchy airspace disease within the lingula, may reflect atelectasis or consolidation.",
    "No pneumothorax.",
]

IMAGES = ("nih_cxr14/images/00000061_015.jpg", "kermany_pediatric/images/normal/IM-0115-0001.jpg")

pytestmark = pytest.mark.reference


def parity_diffs(model: torch.nn.Module, ref: dict) -> dict[str, float]:
    """Max |diff| of our normalised image/text embeddings and logits against the reference outputs.

    Also used by tests/benchmarks/parity_figures.py, which writes the README's parity figures.
    """
    model.eval()
    pixels = ref["pixel_values"].repeat(1, 3, 1, 1)  # the reference repeats 1-channel input inside forward
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(ref["input_ids"], normalize=True)
        logits = model.logit_scale.exp() * image @ text.T
    assert image.shape == (len(pixels), 512) and text.shape == (len(ref["input_ids"]), 512)
    return {
        "image": (image - ref["img_embeds"]).abs().max().item(),
        "text": (text - ref["text_embeds"]).abs().max().item(),
        "logits": (logits - ref["logits"]).abs().max().item(),
    }


def preprocessing_diffs(model_name: str, images: list[Path], ref: dict) -> dict[str, float]:
    """Max |diff| vs the reference MedCLIPProcessor: the exact pipeline and OpenCLIP's native 'longest' mode."""
    from PIL import Image

    exact = torch.stack([open_clip_medclip.medclip_image_transform()(Image.open(p)) for p in images])
    _, _, val_transform = open_clip.create_model_and_transforms(model_name)
    native = torch.stack([val_transform(Image.open(p)) for p in images])
    assert torch.equal(exact[:, 0], exact[:, 2])  # grayscale replicated
    return {"exact": (exact[:, :1] - ref["pixel_values"]).abs().max().item(),
            "native_longest": (native[:, :1] - ref["pixel_values"]).abs().max().item()}


@pytest.fixture(scope="module", params=[("swin", "medclip-swin"), ("resnet50", "medclip-resnet50")], ids=["swin", "resnet50"])
def reference_run(request, medclip_reference, sample_dir, tmp_path_factory):
    variant, model_name = request.param
    out = tmp_path_factory.mktemp(f"reference-{variant}")
    images = [sample_dir / name for name in IMAGES]
    medclip_reference(REFERENCE_SCRIPT, variant, out, BUNDLED_TOKENIZER_DIR, *images)
    return model_name, out, images, torch.load(out / "reference_outputs.pt", weights_only=True)


def test_embeddings_and_logits_match_reference(reference_run):
    model_name, out, _, ref = reference_run
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(out / "pytorch_model.bin"))
    diffs = parity_diffs(model, ref)
    print(f"\n{model_name} parity max |diff|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert all(v <= TOLERANCE for v in diffs.values()), diffs


def test_tokenizer_ids_match_reference(reference_run):
    model_name, _, _, ref = reference_run
    ids = open_clip.get_tokenizer(model_name)(SENTENCES)
    assert torch.equal(ids, ref["input_ids"])


def test_preprocessing_matches_reference_processor(reference_run):
    model_name, _, images, ref = reference_run
    diffs = preprocessing_diffs(model_name, images, ref)
    print(f"\npreprocessing max |diff| vs MedCLIPProcessor: exact {diffs['exact']:.2e}, "
          f"open_clip 'longest' {diffs['native_longest']:.2e}")
    assert diffs["exact"] <= TOLERANCE


def test_convert_to_local_dir_keeps_parity(reference_run, tmp_path):
    from open_clip_medclip.cli import main as medclip_main
    from open_clip_medclip.weights import describe_checkpoint

    model_name, out, _, ref = reference_run
    info = describe_checkpoint(out / "pytorch_model.bin")
    assert info.num_tensors == (434 if model_name == "medclip-swin" else 521)  # tensors in the authors' Swin / ResNet-50 files
    local_dir = tmp_path / "local"
    assert medclip_main(["convert", str(out / "pytorch_model.bin"), "--out", str(local_dir)]) == 0  # model detected
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{local_dir}")
    model.eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{local_dir}")(SENTENCES)
    assert torch.equal(tokens, ref["input_ids"])
    with torch.no_grad():
        image = model.encode_image(ref["pixel_values"].repeat(1, 3, 1, 1), normalize=True)
        text = model.encode_text(tokens, normalize=True)
    assert (image - ref["img_embeds"]).abs().max().item() <= TOLERANCE
    assert (text - ref["text_embeds"]).abs().max().item() <= TOLERANCE

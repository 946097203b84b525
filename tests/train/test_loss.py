"""SemanticMatchingLoss: equals MedCLIP's `_soft_clip_loss`, sane targets, finite in edge cases."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from open_clip_medclip.loss import LabelTolerantClipLoss, SemanticMatchingLoss, create_medclip_loss, label_similarity

REFERENCE_SCRIPT = '''
import json, sys, types
import torch
from medclip.losses import ImageTextContrastiveLoss
cases = json.load(open(sys.argv[1]))
out = []
for case in cases:
    dtype = getattr(torch, case["dtype"])
    logits = torch.tensor(case["logits"], dtype=dtype)
    img_labels = torch.tensor(case["img_labels"], dtype=dtype)
    text_labels = torch.tensor(case["text_labels"], dtype=dtype)
    label_sim = torch.matmul(img_labels, text_labels.T)     # as ImageTextContrastiveLoss.forward does
    loss_fn = ImageTextContrastiveLoss.__new__(ImageTextContrastiveLoss)
    out.append(float(ImageTextContrastiveLoss._soft_clip_loss(loss_fn, logits, label_sim)))
print(json.dumps(out))
'''


def _case(seed: int, batch: int, dim: int = 16, values=(0.0, 1.0), zero_rows: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    choices = torch.tensor(values)
    il = choices[torch.randint(len(values), (batch, 14), generator=g)]
    tl = choices[torch.randint(len(values), (batch, 14), generator=g)]
    il[:zero_rows] = 0
    tl[:zero_rows] = 0
    scale = torch.tensor(1 / 0.07)
    return image, text, scale, il, tl


@pytest.mark.reference
def test_matches_reference_soft_clip_loss(medclip_reference, tmp_path: Path):
    cases = [_case(0, 8), _case(1, 32, values=(0.0, 1.0, -1.0)), _case(2, 16, zero_rows=5), _case(3, 100)]
    ours, payload = [], []
    for image, text, scale, il, tl in cases:
        loss = SemanticMatchingLoss()(image, text, scale, image_labels=il, text_labels=tl)
        ours.append(float(loss))
        logits = (scale * image @ text.T).tolist()
        payload.append({"logits": logits, "img_labels": il.tolist(), "text_labels": tl.tolist(), "dtype": "float32"})
    # float64 labels, as MedCLIP's collator produces: the reference then computes in float64
    image, text, scale, il, tl = cases[0]
    payload.append({"logits": (scale * image @ text.T).tolist(), "img_labels": il.tolist(),
                    "text_labels": tl.tolist(), "dtype": "float64"})
    ours.append(ours[0])
    (tmp_path / "cases.json").write_text(json.dumps(payload))
    (tmp_path / "ref.py").write_text(REFERENCE_SCRIPT)
    result = medclip_reference(tmp_path / "ref.py", tmp_path / "cases.json")
    reference = json.loads(result.stdout.strip().splitlines()[-1])
    for mine, theirs in zip(ours, reference, strict=True):
        assert abs(mine - theirs) <= 1e-6, (mine, theirs)


def test_soft_loss_formula_and_targets():
    image, text, scale, il, tl = _case(4, 6)
    loss = SemanticMatchingLoss()(image, text, scale, image_labels=il, text_labels=tl)
    logits = scale * image @ text.T
    sim = il @ tl.T
    expected = (-(sim.softmax(1) * logits.log_softmax(1)).sum() / 6 - (sim.T.softmax(1) * logits.T.log_softmax(1)).sum() / 6) / 2
    assert torch.allclose(loss, expected, atol=1e-6)


def test_cosine_similarity_and_temperature():
    il = torch.tensor([[1.0, 1.0] + [0.0] * 12, [0.0] * 14])
    tl = torch.tensor([[1.0] + [0.0] * 13, [0.0, 1.0] + [0.0] * 12])
    cos = label_similarity(il, tl, "cosine")
    assert torch.allclose(cos, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 0.0]]))
    loss = SemanticMatchingLoss(label_similarity="cosine", temperature=0.5)
    target_image, _ = loss.soft_targets(il, tl)
    assert torch.allclose(target_image[1], torch.tensor([0.5, 0.5]))  # all-zero row -> uniform, not NaN
    with pytest.raises(ValueError, match="label similarity"):
        SemanticMatchingLoss(label_similarity="jaccard")


def test_identity_targets_reduce_to_clip_loss():
    """With one-hot, distinct labels and a sharp temperature the soft loss becomes InfoNCE."""
    image, text, scale, _, _ = _case(5, 10)
    labels = torch.eye(10, 14)
    soft = SemanticMatchingLoss(temperature=1e-4)(image, text, scale, image_labels=labels, text_labels=labels)
    hard = ClipLoss()(image, text, scale)
    assert torch.allclose(soft, hard, atol=1e-5)


def test_clip_mode_ignores_labels_and_equals_clip_loss():
    image, text, scale, il, tl = _case(6, 8)
    out = LabelTolerantClipLoss()(image, text, scale, image_labels=il, text_labels=tl, output_dict=True)
    assert torch.allclose(out["contrastive_loss"], ClipLoss()(image, text, scale))


def test_finite_for_zero_labels_and_bf16_autocast():
    image, text, scale, il, tl = _case(7, 8, zero_rows=8)
    image.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SemanticMatchingLoss(label_similarity="cosine")(
            image.bfloat16(), text.bfloat16(), scale, image_labels=il, text_labels=tl, output_dict=True)
    loss = out["semantic_matching_loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(image.grad).all()


def test_missing_labels_is_a_clear_error():
    image, text, scale, _, _ = _case(8, 4)
    with pytest.raises(ValueError, match="--medclip-loss clip"):
        SemanticMatchingLoss()(image, text, scale)


def test_create_medclip_loss_from_args():
    from types import SimpleNamespace

    args = SimpleNamespace(local_loss=False, gather_with_grad=False, rank=0, world_size=1, horovod=False,
                           medclip_loss="soft", medclip_label_similarity="cosine", medclip_label_temperature=2.0)
    loss = create_medclip_loss(args)
    assert isinstance(loss, SemanticMatchingLoss) and loss.label_similarity == "cosine" and loss.temperature == 2.0
    args.medclip_loss = "clip"
    assert isinstance(create_medclip_loss(args), LabelTolerantClipLoss)


@pytest.mark.parametrize("similarity,temperature", [("dot", 1.0), ("cosine", 0.3)])
def test_row_and_square_kernels_agree_in_value_and_gradient(similarity, temperature):
    """`rows` (what GPUs run) and `square` (what CPUs run) are the same loss, gradients included."""
    results = {}
    for kernel in ("rows", "square"):
        image, text, scale, il, tl = _case(9, 24, values=(0.0, 1.0, -1.0), zero_rows=3)
        image.requires_grad_(True)
        text.requires_grad_(True)
        scale.requires_grad_(True)
        loss = SemanticMatchingLoss(label_similarity=similarity, temperature=temperature, kernel=kernel)(
            image, text, scale, image_labels=il, text_labels=tl)
        loss.backward()
        results[kernel] = (loss.detach(), image.grad, text.grad, scale.grad)
    for rows, square in zip(results["rows"], results["square"], strict=True):
        assert torch.allclose(rows, square, atol=1e-6, rtol=1e-5)
    # and both equal autograd through the plain formula
    image, text, scale, il, tl = _case(9, 24, values=(0.0, 1.0, -1.0), zero_rows=3)
    image.requires_grad_(True)
    sim = label_similarity(il, tl, similarity) / temperature
    logits = scale * image @ text.T
    expected = (F.cross_entropy(logits, sim.softmax(1)) + F.cross_entropy(logits.T, sim.T.softmax(1))) / 2
    expected.backward()
    assert torch.allclose(results["rows"][0], expected.detach(), atol=1e-6)
    assert torch.allclose(results["rows"][1], image.grad, atol=1e-6)


def test_kernel_choice():
    image, text, scale, il, tl = _case(10, 4)
    assert not SemanticMatchingLoss()._row_layout(image)  # CPU: one square matrix
    assert SemanticMatchingLoss(kernel="rows")._row_layout(image)
    assert SemanticMatchingLoss(local_loss=True, world_size=2)._row_layout(image)  # local loss is rectangular
    with pytest.raises(ValueError, match="local_loss"):
        SemanticMatchingLoss(kernel="square", local_loss=True, world_size=2)._row_layout(image)
    with pytest.raises(ValueError, match="loss kernel"):
        SemanticMatchingLoss(kernel="fused")

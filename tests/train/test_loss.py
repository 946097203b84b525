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
    cases = [_case(0, 8), _case(1, 32, values=(0.0, 1.0, -1.0)), _case(2, 16, zero_rows=5), _case(3, 100),
             _repeated_rows_case(17, 64)]  # the last one runs the grouped targets (few distinct label rows)
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


def _repeated_rows_case(seed: int, batch: int, values=(0.0, 1.0, -1.0), pools=(6, 5)):
    """Features plus label vectors drawn from a few distinct rows, as real batches are (few findings per sentence)."""
    image, text, scale, _, _ = _case(seed, batch)
    g = torch.Generator().manual_seed(seed + 100)
    choices = torch.tensor(values)
    image_pool = choices[torch.randint(len(values), (pools[0], 14), generator=g)]
    text_pool = choices[torch.randint(len(values), (pools[1], 14), generator=g)]
    il = image_pool[torch.randint(pools[0], (batch,), generator=g)]
    tl = text_pool[torch.randint(pools[1], (batch,), generator=g)]
    il[:2] = 0
    return image, text, scale, il, tl


def _value_and_grads(loss_fn, image, text, scale, il, tl, **kwargs):
    image, text, scale = (t.clone().requires_grad_(True) for t in (image, text, scale))
    loss = loss_fn(image, text, scale, image_labels=il, text_labels=tl, **kwargs)
    loss.backward()
    return loss.detach(), image.grad, text.grad, scale.grad


@pytest.mark.parametrize("kernel", ["rows", "square"])
@pytest.mark.parametrize("similarity,temperature,values,bias", [
    ("dot", 1.0, (0.0, 1.0, -1.0), None),
    ("cosine", 0.3, (0.0, 1.0), None),
    ("dot", 0.5, (0.0, 1.0), -2.5),          # logit bias cancels in the grouped correction
    ("dot", 1.0, (0.0, 0.5, 1.0), None),      # non-integer labels: the generic distinct-rows path
])
def test_grouped_targets_equal_dense_targets_and_the_formula(kernel, similarity, temperature, values, bias):
    """The grouped targets (no B×B target matrix) give the dense loss, gradients included, and the plain formula."""
    case = _repeated_rows_case(12, 40, values)
    bias = None if bias is None else torch.tensor(bias)
    results = {}
    for mode in ("dense", "grouped"):
        loss_fn = SemanticMatchingLoss(label_similarity=similarity, temperature=temperature, kernel=kernel, targets=mode)
        results[mode] = _value_and_grads(loss_fn, *case, logit_bias=bias)
        assert loss_fn.last_target_mode == mode
    image, text, scale, il, tl = (t.clone() for t in case)
    image.requires_grad_(True)
    text.requires_grad_(True)
    sim = label_similarity(il, tl, similarity) / temperature
    logits = scale * image @ text.T + (0 if bias is None else bias)
    expected = (F.cross_entropy(logits, sim.softmax(1)) + F.cross_entropy(logits.T, sim.T.softmax(1))) / 2
    expected.backward()
    for dense, grouped in zip(results["dense"], results["grouped"], strict=True):
        assert torch.allclose(dense, grouped, atol=2e-6, rtol=1e-5)
    assert abs(float(results["grouped"][0]) - float(expected.detach())) <= 2e-6
    assert torch.allclose(results["grouped"][1], image.grad, atol=1e-6)
    assert torch.allclose(results["grouped"][2], text.grad, atol=1e-6)


def test_auto_targets_group_repeated_labels_and_fall_back_for_distinct_rows():
    loss_fn = SemanticMatchingLoss()
    image, text, scale, il, tl = _repeated_rows_case(13, 64)
    loss_fn(image, text, scale, image_labels=il, text_labels=tl)
    assert loss_fn.last_target_mode == "grouped"
    image, text, scale, il, tl = _case(14, 64)  # random 0/1 rows: nearly all distinct
    loss_fn(image, text, scale, image_labels=il, text_labels=tl)
    assert loss_fn.last_target_mode == "dense"
    with pytest.raises(ValueError, match="soft-target mode"):
        SemanticMatchingLoss(targets="sparse")


def _simulate_rank(monkeypatch, rank: int, world: int, image, text, il, tl):
    """Gathers of a `world`-rank run seen from `rank`, in one process (same semantics as ClipLoss' gather_features)."""
    import open_clip_medclip.loss as medclip_loss

    local = image.shape[0] // world

    def gather(image_features, text_features, local_loss=False, gather_with_grad=False, rank=0, world_size=1, **_):
        out = []
        for mine, everyone in ((image_features, image), (text_features, text)):
            parts = list(everyone.detach().split(local))
            if gather_with_grad or not local_loss:
                parts[rank] = mine
            out.append(torch.cat(parts))
        return tuple(out)

    def gather_labels(labels, _world_size, _use_horovod):
        everyone = il if labels.data_ptr() == il[rank * local:].data_ptr() else tl
        return everyone

    monkeypatch.setattr(medclip_loss, "gather_features", gather)
    monkeypatch.setattr(medclip_loss, "_all_gather_nograd", gather_labels)
    rows = slice(rank * local, (rank + 1) * local)
    return image[rows], text[rows], il[rows], tl[rows]


@pytest.mark.parametrize("local_loss", [True, False])
def test_grouped_targets_under_simulated_ranks_equal_dense_and_the_global_loss(monkeypatch, local_loss):
    world = 3
    image, text, scale, il, tl = _repeated_rows_case(15, 36)
    reference = float(SemanticMatchingLoss(targets="dense")(image, text, scale, image_labels=il, text_labels=tl))
    losses = []
    for rank in range(world):
        img, txt, rank_il, rank_tl = _simulate_rank(monkeypatch, rank, world, image, text, il, tl)
        results = {}
        for mode in ("dense", "grouped"):
            loss_fn = SemanticMatchingLoss(targets=mode, local_loss=local_loss, rank=rank, world_size=world)
            results[mode] = _value_and_grads(loss_fn, img, txt, scale, rank_il, rank_tl)
        for dense, grouped in zip(results["dense"], results["grouped"], strict=True):
            assert torch.allclose(dense, grouped, atol=2e-6, rtol=1e-5)
        losses.append(float(results["grouped"][0]))
    if local_loss:
        assert abs(sum(losses) / world - reference) <= 2e-6  # DDP averages the per-rank losses
    else:
        assert all(abs(loss - reference) <= 2e-6 for loss in losses)


def _saved_bytes(loss_fn, image, text, scale, il, tl, soft: bool = True) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one loss call."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    image, text, scale = (t.clone().requires_grad_(True) for t in (image, text, scale))
    inputs = {t.untyped_storage().data_ptr() for t in (image, text, scale)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if soft:
            loss_fn(image, text, scale, image_labels=il, text_labels=tl)
        else:
            loss_fn(image, text, scale)
    return sum(size for key, size in storages.items() if key not in inputs)


@pytest.mark.parametrize("kernel", ["rows", "square"])
def test_grouped_targets_keep_no_batch_squared_matrix_beyond_clip_loss(kernel):
    """Memory: the grouped soft loss saves what ClipLoss saves (± small B×D terms); dense targets add B×B ones."""
    batch = 512
    case = _repeated_rows_case(16, batch, pools=(20, 8))
    clip = _saved_bytes(ClipLoss(), *case, soft=False)
    grouped = _saved_bytes(SemanticMatchingLoss(kernel=kernel, targets="grouped"), *case)
    dense = _saved_bytes(SemanticMatchingLoss(kernel=kernel, targets="dense"), *case)
    matrix, features = batch * batch * 4, batch * 16 * 4
    assert grouped <= clip + 4 * features  # a few B×D feature-sized tensors at most
    target_matrices = 2 if kernel == "rows" else 1
    assert dense >= grouped - 4 * features + target_matrices * matrix

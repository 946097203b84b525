"""Under 2-process gloo DDP the loss and gradients equal 1 process on the global batch; the launcher trains."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from open_clip_medclip.loss import SemanticMatchingLoss

WORLD = 2
LOCAL_BATCH = 6


def _global_inputs():
    g = torch.Generator().manual_seed(11)
    image = F.normalize(torch.randn(WORLD * LOCAL_BATCH, 16, generator=g), dim=-1)
    text = F.normalize(torch.randn(WORLD * LOCAL_BATCH, 16, generator=g), dim=-1)
    il = torch.randint(2, (WORLD * LOCAL_BATCH, 14), generator=g).float()
    tl = torch.randint(2, (WORLD * LOCAL_BATCH, 14), generator=g).float()
    il[0] = 0  # an all-zero row on rank 0
    return image, text, il, tl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, settings: list, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    image, text, il, tl = _global_inputs()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = []
    for local_loss, gather_with_grad in settings:
        img = image[rows].clone().requires_grad_(True)
        txt = text[rows].clone().requires_grad_(True)
        scale = torch.tensor(10.0, requires_grad=True)
        loss_fn = SemanticMatchingLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                       world_size=WORLD)
        loss = loss_fn(img, txt, scale, image_labels=il[rows], text_labels=tl[rows])
        loss.backward()
        results.append({"loss": loss.item(), "image_grad": img.grad.tolist(), "text_grad": txt.grad.tolist()})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path: Path):
    settings = [(False, True), (True, True), (False, False)]
    mp.spawn(_worker, args=(_free_port(), settings, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    image, text, il, tl = _global_inputs()
    image.requires_grad_(True)
    text.requires_grad_(True)
    reference = SemanticMatchingLoss()(image, text, torch.tensor(10.0), image_labels=il, text_labels=tl)
    reference.backward()

    for index, (local_loss, gather_with_grad) in enumerate(settings):
        losses = [ranks[r][index]["loss"] for r in range(WORLD)]
        if local_loss:
            assert abs(sum(losses) / WORLD - reference.item()) <= 1e-6  # DDP averages the per-rank losses
        else:
            assert all(abs(loss - reference.item()) <= 1e-6 for loss in losses)
        if not gather_with_grad:
            continue  # without gathered gradients each rank only sees its own features' share (upstream ClipLoss too)
        for r in range(WORLD):
            rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
            # DDP averages parameter gradients over ranks, i.e. divides the summed feature gradients by WORLD
            image_grad = torch.tensor(ranks[r][index]["image_grad"]) / WORLD
            text_grad = torch.tensor(ranks[r][index]["text_grad"]) / WORLD
            assert torch.allclose(image_grad, image.grad[rows], atol=1e-6), (local_loss, r)
            assert torch.allclose(text_grad, text.grad[rows], atol=1e-6), (local_loss, r)


def _frozen_tiny_model():
    """medclip-tiny with dropout off and BatchNorm frozen: per-rank batch statistics would differ otherwise."""
    import open_clip
    from open_clip_medclip.plugins import openclip_train
    from timm.layers import freeze_batch_norm_2d

    import open_clip_medclip  # noqa: F401

    torch.manual_seed(0)
    model = open_clip.create_model("medclip-tiny", output_dict=True)
    model.visual = freeze_batch_norm_2d(model.visual)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return openclip_train.enable_label_passthrough(model)


def _model_batch():
    import open_clip

    from open_clip_medclip.labels import pack_batch

    g = torch.Generator().manual_seed(5)
    tokens = open_clip.get_tokenizer("medclip-tiny")([f"finding number {i} in the lung ." for i in range(8)])
    il, tl = torch.randint(2, (8, 14), generator=g).float(), torch.randint(2, (8, 14), generator=g).float()
    texts = pack_batch(tokens, il, tl)
    return torch.randn(8, 3, 128, 128, generator=g), texts


def _model_worker(rank: int, port: int, local_loss: bool, out_dir: str) -> None:
    from open_clip_medclip.plugins.trainer_shims import CpuFriendlyDDP
    from safetensors.torch import save_file

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    model = CpuFriendlyDDP(_frozen_tiny_model(), device_ids=[torch.device("cpu")])
    images, texts = _model_batch()
    rows = slice(rank * 4, (rank + 1) * 4)
    loss_fn = SemanticMatchingLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=WORLD)
    loss = loss_fn(**model(images[rows], texts[rows]))
    loss.backward()
    grads = {name: p.grad.contiguous() for name, p in model.module.named_parameters() if p.grad is not None}
    grads["__loss__"] = loss.detach().reshape(1)
    save_file(grads, os.path.join(out_dir, f"model_rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.mark.parametrize("local_loss", [pytest.param(False, id="global-loss"),
                                        pytest.param(True, id="local-loss", marks=pytest.mark.slow)])
def test_ddp_model_gradients_equal_one_process(tmp_path: Path, local_loss: bool):
    """The whole stack (label passthrough, CPU-DDP shim, gathered soft loss, DDP gradient averaging)."""
    from safetensors.torch import load_file

    mp.spawn(_model_worker, args=(_free_port(), local_loss, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"model_rank{r}.safetensors")) for r in range(WORLD)]
    model = _frozen_tiny_model()
    images, texts = _model_batch()
    loss = SemanticMatchingLoss()(**model(images, texts))
    loss.backward()
    rank_losses = [float(r.pop("__loss__")) for r in ranks]
    mean_loss = sum(rank_losses) / WORLD
    assert abs(mean_loss - loss.item()) <= 1e-6
    checked = 0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        for r in range(WORLD):  # DDP leaves the same averaged gradient on every rank
            # 1e-6 absolute, plus float32 rounding of sums over a different batch split (worst seen: 2.2e-6 on a
            # 0.05 token-type-embedding gradient summed over 616 token positions)
            assert torch.allclose(ranks[r][name], param.grad, atol=1e-6, rtol=1e-4), (name, r)
        checked += 1
    assert checked > 20


def _torchrun_launcher(tmp_path: Path, shards: str, extra: list[str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "open_clip_medclip.train", "--",
        "--model", "medclip-tiny", "--train-data", shards, "--batch-size", "2", "--workers", "1",
        "--epochs", "1", "--device", "cpu", "--precision", "fp32", "--warmup", "1", "--lr", "1e-4",
        "--log-every-n-steps", "1", "--logs", str(tmp_path), "--name", "ddp", "--seed", "0",
        "--dist-backend", "gloo", "--train-num-samples", "8", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("extra", [pytest.param([], marks=pytest.mark.slow, id="global"),
                                   pytest.param(["--local-loss", "--gather-with-grad", "--accum-freq", "2"],
                                                id="local-accum2")])
def test_torchrun_two_process_cpu_training(tmp_path: Path, real_shards, extra):
    """2-process gloo training on shards built from the bundled real sample (NIH images, IU sentences)."""
    extra = [*extra, "--medclip-bank-data", real_shards["iu_brace"]]
    result = _torchrun_launcher(tmp_path, real_shards["nih_brace"], extra)
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / "ddp" / "out.log").read_text()
    assert "Semantic_matching_loss" in log
    assert "world_size: 2" in (tmp_path / "ddp" / "params.txt").read_text()
    assert (tmp_path / "ddp" / "checkpoints" / "epoch_1.pt").exists()
    stats = [json.loads(line) for line in (tmp_path / "ddp" / "medclip_throughput.jsonl").read_text().splitlines()]
    assert stats[-1]["samples"] == 8 and 0 <= stats[-1]["data_wait_fraction"] <= 1

"""The launcher inside OpenCLIP's trainer: accumulation, overfitting, resume, checkpoints, host checks, autoload."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip_medclip.plugins import openclip_train

import open_clip_medclip  # noqa: F401
from open_clip_medclip import train as medclip_train
from open_clip_medclip.errors import UserError
from open_clip_medclip.labels import pack_batch
from open_clip_medclip.loss import SemanticMatchingLoss

REPO = Path(__file__).resolve().parents[2]


def _tiny_model(seed: int = 0):
    """medclip-tiny with label passthrough, dropout off and BatchNorm frozen, so batch splits don't change maths."""
    from timm.layers import freeze_batch_norm_2d

    torch.manual_seed(seed)
    model = open_clip.create_model("medclip-tiny", output_dict=True)
    model.visual = freeze_batch_norm_2d(model.visual)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    openclip_train.enable_label_passthrough(model)
    return model


def _fixed_batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokenizer = open_clip.get_tokenizer("medclip-tiny")
    sentences = ["the heart is enlarged .", "no acute disease .", "small left effusion .", "right lower lobe pneumonia ."]
    tokens = tokenizer([sentences[i % 4] + f" case {i}" for i in range(n)])
    il = torch.randint(2, (n, 14), generator=g).float()
    tl = torch.randint(2, (n, 14), generator=g).float()
    texts = pack_batch(tokens, il, tl)
    images = torch.randn(n, 3, 128, 128, generator=g)
    return images, texts


class _Loader(list):
    def __init__(self, batches):
        super().__init__(batches)
        self.num_batches = len(batches)
        self.num_samples = sum(len(b[0]) for b in batches)


def _trainer_args(accum_freq: int, batch_size: int):
    from open_clip_train.params import parse_args

    args = parse_args(["--model", "medclip-tiny", "--device", "cpu", "--precision", "fp32"])
    args.device, args.accum_freq, args.batch_size = "cpu", accum_freq, batch_size
    args.distill, args.rank, args.world_size, args.local_rank = False, 0, 1, 0
    args.skip_scheduler, args.wandb = True, False
    return args


def test_accum_freq_two_equals_one_big_batch():
    from open_clip_train.data import DataInfo
    from open_clip_train.train import train_one_epoch

    images, texts = _fixed_batch(8)
    results = []
    for accum_freq, batches in ((1, [(images, texts)]), (2, [(images[:4], texts[:4]), (images[4:], texts[4:])])):
        model = _tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        args = _trainer_args(accum_freq, len(batches[0][0]))
        train_one_epoch(model, {"train": DataInfo(_Loader(batches))}, SemanticMatchingLoss(), 0, optimizer, None,
                        None, None, args)
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    start = _tiny_model().state_dict()
    moved = 0
    for key, value in results[0].items():
        if key == "logit_scale":
            continue
        assert torch.allclose(value, results[1][key], atol=1e-6, rtol=0), key
        moved += int(not torch.equal(value, start[key]))
    assert moved > 10  # the step really updated the towers
    # Upstream train_one_epoch backpropagates logit_scale once per micro-batch, so its gradient is accum_freq
    # times the big-batch one (the same holds for OpenCLIP's own ClipLoss); the towers match exactly.
    big_step = results[0]["logit_scale"] - start["logit_scale"]
    accum_step = results[1]["logit_scale"] - start["logit_scale"]
    assert torch.allclose(accum_step, 2 * big_step, atol=1e-6)


def _overfit_steps(max_steps: int = 100) -> tuple[float, float, int]:
    """Steps until the reducible part of the soft loss (loss minus target entropy) halves on a fixed batch."""
    model = _tiny_model(1)
    model.train()
    images, texts = _fixed_batch(8, seed=1)
    loss_fn = SemanticMatchingLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(images, texts)
    target_image, target_text = loss_fn.soft_targets(out["image_labels"], out["text_labels"])
    entropy = lambda t: -(t * t.clamp_min(1e-12).log()).sum(1).mean()  # noqa: E731
    floor = float((entropy(target_image) + entropy(target_text)) / 2)
    first = None
    for step in range(1, max_steps + 1):
        out = model(images, texts)
        loss = loss_fn(**out)
        if first is None:
            first = float(loss)
        if float(loss) - floor <= (first - floor) / 2:
            return first - floor, float(loss) - floor, step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return first - floor, float(loss) - floor, max_steps + 1


def test_tiny_config_overfits_a_fixed_batch():
    initial_gap, final_gap, steps = _overfit_steps()
    assert steps <= 100, (initial_gap, final_gap)
    assert final_gap <= initial_gap / 2


def _launch(tmp_path: Path, shards: str, name: str, *extra: str):
    argv = ["--model", "medclip-tiny", "--train-data", shards, "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--precision", "fp32", "--warmup", "1", "--lr", "1e-4", "--log-every-n-steps", "1",
            "--logs", str(tmp_path), "--name", name, "--seed", "0", "--train-num-samples", "12", *extra]
    assert medclip_train.main(argv) == 0
    return tmp_path / name


def _logged_steps(log_dir: Path) -> list[tuple[int, float, float]]:
    """(epoch, lr, loss) per logged step from open_clip_train's out.log."""
    pattern = re.compile(r"Train Epoch: (\d+) .*LR: ([0-9.]+) .*Semantic_matching_loss: ([0-9.]+)")
    return [(int(m[1]), float(m[2]), float(m[3])) for m in pattern.finditer((log_dir / "out.log").read_text())]


def test_launcher_trains_resumes_and_writes_plain_checkpoints(tmp_path: Path, small_shards, capsys):
    # an uninterrupted 2-epoch run, and a run resumed from its epoch-1 checkpoint (as after a crash)
    straight = _launch(tmp_path, small_shards["all"], "straight", "--epochs", "2", "--save-frequency", "1")
    resumed = _launch(tmp_path, small_shards["all"], "resumed", "--epochs", "2",
                      "--resume", str(straight / "checkpoints" / "epoch_1.pt"))
    summary = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    assert summary["checkpoints"] == [str(resumed / "checkpoints" / "epoch_2.pt")]

    straight_steps, resumed_steps = _logged_steps(straight), _logged_steps(resumed)
    assert [s[0] for s in straight_steps] == [0, 0, 0, 1, 1, 1]
    assert [s[0] for s in resumed_steps] == [1, 1, 1]  # the step count continues at epoch 1 ...
    assert [s[1] for s in resumed_steps] == [s[1] for s in straight_steps[3:]]  # ... with the same LR schedule
    # ... and the loss curve continues exactly: per-epoch seeds make epoch 1 identical with or without the restart
    assert [s[2] for s in resumed_steps] == [s[2] for s in straight_steps[3:]]

    # plain OpenCLIP checkpoint: strict load into a freshly created model
    model = open_clip.create_model("medclip-tiny", pretrained=str(resumed / "checkpoints" / "epoch_2.pt"))
    assert type(model).__name__ == "CustomTextCLIP"
    stats = [json.loads(line) for line in (straight / "medclip_throughput.jsonl").read_text().splitlines()]
    assert [s["epoch"] for s in stats] == [0, 1] and all(s["samples_per_second"] > 0 for s in stats)
    assert "medclip_loss: soft" in (straight / "params.txt").read_text()


def test_clip_baseline_on_the_same_streams(tmp_path: Path, small_shards):
    import logging

    watched = (logging.getLogger(), logging.getLogger("torch._dynamo"), logging.getLogger("open_clip"))
    before = [(logger.level, list(logger.handlers)) for logger in watched]
    log_dir = _launch(tmp_path, small_shards["all"], "clip", "--epochs", "1", "--medclip-loss", "clip")
    assert "Contrastive_loss" in (log_dir / "out.log").read_text()
    # the host's setup_logging re-levels every logger and adds root handlers: all undone after the run
    assert [(logger.level, list(logger.handlers)) for logger in watched] == before


def test_patches_are_restored_after_a_run():
    import open_clip_train.main as host_main

    before = (host_main.parse_args, host_main.get_data, host_main.create_loss, torch.nn.parallel.DistributedDataParallel)
    with pytest.raises(UserError, match="unrecognized arguments: --no-such-flag"):
        medclip_train.main(["--model", "medclip-tiny", "--no-such-flag"])
    # a failure inside the run restores them too (since issue 24 the missing x.tar is refused inside the
    # patched parse_args, before the log path's ValueError)
    with pytest.raises((ValueError, UserError)):
        medclip_train.main(["--model", "medclip-tiny", "--train-data", "x.tar", "--device", "cpu",
                            "--dataset-type", "webdataset", "--logs", "/nonexistent/\0"])
    after = (host_main.parse_args, host_main.get_data, host_main.create_loss, torch.nn.parallel.DistributedDataParallel)
    assert before == after


def test_help_lists_medclip_and_openclip_flags(capsys):
    assert medclip_train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--medclip-loss" in out and "--accum-freq" in out


def test_host_check_names_a_missing_attribute(monkeypatch):
    import open_clip_train.main as host_main

    monkeypatch.delattr(host_main, "create_loss")
    with pytest.raises(openclip_train.HostMismatchError, match="open_clip_train.main.create_loss"):
        openclip_train.check_host()


def test_passthrough_adds_no_state_and_leaves_plain_text_alone():
    model = open_clip.create_model("medclip-tiny", output_dict=True)
    keys = set(model.state_dict())
    openclip_train.enable_label_passthrough(model)
    assert set(model.state_dict()) == keys and isinstance(model, open_clip.CustomTextCLIP)
    model.eval()
    images, texts = _fixed_batch(2)
    packed = model(images, texts)
    plain = model(images, texts[:, :77])  # the token columns alone
    assert torch.allclose(packed["text_features"], plain["text_features"]) and "image_labels" not in plain
    assert packed["image_labels"].shape == (2, 14)


def test_autoload_registers_models_for_plain_open_clip(tmp_path: Path):
    from open_clip_medclip import autoload

    files = autoload.install_autoload(str(tmp_path))
    assert all(Path(f).exists() for f in files)
    code = ("import site, sys; site.addsitedir(sys.argv[1]); assert 'torch' not in sys.modules; "
            "import open_clip; print('medclip-tiny' in open_clip.list_models())")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=120, cwd=tmp_path)
    assert result.stdout.strip().endswith("True"), result.stderr[-2000:]
    assert autoload.uninstall_autoload(str(tmp_path)) == files


def test_single_process_training_on_real_shards(tmp_path: Path, real_shards):
    data = f"{real_shards['nih_brace']}::{real_shards['iu_brace']}"
    log_dir = _launch(tmp_path, data, "real", "--epochs", "1", "--dataset-resampled",
                      "--train-data-upsampling-factors", "1::1")
    steps = _logged_steps(log_dir)
    assert len(steps) == 3 and all(0 < s[2] < 50 for s in steps)


def test_zero_shot_hooks_run_without_val_data(tmp_path: Path, small_shards):
    calls = []

    def hook(model, data, epoch, args, tokenizer=None):
        calls.append((type(model).__name__, epoch, tokenizer is not None))
        return {"medclip-test-zeroshot-acc": 0.25}

    openclip_train.register_zero_shot_eval(hook)
    try:
        log_dir = _launch(tmp_path, small_shards["all"], "zs", "--epochs", "1")
    finally:
        openclip_train.unregister_zero_shot_eval(hook)
    assert calls == [("MedclipCustomTextCLIP", 1, True)]
    results = [json.loads(line) for line in (log_dir / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert results[-1]["medclip-test-zeroshot-acc"] == 0.25


def test_suite_zero_shot_runs_inside_training(tmp_path: Path, small_shards):
    from open_clip_medclip.eval.suites.build import build_suite
    from open_clip_medclip.eval.suites.definitions import load_definition

    definition = load_definition("nih-pneumonia")
    definition["name"] = "nih-train-tiny"
    definition["recipe"] = {**definition["recipe"], "max_test_per_class": 4, "max_train_per_class": 4}
    suite = tmp_path / "suite"
    build_suite(definition, "sample", suite, progress=False)
    log_dir = _launch(tmp_path, small_shards["all"], "suite-zs", "--epochs", "1",
                      "--medclip-zeroshot-suite", str(suite), "--zeroshot-frequency", "1")
    results = [json.loads(line) for line in (log_dir / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert 0.0 <= results[-1]["nih-train-tiny-zeroshot-accuracy"] <= 1.0
    assert "nih-train-tiny-zeroshot-macro-auc" in results[-1] or "nih-train-tiny-zeroshot-auc" in results[-1]
    assert openclip_train._ZERO_SHOT_HOOKS == []  # unregistered after the run


def test_train_cli_mistakes_are_one_line_with_a_short_usage(capsys):
    from open_clip_medclip import cli

    assert cli.main(["train", "--model", "medclip-tiny", "--warmupp", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: medclip train") and len(err) <= 5, err
    assert err[-1] == "medclip train: unrecognized arguments: --warmupp (did you mean: --warmup?)"

    assert cli.main(["train", "--model", "medclip-tiny", "--medclip-los", "clip"]) == 2
    assert "--medclip-los (did you mean: --medclip-loss" in capsys.readouterr().err

    assert cli.main(["train", "--model", "medclip-swim", "--train-data", "x.tar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medclip train: unknown model 'medclip-swim' (did you mean: medclip-swin")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cli_missing_cuda_follows_the_device_policy(capsys):
    from open_clip_medclip import cli

    assert cli.main(["train", "--model", "medclip-tiny", "--device", "cuda", "--train-data", "x.tar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["medclip train: --device cuda: this machine has no CUDA device; use --device cpu"]

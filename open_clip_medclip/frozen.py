"""Frozen-tower training: pretrained trunks run once, the projection heads and the logit scale train on their cache.

With both trunks frozen (EfficientNet-Lite0 and MiniLM in `medclip-demo`), every training step only needs the trunk
features of its images (a few seeded augmented views each) and sentences, so they are computed once and kept in
memory-mapped `.npy` files keyed by everything that determines them (model, trunk weights hash, transform, inputs):
change any of these and a new file is computed instead of a stale one reused. The heads (`visual.head`,
`text.proj`) and `logit_scale` of the *full* model then train on the cache with big batches through the same loss
code as `medclip train` (`loss.create_medclip_loss`), and the result is saved as an ordinary OpenCLIP checkpoint of
the full model (frozen trunks + trained heads): `open_clip.create_model(name, pretrained=PATH)` loads it and the
zero-shot path scores it. Because the trunks are frozen, held-out trunk features can be cached too
(`HeldOutFeatures`): the zero-shot scores computed from them equal the full model's (tests/demo/test_frozen.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from open_clip_medclip.errors import UserError

CACHE_FORMAT = 1  # bump when the cached arrays' meaning changes


# ----------------------------------------------------------------------------------------------------------------
# What a cache entry depends on
# ----------------------------------------------------------------------------------------------------------------
def weights_hash(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def transform_fingerprint(transform) -> str:
    """A stable description of an image transform (torchvision reprs; our own transforms by class and fields)."""
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return f"{type(transform).__name__}[{', '.join(transform_fingerprint(t) for t in inner)}]"
    if type(transform).__repr__ is object.__repr__:
        fields = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in sorted(vars(transform).items())}
        return f"{type(transform).__module__}.{type(transform).__qualname__}({fields})"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str).encode()
                          ).hexdigest()[:20]


def image_cache_parts(what: str, model_name: str, model: nn.Module, transform, **inputs) -> dict:
    """What cached image trunk features depend on: model, image trunk weights, transform, and the inputs."""
    return {"what": what, "model": model_name, "weights": weights_hash(model.visual.trunk),
            "transform": transform_fingerprint(transform), **inputs}


def text_cache_parts(what: str, model_name: str, model: nn.Module, tokenizer: Callable, texts: Sequence[str]) -> dict:
    """What cached text trunk features depend on: model, text trunk weights, tokenizer (its ids for the first texts
    and its width), and the texts."""
    probe = tokenizer(list(texts[:64])) if len(texts) else None
    return {"what": what, "model": model_name, "weights": weights_hash(model.text.transformer),
            "tokenizer": [type(tokenizer).__name__, hashlib.sha256(probe.numpy().tobytes()).hexdigest()
                          if probe is not None else None],
            "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest()}


def cached_array(folder: Path, name: str, parts: dict, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`folder/<name>-<key>.npy` memory-mapped read-only, computed (and written atomically) when absent.

    The key hashes `parts`; a `.json` beside the array records them, so a stale cache is never silently reused.
    """
    from open_clip_medclip.atomic import atomic_write, write_text

    path = Path(folder) / f"{name}-{cache_key(parts)}.npy"
    if not path.exists():
        array = np.ascontiguousarray(compute(), dtype=np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as handle:
            np.save(handle, array)
        write_text(path.with_suffix(".json"), json.dumps(parts, indent=1, sort_keys=True, default=str) + "\n")
    return np.load(path, mmap_mode="r")


# ----------------------------------------------------------------------------------------------------------------
# Trunks and heads of an OpenCLIP model
# ----------------------------------------------------------------------------------------------------------------
def heads(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(image head, text head): `visual.head` of a timm tower and `text.proj` of a Hugging Face tower."""
    visual, text = getattr(model, "visual", None), getattr(model, "text", None)
    if not (hasattr(visual, "trunk") and hasattr(visual, "head") and hasattr(text, "proj")):
        raise UserError(f"frozen towers need a timm image tower and a Hugging Face text tower; "
                        f"{type(model).__name__} has {type(visual).__name__} / {type(text).__name__}")
    return visual.head, text.proj


@contextlib.contextmanager
def without_heads(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with both heads replaced by identities: encode_image/encode_text return trunk features
    through the model's own forward (so the cache is exactly what the full model feeds its heads)."""
    image_head, text_head = heads(model)
    was_training = model.training
    model.visual.head, model.text.proj = nn.Identity(), nn.Identity()
    model.eval()
    try:
        yield model
    finally:
        model.visual.head, model.text.proj = image_head, text_head
        model.train(was_training)


@torch.no_grad()
def image_trunk_features(model: nn.Module, images: Sequence, transform: Callable, batch_size: int = 64,
                         progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(n, D) image trunk features of PIL images under `transform` (drawn in order: seed torch's RNG first)."""
    out = []
    with without_heads(model):
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(image) for image in images[start:start + batch_size]])
            out.append(model.encode_image(batch).float().numpy())
            if progress:
                progress(len(batch))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def text_trunk_features(model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256,
                        progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(n, D) pooled text trunk features, in the order of `texts` (batched by length: less padding, same result
    for padding-free poolers; other poolers keep the tokenizer's width, as `eval.embed.embed_texts` does)."""
    from open_clip_medclip.text_width import text_multiple, text_pooler_type, tokenizer_pad_id, trim_tokens

    multiple = text_multiple(text_pooler_type(model), training=False)
    pad_id = tokenizer_pad_id(tokenizer)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if multiple else list(range(len(texts)))
    out = np.zeros((len(texts), 0), np.float32)
    with without_heads(model):
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            tokens = trim_tokens(tokenizer([texts[i] for i in rows]), multiple, pad_id)
            features = model.encode_text(tokens).float().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(texts), features.shape[1]), np.float32)
            out[rows] = features
            if progress:
                progress(len(rows))
    return out


def _progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="item", mininterval=2.0)


# ----------------------------------------------------------------------------------------------------------------
# The training cache: augmented views of the training images, the sentence bank
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingFeatures:
    """Cached trunk features of the training images (views) and the sentence bank, with their labels."""

    image: np.ndarray            # (N, V, Di) memory-mapped
    image_labels: np.ndarray     # (N, 14) float32, policy applied
    image_source: np.ndarray     # (N,) source name of each image ("nih", "pediatric", ...)
    image_keys: list[str]
    image_eval: np.ndarray       # (N, Di) under the evaluation transform (validation scoring)
    text: np.ndarray             # (M, Dt) memory-mapped
    text_labels: np.ndarray      # (M, 14)
    bank: object                 # streams.SentenceBank (draws the sentence paired with an image)
    keys: dict = field(default_factory=dict)  # cache file keys, for the results

    def subset(self, rows: np.ndarray) -> TrainingFeatures:
        rows = np.asarray(rows)
        return TrainingFeatures(self.image[rows], self.image_labels[rows], self.image_source[rows],
                                [self.image_keys[i] for i in rows], self.image_eval[rows], self.text, self.text_labels,
                                self.bank, self.keys)


def build_training_features(model: nn.Module, model_name: str, tokenizer: Callable, train_data: str, bank_data: str,
                            transform: Callable, eval_transform: Callable, views: int, view_seed: int,
                            cache_dir: Path, policy: str = "zeros") -> TrainingFeatures:
    """Read the training shards (the same reading, checking and pairing stages as training: `streams.iter_pairs`),
    and cache `views` augmented views of every image (plus one under `eval_transform`, for validation) and the
    trunk features of every bank sentence."""
    from open_clip_medclip.streams.stages import iter_pairs

    bank, samples = iter_pairs(train_data, bank_data, policy=policy)
    keys, images, labels = [], [], []
    for sample in samples:
        keys.append(sample["__key__"])
        images.append(sample["image"])
        labels.append(np.asarray(sample["image_labels"], dtype=np.float32))
    if not keys:
        raise UserError(f"{train_data}: no training images")
    data_hash = hashlib.sha256(json.dumps([keys, np.stack(labels).tolist()]).encode()).hexdigest()

    def compute_images() -> np.ndarray:
        torch.manual_seed(view_seed)
        bar = _progress(len(images) * views, f"image trunk, {views} augmented views per image")
        per_view = [image_trunk_features(model, images, transform, progress=bar.update) for _ in range(views)]
        bar.close()
        return np.stack(per_view, axis=1)

    def compute_eval() -> np.ndarray:
        return image_trunk_features(model, images, eval_transform)

    texts = bank.texts

    def compute_texts() -> np.ndarray:
        bar = _progress(len(texts), "text trunk, sentence bank")
        features = text_trunk_features(model, tokenizer, texts, progress=bar.update)
        bar.close()
        return features

    image_parts = image_cache_parts("training image views", model_name, model, transform, views=views,
                                    view_seed=view_seed, images=data_hash)
    eval_parts = image_cache_parts("training images, evaluation transform", model_name, model, eval_transform,
                                   views=1, view_seed=None, images=data_hash)
    text_parts = text_cache_parts("sentence bank", model_name, model, tokenizer, texts)
    image = cached_array(cache_dir, "train-images", image_parts, compute_images)
    image_eval = cached_array(cache_dir, "train-images-eval", eval_parts, compute_eval)
    text = cached_array(cache_dir, "bank-texts", text_parts, compute_texts)
    return TrainingFeatures(image=image, image_labels=np.stack(labels), image_source=np.array(
        [k.split("__", 1)[0] for k in keys]), image_keys=keys, image_eval=image_eval, text=text, text_labels=bank.labels.astype(np.float32),
        bank=bank, keys={"train-images": cache_key(image_parts), "train-images-eval": cache_key(eval_parts),
                         "bank-texts": cache_key(text_parts)})


def validation_split(features: TrainingFeatures, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): `fraction` of each source's images, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    validation = []
    for source in sorted(set(features.image_source)):
        rows = np.flatnonzero(features.image_source == source)
        validation.extend(rng.choice(rows, size=max(1, round(fraction * len(rows))), replace=False).tolist())
    validation = np.array(sorted(validation))
    return np.setdiff1d(np.arange(len(features.image_keys)), validation), validation


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot scoring from cached trunk features (the same prompts, ensembling and scale as eval.zeroshot)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ZeroShotTask:
    """One zero-shot task on cached image trunk features: binary class prompts or CheXzero finding pairs."""

    image: np.ndarray                 # (n, Di) trunk features
    targets: np.ndarray
    prompt_features: np.ndarray       # (P, Dt) trunk features of the prompts
    class_rows: list[list[int]] | None = None  # binary: prompt rows of each class
    pair_rows: tuple[list[int], list[int]] | None = None  # multi-label: (positive rows, negative rows)
    ensemble: str = "logit"


def head_embeddings(head: nn.Module, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.functional.normalize(head(torch.from_numpy(np.array(features, dtype=np.float32))).float(), dim=-1).numpy()


def task_scores(model: nn.Module, task: ZeroShotTask) -> np.ndarray:
    """The scores `eval.zeroshot.run_zeroshot` gives the full model, from cached trunk features and the heads."""
    from open_clip_medclip.eval.embed import logit_scale
    from open_clip_medclip.eval.zeroshot import class_scores, pair_probabilities

    image_head, text_head = heads(model)
    images, prompts = head_embeddings(image_head, task.image), head_embeddings(text_head, task.prompt_features)
    scale = logit_scale(model)
    if task.pair_rows is not None:
        return pair_probabilities(images, prompts[task.pair_rows[0]], prompts[task.pair_rows[1]], scale)
    return class_scores(images, [prompts[rows] for rows in task.class_rows], task.ensemble, scale)


def binary_task(image: np.ndarray, targets: np.ndarray, class_prompts: dict[str, list[str]], classes: Sequence[str],
                text_features: Callable[[list[str]], np.ndarray], ensemble: str) -> ZeroShotTask:
    unique = sorted({t for texts in class_prompts.values() for t in texts})
    row = {t: i for i, t in enumerate(unique)}
    return ZeroShotTask(image=image, targets=targets, prompt_features=text_features(unique),
                        class_rows=[[row[t] for t in class_prompts[c]] for c in classes], ensemble=ensemble)


def pairs_task(image: np.ndarray, targets: np.ndarray, pairs: dict[str, tuple[str, str]],
               text_features: Callable[[list[str]], np.ndarray]) -> ZeroShotTask:
    texts = [p for p, _ in pairs.values()] + [n for _, n in pairs.values()]
    k = len(pairs)
    return ZeroShotTask(image=image, targets=targets, prompt_features=text_features(texts),
                        pair_rows=(list(range(k)), list(range(k, 2 * k))))


def suite_image_features(model: nn.Module, model_name: str, suite, preprocess: Callable, cache_dir: Path
                         ) -> np.ndarray:
    """Cached image trunk features of a suite's test images under the evaluation transform."""
    from open_clip_medclip.eval.suites.build import load_image

    entries = suite.split("test")
    parts = image_cache_parts(f"suite {suite.name} test images", model_name, model, preprocess,
                              manifest=suite.manifest_sha256, images=[str(e.image_path) for e in entries])

    def compute() -> np.ndarray:
        return image_trunk_features(model, [load_image(e.image_path) for e in entries], preprocess)

    return cached_array(cache_dir, f"suite-{suite.name}", parts, compute)


# ----------------------------------------------------------------------------------------------------------------
# Training the heads
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class HeadTraining:
    """The budget of one frozen-tower run."""

    loss: str = "soft"                  # loss.LOSS_KINDS
    label_temperature: float = 1.0
    epochs: int = 20
    steps_per_epoch: int = 100
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    nih_share: float = 0.5              # expected share of NIH (multi-finding) images per batch
    seed: int = 0


def create_loss(kind: str, temperature: float):
    """The loss `medclip train` builds for `--medclip-loss kind --medclip-label-temperature temperature` (1 process)."""
    from open_clip_medclip.loss import create_medclip_loss

    return create_medclip_loss(SimpleNamespace(local_loss=False, gather_with_grad=False, rank=0, world_size=1,
                                               horovod=False, medclip_loss=kind, medclip_label_similarity="dot",
                                               medclip_label_temperature=temperature))


def reset_heads(model: nn.Module, seed: int, init_logit_scale: float) -> None:
    """Fresh heads (PyTorch's default Linear init, as at model creation) and logit scale, from `seed`."""
    torch.manual_seed(seed)
    for head in heads(model):
        for module in head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    with torch.no_grad():
        model.logit_scale.fill_(init_logit_scale)


class BatchSampler:
    """Seeded batches: images drawn by source (NIH with probability `nih_share`), one cached view each, and a bank
    sentence sharing a finding with each image (`SentenceBank.draw`, the streams' pairing rule)."""

    def __init__(self, data: TrainingFeatures, batch_size: int, nih_share: float, seed: int) -> None:
        self.data, self.batch_size, self.nih_share = data, batch_size, nih_share
        self.nih = np.flatnonzero(data.image_source == "nih")
        self.other = np.flatnonzero(data.image_source != "nih")
        if not len(self.nih) or not len(self.other):
            self.nih = self.other = np.arange(len(data.image_keys))
        self.rng = np.random.default_rng(seed)
        self.pair_rng = random.Random(f"medclip-frozen:pair:{seed}")

    def __call__(self) -> tuple[torch.Tensor, ...]:
        rng, data = self.rng, self.data
        from_nih = rng.random(self.batch_size) < self.nih_share
        rows = np.where(from_nih, self.nih[rng.integers(len(self.nih), size=self.batch_size)],
                        self.other[rng.integers(len(self.other), size=self.batch_size)])
        views = rng.integers(data.image.shape[1], size=self.batch_size)
        texts = np.array([data.bank.draw(data.image_labels[r], self.pair_rng)[0] for r in rows])
        return (torch.from_numpy(np.ascontiguousarray(data.image[rows, views])),
                torch.from_numpy(np.ascontiguousarray(data.text[texts])),
                torch.from_numpy(data.image_labels[rows]), torch.from_numpy(data.text_labels[texts]))


def warmup_cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """OpenCLIP's default schedule: linear warmup, then cosine to 0 (here and in `eval finetune`)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base


def train_heads(model: nn.Module, data: TrainingFeatures, budget: HeadTraining, init_logit_scale: float,
                on_epoch: Callable[[int], dict] | None = None) -> list[dict]:
    """Train the heads and logit scale of `model` in place; per-epoch history (mean loss, logit scale, `on_epoch`).

    OpenCLIP's optimizer rules: AdamW, no weight decay on gains, biases and the logit scale, which is clamped to
    [0, ln 100] after each step.
    """
    reset_heads(model, budget.seed, init_logit_scale)
    image_head, text_head = heads(model)
    named = [(f"image.{n}", p) for n, p in image_head.named_parameters()] + \
            [(f"text.{n}", p) for n, p in text_head.named_parameters()] + [("logit_scale", model.logit_scale)]
    decay = [p for n, p in named if p.ndim >= 2 and "bias" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "bias" not in n)]
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                   {"params": decay, "weight_decay": budget.weight_decay}], lr=budget.lr)
    loss_fn = create_loss(budget.loss, budget.label_temperature)
    sampler = BatchSampler(data, budget.batch_size, budget.nih_share, budget.seed)
    total = budget.epochs * budget.steps_per_epoch
    history, step = [], 0
    image_head.train(), text_head.train()
    for epoch in range(1, budget.epochs + 1):
        losses = []
        for _ in range(budget.steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine_lr(step, total, budget.lr, budget.warmup_steps)
            image, text, image_labels, text_labels = sampler()
            image_features = nn.functional.normalize(image_head(image), dim=-1)
            text_features = nn.functional.normalize(text_head(text), dim=-1)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp(), image_labels=image_labels,
                           text_labels=text_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            step += 1
        record = {"epoch": epoch, "step": step, "loss": float(np.mean(losses)),
                  "logit_scale": float(model.logit_scale.detach().exp())}
        if on_epoch is not None:
            image_head.eval(), text_head.eval()
            record.update(on_epoch(epoch))
            image_head.train(), text_head.train()
        history.append(record)
    image_head.eval(), text_head.eval()
    return history


def save_checkpoint(model: nn.Module, path: Path, name: str, epoch: int) -> Path:
    """An ordinary OpenCLIP checkpoint of the full model (what open_clip_train writes, without optimizer state)."""
    from open_clip_medclip.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        torch.save({"epoch": epoch, "name": name, "state_dict": model.state_dict()}, handle)
    return path

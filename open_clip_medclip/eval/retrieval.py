"""Image-text retrieval on a suite with a class-labelled sentence pool (the paper's P@k protocol).

The paper's pool (class-labelled MIMIC sentences) was never released; by default the pool is the suite's
full prompt set (every prompt of every class, deduplicated, sentences shared by two classes dropped), or a
user CSV `text,label`. A retrieved text is relevant when its class equals the image's class.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from open_clip_medclip.eval.embed import embed_images, embed_texts, evaluation_mode
from open_clip_medclip.eval.metrics import retrieval_metrics
from open_clip_medclip.eval.options import EvalOptions, EvalResult
from open_clip_medclip.eval.suites.definitions import SuiteError, suite_prompts
from open_clip_medclip.eval.suites.load import Suite, load_suite
from open_clip_medclip.sources.records import read_csv


def text_pool(suite: Suite, texts_csv: str | Path | None = None) -> tuple[list[str], list[int]]:
    """(texts, class ids): from a `text,label` CSV, or the suite's full prompt set."""
    index = {cls: i for i, cls in enumerate(suite.classes)}
    if texts_csv is not None:
        _, rows = read_csv(texts_csv, required=("text", "label"))
        pairs = []
        for line, row in rows:
            if row["label"] not in index:
                raise SuiteError(f"{texts_csv}:{line}: label {row['label']!r} is not a suite class ({suite.classes})")
            pairs.append((row["text"], index[row["label"]]))
    else:
        prompts = suite_prompts(suite.definition, per_class=None)
        pairs = [(text, index[cls]) for cls, texts in prompts.items() for text in dict.fromkeys(texts)]
    owners: dict[str, set[int]] = {}
    for text, label in pairs:
        owners.setdefault(text, set()).add(label)
    kept = [(t, c) for t, c in dict.fromkeys(pairs) if len(owners[t]) == 1]
    if not kept:
        raise SuiteError(f"{suite.source}: the text pool is empty")
    return [t for t, _ in kept], [c for _, c in kept]


def run_retrieval(model: torch.nn.Module, suite: Suite | str, tokenizer: Callable, preprocess: Callable,
                  device: str | torch.device = "cpu", options: EvalOptions | None = None) -> EvalResult:
    """Image->text and text->image class-based retrieval metrics (P@k, R@k, hit@k with bootstrap CIs); the result's
    scores are the image-text similarities."""
    o = options or EvalOptions()
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    if suite.multilabel:
        raise SuiteError(f"{suite.source}: retrieval needs one class per image (multiclass suite)")
    entries = suite.split("test")[:o.max_images] if o.max_images else suite.split("test")
    suite.check_images(entries)
    texts, text_labels = text_pool(suite, o.texts)
    with evaluation_mode(model) as model:
        features, kept, failures = embed_images(model, preprocess, [e.image_path for e in entries], device,
                                                o.batch_size, o.workers, o.progress, o.autocast)
        text_features = embed_texts(model, tokenizer, texts, device, autocast=o.autocast)
    labels = suite.label_index([entries[i] for i in kept])
    similarity = features @ text_features.T
    return EvalResult(metrics={
        "suite": suite.name, "classes": suite.classes, "manifest_sha256": suite.manifest_sha256,
        "text_pool": {"source": str(o.texts) if o.texts else "suite prompts (all, deduplicated)",
                      "num_texts": len(texts), "per_class": {c: int(np.sum(np.array(text_labels) == i))
                                                              for i, c in enumerate(suite.classes)}},
        "image_to_text": retrieval_metrics(similarity, labels, text_labels, o.ks, o.bootstrap, o.seed),
        "text_to_image": retrieval_metrics(similarity.T, text_labels, labels, o.ks, o.bootstrap, o.seed),
        "num_images": len(entries), "num_excluded_corrupt": len(failures), "excluded_corrupt": failures,
    }, features=features, targets=labels, scores=similarity, entries=[entries[i] for i in kept])

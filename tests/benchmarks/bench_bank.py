"""Sentence bank benchmark: the lean bank vs the old list-of-tuples bank on a synthetic MIMIC-like bank.

    python tests/benchmarks/bench_bank.py [--sentences 2000000] [--machine "2-core CPU dev box, shared"]

Synthetic corpus: `--sentences` sentence occurrences drawn with a Zipf-like law from a pool of unique sentences
(about a third of the occurrences are unique, as in MIMIC-CXR report sentences, where "no acute cardiopulmonary
process ." and friends repeat tens of thousands of times), each with CheXpert-style codes (No Finding, one or
two positives, some uncertain -1, the rest blank). Both banks are built from the same raw occurrences in one run:

- build time (CPU seconds): raw occurrences -> deduplicated bank ready to draw (the old bank: the scan's (str, list)
  tuples, dict dedupe, per-entry policy lists, float32 matrix; the lean bank: dict dedupe, one UTF-8 buffer +
  offsets + int8 codes + index arrays);
  the lean bank loaded from its arrays (what the streams do with the shard index's `index-bank.npz`) is timed too;
- memory: the rank's resident-set growth while building, and each forked loader worker's private memory (USS)
  after drawing, minus an idle forked worker's (copy-on-write pages the worker had to copy);
- draw rate: draws per CPU second (sentence index by the pairing rule + the text + its targets), one process.

Writes tests/benchmarks/results/bench_bank.json. Goals (issue 12): lean bank <= 10 s and <= 300 MB per rank for
2M sentences; draws >= 100k/s.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import rss_mb  # noqa: E402

from open_clip_medclip.findings import FINDING_INDEX, NUM_FINDINGS  # noqa: E402
from open_clip_medclip.labels import BLANK_CODE  # noqa: E402
from open_clip_medclip.streams.bank import SentenceBank  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_bank.json"
NF = FINDING_INDEX["No Finding"]
WORDS = ("there is a small moderate large left right bilateral basilar apical lower upper lobe opacity effusion "
         "pleural pneumothorax edema consolidation atelectasis cardiomegaly heart size normal enlarged stable "
         "unchanged compared prior study since interval improved worsened mild severe catheter tube tip projects "
         "over svc mediastinal contours hilar unremarkable no acute cardiopulmonary process evidence of focal "
         "pneumonia vascular congestion fracture rib healed lungs clear without findings ").split()


# ----------------------------------------------------------------------------------------------------------------
# Synthetic MIMIC-like corpus
# ----------------------------------------------------------------------------------------------------------------
def synthetic_corpus(occurrences: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(sentence per occurrence, raw int8 codes per occurrence [N, 14])."""
    rng = np.random.default_rng(seed)
    unique = max(1, occurrences // 3)
    lengths = rng.integers(4, 18, size=unique)
    words = rng.integers(0, len(WORDS), size=int(lengths.sum()))
    texts, start = [], 0
    for i, n in enumerate(lengths.tolist()):
        texts.append(" ".join(WORDS[w] for w in words[start:start + n]) + f" {i} .")
        start += n
    codes = np.full((unique, NUM_FINDINGS), BLANK_CODE, dtype=np.int8)
    normal = rng.random(unique) < 0.35
    codes[normal, NF] = 1
    for row in np.flatnonzero(~normal):
        found = rng.choice([f for f in range(NUM_FINDINGS) if f != NF], size=rng.integers(1, 3), replace=False)
        codes[row, found] = 1
        if rng.random() < 0.2:
            codes[row, rng.integers(1, NUM_FINDINGS)] = -1  # uncertain
        if rng.random() < 0.3:
            codes[row, rng.integers(1, NUM_FINDINGS)] = 0
    # Zipf-like occurrence counts: a few sentences repeat very often, most once
    weights = 1.0 / np.arange(1, unique + 1) ** 1.1
    weights /= weights.sum()
    picks = np.concatenate([np.arange(unique), rng.choice(unique, size=occurrences - unique, p=weights)])
    rng.shuffle(picks)
    return [texts[i] for i in picks.tolist()], codes[picks]


# ----------------------------------------------------------------------------------------------------------------
# The old bank (open_clip_medclip.streams before issue 12), kept here for the side-by-side comparison only
# ----------------------------------------------------------------------------------------------------------------
def _old_policy(values, policy="zeros"):
    uncertain_to = {"zeros": 0.0, "ones": 1.0, "keep": -1.0}[policy]
    return [0.0 if v is None else (uncertain_to if v == -1.0 else float(v)) for v in values]


class OldSentenceBank:
    def __init__(self, texts, labels):
        self.texts = texts
        self.labels = np.asarray(labels, dtype=np.float32).reshape(len(texts), NUM_FINDINGS)
        self.by_finding = [np.flatnonzero(self.labels[:, f] == 1.0) for f in range(NUM_FINDINGS)]

    def __len__(self):
        return len(self.texts)

    @classmethod
    def from_entries(cls, entries, policy="zeros"):
        seen = {}
        for text, labels in entries:
            text = text.strip()
            if text and text not in seen:
                seen[text] = _old_policy(labels, policy)
        return cls(list(seen), np.array(list(seen.values()), dtype=np.float32).reshape(len(seen), NUM_FINDINGS))

    def draw(self, image_labels, rng):
        positives = [f for f in range(NUM_FINDINGS) if f != NF and image_labels[f] == 1.0 and len(self.by_finding[f])]
        if positives:
            sizes = [len(self.by_finding[f]) for f in positives]
            while True:
                finding = rng.choices(positives, weights=sizes, k=1)[0]
                index = int(self.by_finding[finding][rng.randrange(len(self.by_finding[finding]))])
                shared = sum(1 for f in positives if self.labels[index, f] == 1.0)
                if rng.random() * shared < 1.0:
                    return index, "shared-finding"
        pool = self.by_finding[NF]
        return int(pool[rng.randrange(len(pool))]), "no-finding"


def old_entries(texts, codes):
    """The old scan's output: a list of (str, list of floats/None) tuples (texts decoded anew, as from the tars)."""
    return [(t.encode().decode(), [None if c == BLANK_CODE else float(c) for c in row]) for t, row in zip(texts, codes.tolist())]


def old_build(texts, codes):
    """The old start-up: the scan's (str, list) tuples for every occurrence, then the deduplicated bank."""
    return OldSentenceBank.from_entries(old_entries(texts, codes), "zeros")


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------
def uss_mb(pid: int | str = "self") -> float:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def image_label_vectors(count: int, seed: int = 1) -> list[list[float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        v = [0.0] * NUM_FINDINGS
        if rng.random() < 0.3:
            v[NF] = 1.0
        else:
            for f in rng.sample([f for f in range(NUM_FINDINGS) if f != NF], rng.randint(1, 3)):
                v[f] = 1.0
        out.append(v)
    return out


def draw_loop(bank, vectors, lean: bool, seconds: float = 2.0) -> float:
    """Draws per CPU second of this process (CPU time: the dev box is shared, wall time is noisy)."""
    rng = random.Random(0)
    done = 0
    start = time.process_time()
    while time.process_time() - start < seconds:
        for v in vectors:
            index, _ = bank.draw(v, rng)
            if lean:
                bank.text(index), bank.targets(index)
            else:
                bank.texts[index], bank.labels[index].tolist()
        done += len(vectors)
    return done / (time.process_time() - start)


def _worker(bank, vectors, lean, draws, conn) -> None:
    gc.collect()
    before = uss_mb()
    if bank is not None:
        rng = random.Random(os.getpid())
        for i in range(draws):
            index, _ = bank.draw(vectors[i % len(vectors)], rng)
            if lean:
                bank.text(index), bank.targets(index)
            else:
                bank.texts[index], bank.labels[index].tolist()
    gc.collect()  # the collector walks (and so touches) every container a worker inherited, as it will in training
    conn.send((before, uss_mb()))
    conn.close()


def worker_private_mb(bank, vectors, lean: bool, draws: int) -> float:
    """Private memory a forked worker gains by drawing `draws` sentences (copy-on-write pages it had to copy)."""
    context = multiprocessing.get_context("fork")
    results = []
    for target_bank in (None, bank):
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(target_bank, vectors, lean, draws, child))
        process.start()
        results.append(parent.recv())
        process.join()
    idle, used = results
    return round(max(0.0, (used[1] - used[0]) - (idle[1] - idle[0])), 1)


def measure(name: str, build, lean: bool, vectors, draws: int) -> dict:
    gc.collect()
    rss_before = rss_mb()
    start = time.process_time()
    bank = build()
    build_s = time.process_time() - start
    gc.collect()
    rank_mb = rss_mb() - rss_before
    rate = draw_loop(bank, vectors, lean)
    worker_mb = worker_private_mb(bank, vectors, lean, draws)
    return {"bank": name, "sentences": len(bank), "build_s": round(build_s, 2), "rank_rss_growth_mb": round(rank_mb, 1),
            "worker_private_mb": worker_mb, "draws_per_s": round(rate)}, bank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=2_000_000)
    parser.add_argument("--worker-draws", type=int, default=200_000)
    parser.add_argument("--machine", default="2-core CPU dev box, shared")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    texts, codes = synthetic_corpus(args.sentences)
    generate_s = time.perf_counter() - start
    unique = len(set(texts))
    vectors = image_label_vectors(1000)

    lean, lean_bank = measure("lean (buffer + offsets + int8 codes)",
                              functools.partial(SentenceBank.from_texts, texts, codes, "zeros"), True, vectors, args.worker_draws)
    arrays = (lean_bank.buffer.copy(), lean_bank.offsets.copy(), lean_bank.codes.copy())
    del lean_bank
    loaded, _ = measure("lean, from index arrays", functools.partial(SentenceBank, *arrays, policy="zeros"), True, vectors,
                        args.worker_draws)
    del arrays
    gc.collect()
    old, old_bank = measure("old (list of (str, list) tuples)", functools.partial(old_build, texts, codes), False,
                            vectors, args.worker_draws)
    del old_bank

    rows = [lean, loaded, old]
    print(f"synthetic MIMIC-like bank: {args.sentences:,} sentences, {unique:,} unique (generated in "
          f"{generate_s:.1f} s); machine: {args.machine}")
    print(f"{'bank':40s} {'build s':>8s} {'rank MB':>8s} {'worker MB':>10s} {'draws/s':>10s}")
    for row in rows:
        print(f"{row['bank']:40s} {row['build_s']:8.2f} {row['rank_rss_growth_mb']:8.1f} "
              f"{row['worker_private_mb']:10.1f} {row['draws_per_s']:10,d}")
    ratios = {
        "build_time_old_over_lean": round(old["build_s"] / max(lean["build_s"], 1e-9), 2),
        "rank_memory_old_over_lean": round(old["rank_rss_growth_mb"] / max(lean["rank_rss_growth_mb"], 1e-9), 2),
        "draw_rate_lean_over_old": round(lean["draws_per_s"] / max(old["draws_per_s"], 1), 2),
    }
    print("ratios:", ", ".join(f"{k} {v}x" for k, v in ratios.items()))
    goals = {"build_s<=10": lean["build_s"] <= 10, "rank_mb<=300": lean["rank_rss_growth_mb"] <= 300,
             "draws_per_s>=100k": lean["draws_per_s"] >= 100_000}
    print("goals:", ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in goals.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "bench_bank", "machine": args.machine, "sentences": args.sentences, "unique": unique,
        "worker_draws": args.worker_draws, "results": rows, "ratios": ratios, "goals": goals,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

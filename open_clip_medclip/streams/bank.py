"""The sentence bank: deduplicated labelled sentences by positive finding, and the pairing rules."""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import numpy as np

from .. import labels as label_contract
from ..errors import UserError
from ..findings import CHEXPERT_FINDINGS, FINDING_INDEX, NUM_FINDINGS

NO_FINDING = FINDING_INDEX["No Finding"]

# How the pairing stage chose a sample's text (kept on the sample for tests and statistics).
RULE_OWN_REPORT = "own-report"  # paired study: a sentence of its own report
RULE_SHARED_FINDING = "shared-finding"  # bank sentence sharing a positive finding with the image
RULE_NO_FINDING = "no-finding"  # image without positive findings: a No Finding bank sentence
RULE_FALLBACK = "fallback-no-finding"  # no bank sentence has any of the image's findings (as MedCLIP does)

# Findings that count for the shared-finding rule (No Finding excluded), as bits of a per-sentence mask.
_PAIRING_FINDINGS = tuple(f for f in range(NUM_FINDINGS) if f != NO_FINDING)


def pack_texts(encoded: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(buffer, offsets [N+1]) of UTF-8 texts laid end to end: the bank's text storage."""
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


class SentenceBank:
    """Deduplicated labelled sentences indexed by positive finding, for drawing texts that match an image.

    Storage is a handful of flat arrays, so forked loader workers share it copy-on-write: `buffer` (all texts as
    UTF-8, one `bytes` object), `offsets` (int64 [N+1]), `codes` (raw int8 label codes [N, 14]), `masks` (int16
    bit mask of each sentence's positive findings under the policy) and `by_finding` (int32 index arrays of the
    sentences positive for each finding). No per-sentence Python object exists until a sentence is drawn.
    """

    def __init__(self, buffer: bytes | np.ndarray, offsets: np.ndarray, codes: np.ndarray,
                 policy: str = "zeros") -> None:
        label_contract.check_policy_name(policy, label_contract.TRAINING_POLICIES)
        self.buffer = np.frombuffer(buffer, dtype=np.uint8) if isinstance(buffer, bytes | bytearray) else \
            np.ascontiguousarray(buffer, dtype=np.uint8)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.codes = np.ascontiguousarray(codes, dtype=label_contract.CODE_DTYPE).reshape(-1, NUM_FINDINGS)
        if len(self.offsets) != len(self.codes) + 1:
            raise ValueError(f"sentence bank: {len(self.codes)} label rows but {len(self.offsets) - 1} texts")
        self.policy = policy
        positive = label_contract.apply_policy(self.codes, policy) == 1.0 if len(self.codes) else \
            np.zeros((0, NUM_FINDINGS), dtype=bool)
        bits = (1 << np.arange(NUM_FINDINGS, dtype=np.int32)).astype(np.int32)
        bits[NO_FINDING] = 0
        self.masks = (positive.astype(np.int32) @ bits).astype(np.int32)
        self.by_finding = [np.flatnonzero(positive[:, f]).astype(np.int32) for f in range(NUM_FINDINGS)]
        self._sizes = [len(a) for a in self.by_finding]
        # policy lookup by code (codes were checked to lie in BLANK_CODE..1 by apply_policy above)
        self._table = label_contract.apply_policy(np.arange(label_contract.BLANK_CODE, 2, dtype=np.int8), policy)

    @classmethod
    def from_texts(cls, texts: Sequence[str], codes: np.ndarray, policy: str = "zeros") -> SentenceBank:
        """From sentence texts and their raw codes [N, 14]; stripped duplicates keep their first labels."""
        first: dict[str, int] = {}
        for row, text in enumerate(texts):
            text = text.strip()
            if text and text not in first:
                first[text] = row
        rows = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        codes = np.asarray(codes, dtype=label_contract.CODE_DTYPE).reshape(-1, NUM_FINDINGS)
        return cls(*pack_texts([t.encode("utf-8") for t in first]), codes[rows], policy)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, Sequence[float | None]]], policy: str = "zeros") -> SentenceBank:
        """From (sentence, label values) pairs (1/0/-1/None); values are validated by the label contract."""
        entries = list(entries)
        codes = label_contract.codes_matrix([values for _, values in entries], "sentence bank")
        return cls.from_texts([text for text, _ in entries], codes, policy)

    @classmethod
    def concat(cls, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], policy: str) -> SentenceBank:
        """One bank from several (buffer, offsets, codes) parts, e.g. several builds' indexes; an entry (text and
        codes) found in several parts is kept once. A single part is used as it is (no copy)."""
        parts = [p for p in parts if len(p[1]) > 1]
        if not parts:
            return cls(b"", np.zeros(1, dtype=np.int64), np.zeros((0, NUM_FINDINGS)), policy)
        if len(parts) == 1:
            return cls(*parts[0], policy=policy)
        seen: dict[tuple[bytes, bytes], None] = {}
        for buffer, offsets, part_codes in parts:
            buffer = np.asarray(buffer, dtype=np.uint8)
            part_codes = np.asarray(part_codes, dtype=label_contract.CODE_DTYPE).reshape(-1, NUM_FINDINGS)
            for row, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
                seen.setdefault((buffer[a:b].tobytes(), part_codes[row].tobytes()), None)
        codes = np.frombuffer(b"".join(c for _, c in seen), dtype=label_contract.CODE_DTYPE).reshape(-1, NUM_FINDINGS)
        return cls(*pack_texts([t for t, _ in seen]), codes, policy)

    def __len__(self) -> int:
        return len(self.codes)

    def text(self, index: int) -> str:
        return self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes().decode("utf-8")

    @property
    def texts(self) -> list[str]:
        """All texts as a list (tests and inspection; training never builds it)."""
        return [self.text(i) for i in range(len(self))]

    def targets(self, index: int) -> np.ndarray:
        """Float32 training targets of one sentence under the bank's policy."""
        return self._table[self.codes[index] - label_contract.BLANK_CODE]

    @property
    def labels(self) -> np.ndarray:
        """All targets [N, 14] under the bank's policy (tests and inspection)."""
        return label_contract.apply_policy(self.codes, self.policy)

    def counts(self) -> dict[str, int]:
        """Number of bank sentences positive for each finding."""
        return {name: size for name, size in zip(CHEXPERT_FINDINGS, self._sizes, strict=True)}

    def nbytes(self) -> int:
        return self.buffer.nbytes + self.offsets.nbytes + self.codes.nbytes + self.masks.nbytes + \
            sum(a.nbytes for a in self.by_finding)

    def draw(self, image_targets: Sequence[float], rng: random.Random) -> tuple[int, str]:
        """Index of a sentence for an image (policy-applied targets) and the rule that chose it.

        A sentence sharing any positive finding (No Finding excluded) is drawn uniformly from the union of the
        matching findings' sentences: a finding is picked in proportion to its pool size and a sentence in its
        pool, then kept with probability 1/(number of the image's findings it has) — so no union is built. Images
        without positives get a No Finding sentence; if the bank has none of the image's findings, a No Finding
        sentence (MedCLIP's fallback).
        """
        sizes = self._sizes
        if isinstance(image_targets, np.ndarray):
            image_targets = image_targets.tolist()
        image_mask = 0
        has_positive = False
        pools = []
        total = 0
        for f in _PAIRING_FINDINGS:
            if image_targets[f] == 1.0:
                has_positive = True
                if sizes[f]:
                    image_mask |= 1 << f
                    pools.append(f)
                    total += sizes[f]
        if total:
            by_finding, masks = self.by_finding, self.masks
            while True:
                pick = rng.randrange(total)
                for f in pools:
                    if pick < sizes[f]:
                        break
                    pick -= sizes[f]
                index = int(by_finding[f][pick])
                shared = (int(masks[index]) & image_mask).bit_count()
                if shared == 1 or rng.random() * shared < 1.0:
                    return index, RULE_SHARED_FINDING
        rule = RULE_FALLBACK if has_positive else RULE_NO_FINDING
        pool = self.by_finding[NO_FINDING]
        if not len(pool):
            if not len(self):
                raise UserError("the sentence bank is empty: add text-only or paired shards (or --medclip-bank-data)")
            return rng.randrange(len(self)), RULE_FALLBACK
        return int(pool[rng.randrange(len(pool))]), rule

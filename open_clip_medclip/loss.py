"""MedCLIP's semantic matching loss on top of OpenCLIP's `ClipLoss` feature gathering.

InfoNCE treats every other image–text pair in a batch as a negative, which is wrong for chest X-rays: two
studies with cardiomegaly match each other's sentences. MedCLIP (Wang et al., 2022) replaces the identity
target with `softmax(S / tau)`, where `S` is the similarity of the image's and the text's 14-finding label
vectors, and trains with soft cross-entropy in both directions. Subclassing `ClipLoss` reuses its gathers
(`--local-loss`, `--gather-with-grad`, horovod); only the label vectors need an extra all-gather.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import ClipLoss

from open_clip_medclip import hosted
from open_clip_medclip.options import LABEL_SIMILARITIES, LOSS_KINDS, MedclipOptions

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch built without distributed
    dist = None

try:
    import horovod.torch as hvd
except ImportError:
    hvd = None

# Same loss, two logits layouts: `square` (one logits matmul, symmetric passes) is fastest on CPU, where the matmul
# dominates; `rows` (two matmuls, row-wise fused softmaxes, ClipLoss' own layout) on GPUs, where column reductions
# are slow and matmuls cheap. `auto` picks by device; tests/benchmarks/bench_loss.py measures both against ClipLoss.
LOSS_KERNELS = ("auto", "square", "rows")
# How the soft targets enter: `grouped` never builds a B×B target matrix (see `_GroupedTargets`), `dense` does
# (softmax of the B×B label similarity, two extra B×B matrices). `auto`: grouped when the batch has few distinct
# label vectors (real batches: hundreds of distinct rows in thousands), dense otherwise (e.g. random labels).
TARGET_MODES = ("auto", "grouped", "dense")
# `auto` groups when (distinct image label rows) × (distinct text label rows) <= this fraction of the logits size
GROUPED_MAX_FRACTION = 0.25


def label_similarity(image_labels: torch.Tensor, text_labels: torch.Tensor, kind: str = "dot") -> torch.Tensor:
    """Image-label × text-label similarity matrix.

    `dot` is what MedCLIP's code does (raw dot product of label vectors); `cosine` is the paper's wording.
    An all-zero label row gives a zero similarity row (uniform target), never NaN.
    """
    if kind == "dot":
        return image_labels @ text_labels.T
    if kind == "cosine":
        return F.normalize(image_labels, dim=1) @ F.normalize(text_labels, dim=1).T
    raise ValueError(f"unknown label similarity {kind!r}; choose one of {LABEL_SIMILARITIES}")


class _RowSoftCrossEntropy(torch.autograd.Function):
    """Mean over rows of -sum(targets * log_softmax(logits)) (MedCLIP's `_soft_xent_loss`), target rows summing to 1.

    One fused log_softmax and one dot product forward; the backward is `softmax(L) - T`, computed in place from
    the saved log-probabilities, so only one B×B matrix is kept per direction.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=1)
        ctx.save_for_backward(log_probs, targets)
        return -torch.dot(targets.reshape(-1), log_probs.reshape(-1)) / logits.shape[0]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        log_probs, targets = ctx.saved_tensors
        grad = log_probs.exp()
        grad -= targets
        grad *= grad_output / log_probs.shape[0]
        return grad, None


class _SymmetricSoftCrossEntropy(torch.autograd.Function):
    """(row soft CE with softmax(S, 1) + column soft CE with softmax(S, 0)) / 2 on one square logits matrix.

    Equal to averaging the image→text and text→image soft cross-entropies, since the text→image logits are
    the transpose. Using `sum(T * log_softmax(L)) = sum(T * L) - sum(logsumexp)` (target rows sum to 1) and
    the closed-form gradient `(softmax_rows(L) + softmax_cols(L) - T) / 2B` needs one logits matmul instead
    of two and few passes over the B×B matrix: on CPU, where the matmul dominates, faster than `ClipLoss`.
    `targets=None` leaves the target term out (the grouped targets add it from the features instead).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        lse_rows = torch.logsumexp(logits, dim=1)
        lse_cols = torch.logsumexp(logits, dim=0)
        total = lse_rows.sum() + lse_cols.sum()
        if targets is not None:
            total = total - torch.dot(targets.reshape(-1), logits.reshape(-1))
        ctx.has_targets = targets is not None
        ctx.save_for_backward(logits, lse_rows, lse_cols, *([targets] if targets is not None else []))
        return total / (2 * logits.shape[0])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, lse_rows, lse_cols, *targets = ctx.saved_tensors
        grad = torch.sub(logits, lse_rows[:, None]).exp_()
        grad += torch.sub(logits, lse_cols[None, :]).exp_()
        if targets:
            grad -= targets[0]
        grad *= grad_output / (2 * logits.shape[0])
        return grad, None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


class _GroupedTargets:
    """Soft targets of one batch without a B×B matrix, from its distinct label rows.

    Target row i is `softmax_j(S[i, j])` with `S[i, j] = sim(image_labels[i], text_labels[j])`. Rows with equal
    image labels have equal targets, and columns with equal text labels get equal weight, so every target is
    `W[group(i), group(j)]` with `W = softmax(S_u + log counts) / counts` on the U_i × U_t distinct label rows.
    The soft loss only needs `sum_ij T[i, j] * image_i·text_j = sum_ab W[a, b] * image_sums_a·text_sums_b` (feature
    sums per label group): U_i × U_t × D work and a few B×D passes instead of B×B ones.
    """

    def __init__(self, all_image_labels: torch.Tensor, all_text_labels: torch.Tensor) -> None:
        self.image_rows, self.image_group, image_counts = torch.unique(
            all_image_labels, dim=0, return_inverse=True, return_counts=True)
        self.text_rows, self.text_group, text_counts = torch.unique(
            all_text_labels, dim=0, return_inverse=True, return_counts=True)
        self.image_counts = image_counts.to(all_image_labels.dtype)
        self.text_counts = text_counts.to(all_text_labels.dtype)
        self.similarity: torch.Tensor | None = None  # set by the loss: sim(image_rows, text_rows) / temperature

    @property
    def size(self) -> int:
        return len(self.image_rows) * len(self.text_rows)

    @staticmethod
    def _weights(similarity: torch.Tensor, column_counts: torch.Tensor) -> torch.Tensor:
        return torch.softmax(similarity + column_counts.log()[None, :], dim=1) / column_counts[None, :]

    def to_text(self) -> torch.Tensor:
        """U_i × U_t: the image→text target of one text in group b for an image in group a."""
        return self._weights(self.similarity, self.text_counts)

    def to_image(self) -> torch.Tensor:
        """U_t × U_i: the text→image target of one image in group a for a text in group b."""
        return self._weights(self.similarity.T, self.image_counts)

    @staticmethod
    def sums(values: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
        """Per label group, the sum of `values`' rows in it (index_put with accumulate: deterministic on CUDA)."""
        return values.new_zeros(groups, values.shape[1]).index_put((group,), values, accumulate=True)


def _all_gather_nograd(tensor: torch.Tensor, world_size: int, use_horovod: bool) -> torch.Tensor:
    """Concatenate a label tensor from every rank in rank order (labels carry no gradient)."""
    if use_horovod:
        if hvd is None:
            raise RuntimeError("use_horovod=True but horovod is not installed")
        return hvd.allgather(tensor)
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def gather_features(*args, **kwargs):
    """OpenCLIP's feature all-gather, handed in by the host glue (`hosted`)."""
    return hosted.piece("gather_features")(*args, **kwargs)


class SemanticMatchingLoss(ClipLoss):
    """Soft-target contrastive loss with targets softmax(label_similarity / temperature).

    Called by OpenCLIP's `train_one_epoch` as `loss(**model_out, output_dict=True)`; the model output carries
    `image_labels` and `text_labels` next to the features (see `plugins.openclip_train`). Computed in fp32
    even under autocast, so bf16 training gets the same targets and a finite loss.
    """

    def __init__(
        self,
        label_similarity: str = "dot",
        temperature: float = 1.0,
        kernel: str = "auto",
        targets: str = "auto",
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ) -> None:
        super().__init__(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=cache_labels,
            rank=rank,
            world_size=world_size,
            use_horovod=use_horovod,
        )
        if label_similarity not in LABEL_SIMILARITIES:
            raise ValueError(f"unknown label similarity {label_similarity!r}; choose one of {LABEL_SIMILARITIES}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if kernel not in LOSS_KERNELS:
            raise ValueError(f"unknown loss kernel {kernel!r}; choose one of {LOSS_KERNELS}")
        if kernel == "square" and world_size > 1 and local_loss:
            raise ValueError("kernel='square' needs the full B×B logits; it cannot run with local_loss")
        if targets not in TARGET_MODES:
            raise ValueError(f"unknown soft-target mode {targets!r}; choose one of {TARGET_MODES}")
        self.label_similarity = label_similarity
        self.temperature = float(temperature)
        self.kernel = kernel
        self.targets = targets
        self.last_target_mode: str | None = None  # what the last call used: "grouped" or "dense"

    def _similarity(self, image_labels: torch.Tensor, text_labels: torch.Tensor) -> torch.Tensor:
        similarity = label_similarity(image_labels, text_labels, self.label_similarity)
        return similarity if self.temperature == 1.0 else similarity / self.temperature

    def _row_layout(self, features: torch.Tensor) -> bool:
        """Two row-major logits matrices (`rows`) or one square matrix with symmetric passes (`square`)?"""
        if self.kernel == "auto":
            return (self.world_size > 1 and self.local_loss) or features.device.type != "cpu"
        return self.kernel == "rows"

    def _gather_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return _all_gather_nograd(labels, self.world_size, self.use_horovod) if self.world_size > 1 else labels

    def _gather_all(self, image_features: torch.Tensor, text_features: torch.Tensor, full: bool):
        """(row image features, row text features, all image features, all text features, first row's column).

        The same gathers as `ClipLoss.get_logits` (`full`: as with local_loss=False), done once and kept, so the
        grouped targets use exactly the tensors (and gradient paths) the logits were built from.
        """
        if self.world_size == 1:
            return image_features, text_features, image_features, text_features, 0
        local = self.local_loss and not full
        all_image, all_text = gather_features(
            image_features, text_features, local_loss=local, gather_with_grad=self.gather_with_grad,
            rank=self.rank, world_size=self.world_size, use_horovod=self.use_horovod,
        )
        if local:
            return image_features, text_features, all_image, all_text, self.rank * image_features.shape[0]
        return all_image, all_text, all_image, all_text, 0

    @torch.no_grad()
    def soft_targets(self, image_labels: torch.Tensor, text_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row targets for the image→text and the text→image logits, in `ClipLoss.get_logits`' layout."""
        image_labels, text_labels = image_labels.float(), text_labels.float()
        all_image_labels, all_text_labels = self._gather_labels(image_labels), self._gather_labels(text_labels)
        return self._dense_targets(image_labels, text_labels, all_image_labels, all_text_labels)

    @torch.no_grad()
    def _dense_targets(self, image_labels, text_labels, all_image_labels, all_text_labels):
        if not (self.world_size > 1 and self.local_loss):  # every rank's rows, not only this rank's
            image_labels, text_labels = all_image_labels, all_text_labels
        # two 14-wide matmuls instead of a transposed softmax: column softmaxes are slow on GPUs
        return (
            self._similarity(image_labels, all_text_labels).softmax(dim=1),
            self._similarity(text_labels, all_image_labels).softmax(dim=1),
        )

    @torch.no_grad()
    def _grouped(self, all_image_labels: torch.Tensor, all_text_labels: torch.Tensor, rows: int):
        """Distinct label rows of the batch, or None where the dense targets are cheaper (few repeated rows)."""
        if self.targets == "dense":
            return None
        groups = _GroupedTargets(all_image_labels, all_text_labels)
        if self.targets == "auto" and groups.size > GROUPED_MAX_FRACTION * rows * len(all_text_labels):
            return None
        groups.similarity = self._similarity(groups.image_rows, groups.text_rows)
        return groups

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        image_labels: torch.Tensor | None = None,
        text_labels: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        **_ignored: torch.Tensor,
    ):
        if image_labels is None or text_labels is None:
            raise ValueError(
                "SemanticMatchingLoss needs image_labels and text_labels; the batch carried none. Train on "
                "label-aware medclip streams, or use --medclip-loss clip for plain InfoNCE."
            )
        logit_bias = None if logit_bias is None else logit_bias.float()
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            image_features, text_features = image_features.float(), text_features.float()
            logit_scale = logit_scale.float()
            image_labels, text_labels = image_labels.float(), text_labels.float()
            all_image_labels, all_text_labels = self._gather_labels(image_labels), self._gather_labels(text_labels)
            rows = self._row_layout(image_features)
            row_image, row_text, all_image, all_text, offset = self._gather_all(image_features, text_features, not rows)
            groups = None
            if logit_bias is None or logit_bias.numel() == 1:
                groups = self._grouped(all_image_labels, all_text_labels, row_image.shape[0])
            self.last_target_mode = "dense" if groups is None else "grouped"
            correction = None
            if groups is not None:  # before the logits exist, so its B×D temporaries don't add to the B×B peak
                correction = self._grouped_correction(groups, logit_scale, row_image, row_text, all_image, all_text,
                                                      offset, diagonal=rows)
            if rows:
                logits_per_image = logit_scale * row_image @ all_text.T
                if self.world_size > 1 and not self.local_loss:
                    logits_per_text = logits_per_image.T
                else:
                    logits_per_text = logit_scale * row_text @ all_image.T
                if logit_bias is not None:
                    logits_per_image = logits_per_image + logit_bias
                    logits_per_text = logits_per_text + logit_bias
                if groups is None:
                    # image→text and text→image logits as two row-major matrices, row soft CE on each
                    target_image, target_text = self._dense_targets(
                        image_labels, text_labels, all_image_labels, all_text_labels)
                    total_loss = (
                        _RowSoftCrossEntropy.apply(logits_per_image, target_image)
                        + _RowSoftCrossEntropy.apply(logits_per_text, target_text)
                    ) / 2
                else:
                    # soft CE_i = lse_i - sum_j T_ij x_ij = InfoNCE_i + x_ii - sum_j T_ij x_ij: ClipLoss' own kernel
                    # plus a correction linear in the features (bias cancels: target rows sum to 1)
                    labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
                    clip = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
                    total_loss = clip + correction
            else:
                logits = logit_scale * all_image @ all_text.T
                if logit_bias is not None:
                    logits = logits + logit_bias
                if groups is None:
                    with torch.no_grad():
                        similarity = self._similarity(all_image_labels, all_text_labels)
                        targets = similarity.softmax(dim=1) + similarity.softmax(dim=0)
                    total_loss = _SymmetricSoftCrossEntropy.apply(logits, targets)
                else:
                    total_loss = _SymmetricSoftCrossEntropy.apply(logits, None) + correction
                    if logit_bias is not None:
                        total_loss = total_loss - logit_bias.reshape(())
        return {"semantic_matching_loss": total_loss} if output_dict else total_loss

    def _grouped_correction(self, groups: _GroupedTargets, logit_scale, row_image, row_text, all_image, all_text,
                            offset: int, diagonal: bool) -> torch.Tensor:
        """(1/2n) sum over both directions and the n rows of (x_own - sum_j T_ij x_ij), x = scale * features·features.

        Without `diagonal` only the `- sum_j T_ij x_ij` part (the square kernel has no InfoNCE term to correct).
        Everything goes through per-group feature sums: a handful of B×D passes and U×U×D matmuls.
        """
        n = row_image.shape[0]
        image_groups, text_groups = len(groups.image_rows), len(groups.text_rows)
        text_sums = groups.sums(all_text, groups.text_group, text_groups)
        image_sums = groups.sums(all_image, groups.image_group, image_groups)
        if row_image is all_image and row_text is all_text:  # one process, or every rank's rows: both sides at once
            target = _dot(image_sums, (groups.to_text() + groups.to_image().T) @ text_sums)
            own = 2 * _dot(row_image, row_text) if diagonal else None
        else:  # local loss: this rank's rows against every rank's columns
            rows = slice(offset, offset + n)
            target = (_dot(groups.sums(row_image, groups.image_group[rows], image_groups), groups.to_text() @ text_sums)
                      + _dot(groups.sums(row_text, groups.text_group[rows], text_groups), groups.to_image() @ image_sums))
            own = _dot(row_image, all_text[rows]) + _dot(row_text, all_image[rows]) if diagonal else None
        total = -target if own is None else own - target
        return logit_scale * total / (2 * n)


class LabelTolerantClipLoss(ClipLoss):
    """Plain InfoNCE (`ClipLoss`) that accepts and ignores the label tensors of medclip streams.

    This is the `--medclip-loss clip` baseline: same data, same model, hard identity targets.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        **_labels: torch.Tensor,
    ):
        return super().forward(image_features, text_features, logit_scale, logit_bias=logit_bias, output_dict=output_dict)


def create_medclip_loss(args, options: MedclipOptions | None = None) -> ClipLoss:
    """Build the loss from `open_clip_train` args plus the `--medclip-*` options (`MedclipOptions`, else in `args`)."""
    options = options or MedclipOptions.from_args(args)
    common = dict(
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=args.horovod,
    )
    kind = options.loss
    if kind == "clip":
        return LabelTolerantClipLoss(**common)
    if kind == "soft":
        return SemanticMatchingLoss(
            label_similarity=options.label_similarity,
            temperature=options.label_temperature,
            **common,
        )
    raise ValueError(f"unknown --medclip-loss {kind!r}; choose one of {LOSS_KINDS}")

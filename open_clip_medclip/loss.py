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
from open_clip.loss import ClipLoss, gather_features

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch built without distributed
    dist = None

try:
    import horovod.torch as hvd
except ImportError:
    hvd = None

LABEL_SIMILARITIES = ("dot", "cosine")
LOSS_KINDS = ("soft", "clip")
# Same loss, two kernels: `square` (one logits matmul, symmetric passes) is fastest on CPU, where the matmul
# dominates; `rows` (two matmuls, row-wise fused softmaxes) on GPUs, where column reductions are slow and
# matmuls cheap. `auto` picks by device; tests/benchmarks/bench_loss.py measures both against ClipLoss.
LOSS_KERNELS = ("auto", "square", "rows")


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
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse_rows = torch.logsumexp(logits, dim=1)
        lse_cols = torch.logsumexp(logits, dim=0)
        total = lse_rows.sum() + lse_cols.sum() - torch.dot(targets.reshape(-1), logits.reshape(-1))
        ctx.save_for_backward(logits, lse_rows, lse_cols, targets)
        return total / (2 * logits.shape[0])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, lse_rows, lse_cols, targets = ctx.saved_tensors
        grad = torch.sub(logits, lse_rows[:, None]).exp_()
        grad += torch.sub(logits, lse_cols[None, :]).exp_()
        grad -= targets
        grad *= grad_output / (2 * logits.shape[0])
        return grad, None


def _all_gather_nograd(tensor: torch.Tensor, world_size: int, use_horovod: bool) -> torch.Tensor:
    """Concatenate a label tensor from every rank in rank order (labels carry no gradient)."""
    if use_horovod:
        if hvd is None:
            raise RuntimeError("use_horovod=True but horovod is not installed")
        return hvd.allgather(tensor)
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


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
        self.label_similarity = label_similarity
        self.temperature = float(temperature)
        self.kernel = kernel

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

    @torch.no_grad()
    def soft_targets(self, image_labels: torch.Tensor, text_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row targets for the image→text and the text→image logits, in `ClipLoss.get_logits`' layout."""
        image_labels, text_labels = image_labels.float(), text_labels.float()
        all_image_labels, all_text_labels = self._gather_labels(image_labels), self._gather_labels(text_labels)
        if not (self.world_size > 1 and self.local_loss):  # every rank's rows, not only this rank's
            image_labels, text_labels = all_image_labels, all_text_labels
        # two 14-wide matmuls instead of a transposed softmax: column softmaxes are slow on GPUs
        return (
            self._similarity(image_labels, all_text_labels).softmax(dim=1),
            self._similarity(text_labels, all_image_labels).softmax(dim=1),
        )

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
            if self._row_layout(image_features):
                # image→text and text→image logits as two row-major matrices (ClipLoss' layout), row soft CE on each
                logits_per_image, logits_per_text = self.get_logits(
                    image_features, text_features, logit_scale, logit_bias=logit_bias
                )
                target_image, target_text = self.soft_targets(image_labels, text_labels)
                total_loss = (
                    _RowSoftCrossEntropy.apply(logits_per_image, target_image)
                    + _RowSoftCrossEntropy.apply(logits_per_text, target_text)
                ) / 2
            else:
                if self.world_size > 1:
                    image_features, text_features = gather_features(
                        image_features,
                        text_features,
                        local_loss=False,
                        gather_with_grad=self.gather_with_grad,
                        rank=self.rank,
                        world_size=self.world_size,
                        use_horovod=self.use_horovod,
                    )
                logits = logit_scale * image_features @ text_features.T
                if logit_bias is not None:
                    logits = logits + logit_bias
                with torch.no_grad():
                    similarity = self._similarity(
                        self._gather_labels(image_labels.float()), self._gather_labels(text_labels.float())
                    )
                    targets = similarity.softmax(dim=1) + similarity.softmax(dim=0)
                total_loss = _SymmetricSoftCrossEntropy.apply(logits, targets)
        return {"semantic_matching_loss": total_loss} if output_dict else total_loss


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


def create_medclip_loss(args) -> ClipLoss:
    """Build the loss from `open_clip_train` args plus the `--medclip-*` flags (see `open_clip_medclip.train`)."""
    common = dict(
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=args.horovod,
    )
    kind = getattr(args, "medclip_loss", "soft")
    if kind == "clip":
        return LabelTolerantClipLoss(**common)
    if kind == "soft":
        return SemanticMatchingLoss(
            label_similarity=getattr(args, "medclip_label_similarity", "dot"),
            temperature=getattr(args, "medclip_label_temperature", 1.0),
            **common,
        )
    raise ValueError(f"unknown --medclip-loss {kind!r}; choose one of {LOSS_KINDS}")

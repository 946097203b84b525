"""Padding-free text tower: only a batch's real tokens go through BERT's layers (`--medclip-padding-free`).

Report sentences are short (IU: median 13 tokens) while a batch is as wide as its longest text, so most of a
trimmed batch is still padding. Here the real tokens of all texts are packed into one sequence: embeddings, the
linear layers and the feed-forward blocks (nearly all of BERT's FLOPs) see only those tokens; attention re-pads
them to the batch's rows for `F.scaled_dot_product_attention` with the key-padding mask, so each token still
attends to exactly its own text. Every token keeps its position id, so with a pooler that leaves padding out
(`medclip_masked_pooler`) the embeddings equal the padded tower's (tests/train/test_padding_free.py).
MedCLIP's reference pooler averages the padding positions too, so it cannot skip them: refused there.

The attention function is registered through transformers' public `AttentionInterface` as `medclip_packed`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "medclip_packed"


@dataclass(frozen=True)
class Packing:
    """Where each packed token sits in the padded (rows, width) batch."""

    rows: int
    width: int
    flat_index: torch.Tensor  # (tokens,) row * width + column of each real token, row-major
    segments: torch.Tensor  # (tokens,) row of each real token
    key_mask: torch.Tensor  # (rows, 1, 1, width) bool: which keys are real tokens


def pack(tokens: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Packing]:
    """(packed ids (1, T), position ids (1, T), packing) of a padded (rows, width) id batch; pads are `pad_id`."""
    rows, width = tokens.shape
    mask = tokens != pad_id
    flat_index = mask.reshape(-1).nonzero().squeeze(1)
    ids = tokens.reshape(-1).index_select(0, flat_index)
    positions = flat_index % width
    packing = Packing(rows, width, flat_index, flat_index // width, mask[:, None, None, :])
    return ids.unsqueeze(0), positions.unsqueeze(0), packing


def unpack(packed: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(1, T, ...) packed values -> (rows, width, ...) with zeros at the padding positions."""
    values = packed.squeeze(0)
    out = values.new_zeros((packing.rows * packing.width, *values.shape[1:]))
    return out.index_copy(0, packing.flat_index, values).view(packing.rows, packing.width, *values.shape[1:])


def segment_mean(packed: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Mean over each text's real tokens: (1, T, d) -> (rows, d)."""
    values = packed.squeeze(0)
    sums = values.new_zeros(packing.rows, values.shape[-1]).index_add(0, packing.segments, values)
    counts = torch.bincount(packing.segments, minlength=packing.rows).clamp(min=1)
    return sums / counts.unsqueeze(1).to(values.dtype)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     medclip_packing: Packing | None = None, **kwargs):
    """transformers attention function: (1, heads, T, d) packed q/k/v, attention within each text only."""
    if medclip_packing is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} needs packed input (medclip_packing=...); "
                           "it is set by open_clip_medclip's padding-free text tower only")
    heads = query.shape[1]

    def padded(x: torch.Tensor) -> torch.Tensor:  # (1, H, T, d) -> (rows, H, width, d)
        return unpack(x.transpose(1, 2), medclip_packing).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), attn_mask=medclip_packing.key_mask,
                                         dropout_p=dropout, scale=scaling)
    out = out.transpose(1, 2).reshape(-1, heads, out.shape[-1]).index_select(0, medclip_packing.flat_index)
    return out.unsqueeze(0), None  # (1, T, H, d), as transformers' own attention functions return


def _no_mask(*args, attention_mask=None, **kwargs):
    """Mask builder for `medclip_packed`: the packing carries the key-padding mask, so no 4-D mask is built."""
    return None


def register_attention() -> None:
    """Register `medclip_packed` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def encode(transformer, pooler, tokens: torch.Tensor, pad_id: int, with_tokens: bool = False):
    """Pooled text features (rows, d) of a padded id batch, running only its real tokens through `transformer`.

    `pooler` is a MedCLIP masked pooler (its `layers` name the hidden states averaged). With `with_tokens`, also
    the last hidden state re-padded to (rows, width, d), zeros at padding.
    """
    ids, positions, packing = pack(tokens, pad_id)
    out = transformer(input_ids=ids, position_ids=positions, medclip_packing=packing, output_hidden_states=True)
    hidden = torch.stack([out.hidden_states[i] for i in pooler.layers]).mean(0)
    pooled = segment_mean(hidden, packing)
    if with_tokens:
        return pooled, unpack(out.last_hidden_state, packing)
    return pooled

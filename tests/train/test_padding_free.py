"""Padding-free text tower (`--medclip-padding-free`, issue 15): only real tokens pass BERT's layers.

With `medclip_masked_pooler` the embeddings and gradients equal the padded tower's, at 77 tokens or trimmed; the
reference pooler (which averages padding) is refused; the state dict is unchanged, so checkpoints load either way.
"""
from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip_medclip.plugins import openclip_models, openclip_train

import open_clip_medclip  # noqa: F401
from open_clip_medclip import models, padding_free
from open_clip_medclip.errors import UserError
from open_clip_medclip.labels import pack_batch
from open_clip_medclip.loss import SemanticMatchingLoss
from open_clip_medclip.text_width import tokenizer_pad_id, trim_tokens

# real IU-style sentences of very different lengths (one far longer than the rest), as a batch meets them
SENTENCES = ["no pneumothorax is seen today .", "heart size normal .", "the lungs are clear .",
             "there are xxxx xxxx pulmonary opacities with blunting of the bilateral costophrenic xxxx , on the right "
             "greater than left , with pleural thickening versus loculated pleural fluid along the right upper lobe .",
             "mild cardiomegaly", "small left pleural effusion with basilar atelectasis ."]


def _tiny(seed: int = 0, pooler: type | None = None):
    torch.manual_seed(seed)
    model = open_clip.create_model("medclip-tiny", output_dict=True)
    if pooler is not None:
        model.text.pooler = pooler()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # dropout draws differ between layouts; everything else must match
    return model


def _tokens(width: int | None = None) -> torch.Tensor:
    tokens = open_clip.get_tokenizer("medclip-tiny")(SENTENCES)
    assert tokens.shape[1] == 77 and (tokens == 0).any()
    if width is None:
        return tokens
    return trim_tokens(tokens, width, tokenizer_pad_id(open_clip.get_tokenizer("medclip-tiny").tokenizer))


def _text_step(model, tokens):
    model.zero_grad(set_to_none=True)
    features = model.encode_text(tokens, normalize=True)
    (features * torch.linspace(-1, 1, features.shape[1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.text.named_parameters() if p.grad is not None}
    return features.detach(), grads


@pytest.mark.parametrize("multiple", [None, 8, 1])
def test_embeddings_and_gradients_equal_the_padded_tower(multiple):
    """77-padded, trimmed to a multiple of 8 and trimmed to the longest: the same features and text-tower grads."""
    model = _tiny()
    reference = _text_step(model, _tokens())  # the padded tower at OpenCLIP's 77 tokens
    openclip_models.enable_padding_free_text(model)
    assert isinstance(model.text, openclip_models.PaddingFreeTextEncoder)
    features, grads = _text_step(model, _tokens(multiple))
    assert (features - reference[0]).abs().max() <= 1e-6
    assert grads.keys() == reference[1].keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.allclose(grad, reference[1][name], atol=1e-6, rtol=1e-4), name


def test_attention_stays_within_each_text():
    """A text's features do not depend on the other texts of its batch (nor on where it sits in it)."""
    model = _tiny()
    openclip_models.enable_padding_free_text(model)
    model.eval()
    tokens = _tokens(8)
    with torch.no_grad():
        together = model.encode_text(tokens)
        alone = torch.cat([model.encode_text(trim_tokens(row[None], 8, 0)) for row in tokens.flip(0)]).flip(0)
    assert (together - alone).abs().max() <= 1e-5


def test_state_dict_is_unchanged_and_a_padding_free_checkpoint_loads_into_a_plain_model():
    model = _tiny()
    keys = list(model.state_dict())
    openclip_models.enable_padding_free_text(model)
    assert list(model.state_dict()) == keys
    assert openclip_models.enable_padding_free_text(model) is model  # idempotent
    plain = _tiny(seed=1)
    plain.load_state_dict(model.state_dict())
    plain.eval(), model.eval()
    with torch.no_grad():
        assert (plain.encode_text(_tokens()) - model.encode_text(_tokens(8))).abs().max() <= 1e-6


def test_output_tokens_are_the_padded_towers_at_real_positions():
    model = _tiny()
    model.text.output_tokens = True
    model.eval()
    tokens = _tokens(8)
    with torch.no_grad():
        pooled, hidden = model.text(tokens)
        openclip_models.enable_padding_free_text(model)
        pooled_free, hidden_free = model.text(tokens)
    real = tokens != 0
    assert (pooled - pooled_free).abs().max() <= 1e-6
    assert (hidden[real] - hidden_free[real]).abs().max() <= 1e-5 and not hidden_free[~real].any()


def test_reference_pooler_is_refused_with_the_reason():
    """MedCLIP's reference pooler averages padding positions: skipping them would change its embeddings."""
    model = _tiny(pooler=models.MedclipPooler)
    with pytest.raises(UserError, match="medclip_masked_pooler.*MedclipPooler"):
        openclip_models.enable_padding_free_text(model)
    assert type(model.text) is not openclip_models.PaddingFreeTextEncoder


def test_packed_attention_refuses_unpacked_input():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="needs packed input"):
        padding_free.packed_attention(None, q, q, q, None)


def test_packing_round_trip_keeps_positions_and_rows():
    tokens = torch.tensor([[101, 7, 102, 0, 0], [101, 102, 0, 0, 0], [101, 5, 6, 7, 102]])
    ids, positions, packing = padding_free.pack(tokens, 0)
    assert ids.tolist() == [[101, 7, 102, 101, 102, 101, 5, 6, 7, 102]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]
    assert packing.segments.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert torch.equal(padding_free.unpack(ids.unsqueeze(-1), packing).squeeze(-1), tokens)
    values = torch.arange(10.0).view(1, 10, 1)
    assert padding_free.segment_mean(values, packing).squeeze(1).tolist() == [1.0, 3.5, 7.0]


def test_compiled_padding_free_training_step_equals_eager():
    """torch.compile (the `--torchcompile` path) with label passthrough and the padding-free tower: eager's step."""
    torch._dynamo.reset()
    model = _tiny()
    openclip_train.enable_label_passthrough(model)
    openclip_models.enable_padding_free_text(model)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(2, (len(SENTENCES), 14), generator=g).float()
    texts = pack_batch(_tokens(8), labels, labels.flip(0))
    images = torch.randn(len(SENTENCES), 3, 128, 128, generator=g)

    def step(step_model):
        model.zero_grad(set_to_none=True)
        loss = SemanticMatchingLoss()(**step_model(images, texts))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, compiled = step(model), step(torch.compile(model, backend="eager"))
    assert torch.allclose(eager[0], compiled[0], atol=1e-6)
    for name, grad in eager[1].items():
        assert torch.allclose(grad, compiled[1][name], atol=1e-6, rtol=1e-4), name


def test_trainer_flag_trains_padding_free(tmp_path, small_shards):
    """`medclip train --medclip-padding-free` (the same flag works on plain `open_clip_train.main` with autoload)."""
    from open_clip_medclip import train as medclip_train

    argv = ["--model", "medclip-tiny", "--train-data", small_shards["all"], "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--precision", "fp32", "--warmup", "1", "--lr", "1e-4", "--log-every-n-steps", "1",
            "--logs", str(tmp_path), "--name", "free", "--seed", "0", "--train-num-samples", "8", "--epochs", "1",
            "--medclip-padding-free"]
    assert medclip_train.main(argv) == 0
    log = (tmp_path / "free" / "out.log").read_text()
    assert "medclip-tiny text tower runs padding-free" in log and "Semantic_matching_loss" in log
    assert "medclip_padding_free: True" in (tmp_path / "free" / "params.txt").read_text()

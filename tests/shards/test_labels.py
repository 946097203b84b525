"""The label contract (`open_clip_medclip.labels`): coding, validation, policies and batch transport."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from open_clip_medclip import labels
from open_clip_medclip.errors import UserError
from open_clip_medclip.findings import NUM_FINDINGS

L = NUM_FINDINGS


def vector(**changes) -> list:
    values = [None] * L
    for index, value in changes.items():
        values[int(index[1:])] = value
    return values


def test_codes_round_trip_and_blank_code():
    values = vector(f0=1, f1=0.0, f2=-1, f3=None)
    codes = labels.to_codes(values)
    assert codes.dtype == np.int8
    assert codes[:4].tolist() == [1, 0, -1, labels.BLANK_CODE]
    assert labels.from_codes(codes) == [1.0, 0.0, -1.0] + [None] * (L - 3)
    assert labels.codes_matrix([values, values]).shape == (2, L)


@pytest.mark.parametrize("bad, expected", [
    (float("nan"), "NaN is not a label value"),
    ("1", "'1' is a str, not a number"),
    (2.0, "2.0 is not a label value"),
    (True, "True is a bool, not a number"),
])
def test_invalid_values_are_errors_naming_where(bad, expected):
    values = vector(f5=bad)
    with pytest.raises(labels.LabelError) as caught:
        labels.validate_values(values, where="train.csv:7")
    message = str(caught.value)
    assert message.startswith("train.csv:7[5] (Edema): ") and expected in message
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    with pytest.raises(labels.LabelError, match="train.csv:7"):
        labels.to_codes(values, where="train.csv:7")


def test_wrong_length_and_type():
    with pytest.raises(labels.LabelError, match=r"^row 3: expected 14 label values, got 13$"):
        labels.validate_values([0] * 13, where="row 3")
    with pytest.raises(labels.LabelError, match="got str"):
        labels.validate_values("1" * L, where="x")
    assert labels.vector_problems(vector(f0="1", f1=float("nan")), "s.json labels") == [
        "s.json labels[0] (No Finding): '1' is a str, not a number (allowed: 1, 0, -1 or blank)",
        "s.json labels[1] (Enlarged Cardiomediastinum): NaN is not a label value (blank is null / an empty cell)",
    ]


def test_policy_table():
    codes = np.array([1, 0, -1, labels.BLANK_CODE], dtype=np.int8)
    table = {policy: labels.apply_policy(np.tile(codes, (1, 1)), policy)[0].tolist() for policy in labels.POLICIES}
    assert table["zeros"] == [1, 0, 0, 0]
    assert table["ones"] == [1, 0, 1, 0]
    assert table["keep"] == [1, 0, -1, 0]
    assert table["raw"][:3] == [1, 0, -1] and math.isnan(table["raw"][3])
    assert labels.apply_policy(vector(f0=-1), "ones").dtype == np.float32
    assert labels.apply_policy(vector(f0=-1), "ones")[0] == 1.0
    assert labels.policy_values(vector(f0=-1), "zeros")[:2] == [0.0, 0.0]
    assert labels.policy_values(vector(f0=-1), "raw")[:2] == [-1.0, None]
    with pytest.raises(labels.LabelError, match="unknown label policy 'maybe'"):
        labels.apply_policy(codes, "maybe")
    with pytest.raises(labels.LabelError, match="codes must lie in"):
        labels.apply_policy(np.array([3], dtype=np.int8), "zeros")


def test_recorded_policy_compatibility():
    assert labels.check_policy("raw", "ones") == "ones"
    assert labels.check_policy("keep", "ones") == "ones"
    assert labels.check_policy("zeros", "zeros") == "zeros"
    with pytest.raises(labels.LabelError, match=r"^shards/a: built with label policy 'zeros', which cannot give "
                                                r"'ones' targets"):
        labels.check_policy("zeros", "ones", where="shards/a")
    zeros = [0.0] * L
    zeros[2] = -1
    assert labels.stored_value_problems(zeros, "zeros", "x.json labels") == [
        "x.json labels: Cardiomegaly not allowed under label policy 'zeros' (allowed: 1, 0)"]
    assert labels.stored_value_problems(zeros, "keep") == []


@pytest.mark.parametrize("width", [1, 5, 77, 256])
def test_pack_unpack_round_trip_at_any_width(width):
    generator = torch.Generator().manual_seed(width)
    tokens = torch.randint(0, 49408, (4, width), generator=generator)
    image = torch.randint(-1, 2, (4, L), generator=generator).float()
    text = torch.randint(-1, 2, (4, L), generator=generator).float()
    text[1, 3] = float("nan")  # raw blank travels too
    packed = labels.pack_batch(tokens, image, text)
    assert packed.dtype == torch.long and packed.shape == (4, width + 2 * L + 1)
    assert int(packed[:, width:].abs().max()) > 2 ** 40 and int(packed[:, width:-1].abs().max()) <= 2
    out_tokens, out_image, out_text = labels.unpack_batch(packed)
    assert torch.equal(out_tokens, tokens)
    assert out_image.dtype == torch.float32 and torch.equal(out_image, image)
    assert torch.equal(out_text.nan_to_num(9), text.nan_to_num(9))


def test_single_row_packs_and_stacks():
    tokens, image, text = torch.arange(7), torch.zeros(L), torch.ones(L)
    row = labels.pack_batch(tokens, image, text)
    assert row.ndim == 1
    out = labels.unpack_batch(torch.stack([row, row]))
    assert torch.equal(out[0], torch.stack([tokens, tokens])) and torch.equal(out[2], torch.ones(2, L))


def test_unpacked_tensors_are_untouched():
    for texts in (torch.randint(0, 1000, (3, 77)), torch.zeros(3, 2 * L + 1, dtype=torch.long),
                  torch.zeros(0, 5, dtype=torch.long), torch.randint(0, 9, (77,)), torch.zeros(2, 40)):
        out, image, text = labels.unpack_batch(texts)
        assert out is texts and image is None and text is None


def test_pack_rejects_bad_targets():
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(labels.LabelError, match="must be -1, 0, 1 or NaN"):
        labels.pack_batch(tokens, torch.full((2, L), 0.5), torch.zeros(2, L))
    with pytest.raises(labels.LabelError, match="same 2 rows"):
        labels.pack_batch(tokens, torch.zeros(3, L), torch.zeros(3, L))


def test_csv_cells():
    assert [labels.parse_value_text(t) for t in ("", " 1 ", "1.0", "0", "-1", None)] == [None, 1.0, 1.0, 0.0, -1.0,
                                                                                         None]
    for text, expected in (("nan", "row 4: NaN is not a label value"), ("yes", "row 4: 'yes' is not a number"),
                           ("2", "row 4: 2.0 is not a label value"), (float("nan"), "row 4: NaN is not")):
        with pytest.raises(labels.LabelError, match=expected):
            labels.parse_value_text(text, "row 4")
    assert [labels.csv_text(v) for v in (1, 0.0, -1, None)] == ["1.0", "0.0", "-1.0", ""]

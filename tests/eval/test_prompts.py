from __future__ import annotations

import json
import random

import pytest

from open_clip_medclip.eval import prompts as P

EXPECTED = {"Atelectasis": 210, "Cardiomegaly": 15, "Consolidation": 192, "Edema": 18, "Pleural Effusion": 54}


def test_chexpert_grid_counts_and_quirks():
    grid = P.load_prompt_set("medclip_chexpert")
    assert {k: len(v) for k, v in grid.items()} == EXPECTED
    assert list(grid) == list(EXPECTED)  # key order drives seeded sampling
    assert len(set(grid["Pleural Effusion"])) == 36  # "bilateral pleural effusion" is listed twice
    assert any("apperance of" in p for p in grid["Consolidation"])
    assert any("presistent" in p for p in grid["Edema"])
    assert grid["Atelectasis"][0] == " subsegmental atelectasis at the mid lung zone"
    assert " tiny subpulmonic pleural effusion" in grid["Pleural Effusion"]


def test_covid_rsna_counts_and_corrected_set():
    assert len(P.load_prompt_set("medclip_covid")["COVID"]) == 12
    rsna = P.load_prompt_set("medclip_rsna")["Pneumonia"]
    assert len(rsna) == 312 and not any("pneumonia" in p for p in rsna)
    corrected = P.load_prompt_set("rsna_corrected")["Pneumonia"]
    assert len(corrected) == 312 and all("pneumonia" in p for p in corrected)
    assert all(p == " ".join(p.split()) for p in corrected)
    assert len(P.load_prompt_set("rsna_corrected")["Normal"]) == 10


def test_seeded_sampling_is_reproducible_and_per_class():
    grid = P.load_prompt_set("medclip_chexpert")
    first, again = P.sample_prompts(grid, 10, seed=42), P.sample_prompts(grid, 10, seed=42)
    assert first == again and all(len(v) == 10 for v in first.values())
    assert P.sample_prompts(grid, 10, seed=43) != first
    assert P.sample_prompts(grid, None)["Atelectasis"] == grid["Atelectasis"]


def test_class_map_and_missing_class_error():
    prompts = P.select_classes(P.load_prompt_set("rsna_corrected"), ["No Finding", "Pneumonia"], {"No Finding": "Normal"})
    assert list(prompts) == ["No Finding", "Pneumonia"]
    with pytest.raises(ValueError, match="Edema"):
        P.select_classes({"Normal": ["x"]}, ["Edema"])


def test_chexzero_pairs():
    assert P.chexzero_pairs(["Edema", "Pleural Effusion"]) == {"Edema": ("edema", "no edema"),
                                                             "Pleural Effusion": ("pleural effusion", "no pleural effusion")}


REFERENCE_SCRIPT = """
import json, random, sys
from medclip import prompts
full = {"chexpert": prompts.generate_chexpert_class_prompts(), "covid": prompts.generate_covid_class_prompts(),
        "rsna": prompts.generate_rsna_class_prompts()}
random.seed(42)
full["chexpert_n10_seed42"] = prompts.generate_chexpert_class_prompts(10)
json.dump(full, open(sys.argv[1], "w"))
"""


@pytest.mark.reference
def test_grids_and_seeded_draw_equal_the_reference(tmp_path, medclip_reference):
    script, out = tmp_path / "ref.py", tmp_path / "ref.json"
    script.write_text(REFERENCE_SCRIPT)
    medclip_reference(script, out)
    ref = json.loads(out.read_text())
    assert P.load_prompt_set("medclip_chexpert") == ref["chexpert"]
    assert P.load_prompt_set("medclip_covid")["COVID"] == ref["covid"]["COVID"]
    assert P.load_prompt_set("medclip_rsna")["Pneumonia"] == ref["rsna"]["Pneumonia"]
    assert P.sample_prompts(P.load_prompt_set("medclip_chexpert"), 10, seed=42) == ref["chexpert_n10_seed42"]


def test_sampling_matches_random_sample_stream():
    grid = P.load_prompt_set("medclip_chexpert")
    random.seed(7)
    expected = {k: random.sample(v, 5) for k, v in grid.items()}
    assert P.sample_prompts(grid, 5, seed=7) == expected

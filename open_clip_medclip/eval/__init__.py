"""Evaluation: pinned suites, prompts, metrics with bootstrap CIs, zero-shot / retrieval / linear probe, plots.

Import the submodules you need (`suites`, `prompts`, `metrics`, `zeroshot`, `retrieval`, `linear_probe`, `plots`);
nothing heavy is imported here. Training hooks call `open_clip_medclip.eval.zeroshot.zero_shot_metrics`.
"""

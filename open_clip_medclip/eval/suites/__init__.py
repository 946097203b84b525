"""Evaluation suites, one module per job.

A suite definition (`eval_suites/<name>.json`, `definitions`) names its classes, the rule that puts an image in a
class, the split recipe and seed (`recipes`), the prompt set and the ensembling. `build.build_suite` reads the
user's raw dataset through the `open_clip_medclip.sources` adapters, applies the recipe, copies the chosen images
into the output folder and writes a manifest (ids + sha256, hashed itself) plus the CLIP_benchmark `wds` layout
(`export`). `load.load_suite` opens a built folder, a definition-free CSV or a packaged suite name under a root.
"""

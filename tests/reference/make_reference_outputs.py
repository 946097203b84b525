"""Run the authors' MedCLIP code (PyPI `medclip` 0.0.3, transformers 4.24) offline with random weights.

Executed in the isolated reference environment (PYTHONPATH = the reference target dir, see tests/conftest.py).
Writes, for one variant (swin or resnet50): the model's state_dict as `pytorch_model.bin` (exactly what the
authors' Trainer saves) and `reference_outputs.pt` with inputs and outputs, so our side can compare.
Usage: python make_reference_outputs.py {swin,resnet50} OUT_DIR BUNDLED_TOWER_DIR IMAGE [IMAGE ...]
"""
import os
import sys
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import BertConfig, BertModel, BertTokenizerFast, SwinConfig, SwinModel  # noqa: E402

variant, out_dir, tower_dir, *image_paths = sys.argv[1:]
assert transformers.__version__ == "4.24.0", f"reference needs transformers 4.24.0, got {transformers.__version__}"

import medclip  # noqa: E402
from medclip import dataset as md  # noqa: E402
from medclip import modeling_medclip as mm  # noqa: E402

vocab_file = os.path.join(tower_dir, "vocab.txt")


def offline_tokenizer(*_args, **_kwargs):
    # The hub repo has only vocab.txt, so transformers defaults to lower-casing, as the reference does.
    return BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True)


def offline_model(name, **kwargs):
    if "swin" in name:
        return SwinModel(SwinConfig())  # defaults = swin-tiny-patch4-window7-224 geometry
    config = BertConfig.from_json_file(os.path.join(tower_dir, "config.json"))
    config.output_hidden_states = kwargs.get("output_hidden_states", False)
    return BertModel(config)


mm.AutoModel = SimpleNamespace(from_pretrained=offline_model)
mm.AutoTokenizer = SimpleNamespace(from_pretrained=offline_tokenizer)
md.AutoTokenizer = SimpleNamespace(from_pretrained=offline_tokenizer)
mm.torchvision = SimpleNamespace(models=SimpleNamespace(resnet50=lambda pretrained=True: torchvision.models.resnet50(weights=None)))

torch.manual_seed(0)
vision_cls = mm.MedCLIPVisionModelViT if variant == "swin" else mm.MedCLIPVisionModel
model = mm.MedCLIPModel(vision_cls=vision_cls)
with torch.no_grad():
    # Random weights everywhere, including the parts default init leaves constant (norms, BN statistics).
    for name, tensor in model.state_dict().items():
        if tensor.dtype.is_floating_point and name != "logit_scale":
            if name.endswith("running_var"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif name.endswith(("bias", "running_mean")) or "norm" in name or "bn" in name:
                tensor.normal_(0, 0.1)
    model.logit_scale.fill_(5.0)  # above ln(100): the reference clamps it at use, the converter must too
model.eval()
os.makedirs(out_dir, exist_ok=True)
torch.save(model.state_dict(), os.path.join(out_dir, "pytorch_model.bin"))

sentences = [
    "Heart size normal and lungs are clear.",
    "Left pleural effusion with adjacent atelectasis. Right effusion is also present.",
    "Minimal patchy airspace disease within the lingula, may reflect atelectasis or consolidation.",
    "No pneumothorax.",
]
tokenizer = offline_tokenizer()
tokens = tokenizer(sentences, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
extractor = md.MedCLIPFeatureExtractor()
pixel_values = extractor([Image.open(p) for p in image_paths], return_tensors="pt")["pixel_values"]

with torch.no_grad():
    img_embeds = model.encode_image(pixel_values)
    text_embeds = model.text_model(tokens["input_ids"], tokens["attention_mask"])
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # = encode_text without its .cuda()
    logits = model.compute_logits(img_embeds, text_embeds)

torch.save(
    {
        "pixel_values": pixel_values.contiguous(),
        "input_ids": tokens["input_ids"].contiguous(),
        "attention_mask": tokens["attention_mask"].contiguous(),
        "img_embeds": img_embeds.contiguous(),
        "text_embeds": text_embeds.contiguous(),
        "logits": logits.contiguous(),
        "logit_scale_used": model.logit_scale.detach().clone(),
    },
    os.path.join(out_dir, "reference_outputs.pt"),
)
print(f"medclip {medclip.version} reference {variant}: {len(model.state_dict())} state-dict entries written to {out_dir}")

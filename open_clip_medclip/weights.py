"""Official MedCLIP checkpoints: read them safely, say what they are, convert them to OpenCLIP, export local-dirs.

The authors' files are `MedCLIPModel.state_dict()` saved by transformers-4.24-era code: HF `SwinModel` or
torchvision ResNet-50 image towers, HF `BertModel` text tower, bias-free projection heads, a `logit_scale` that the
reference clamps to [0, ln 100] before every use (MedCLIP 0.0.3 `medclip/modeling_medclip.py`, `compute_logits`).
"""
from __future__ import annotations

import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from open_clip_medclip.errors import UserError

OFFICIAL_SWIN = "official-medclip-vit"  # MedCLIP's "ViT" is Swin-T
OFFICIAL_RESNET = "official-medclip-resnet50"
OPEN_CLIP = "open_clip"
LOCAL_DIR = "local-dir"

# The reference clamps to the literal 4.6052 (not ln 100 = 4.60517) in compute_logits; parity needs the literal.
REFERENCE_LOGIT_SCALE_MAX = 4.6052
MAX_ZIP_MEMBER_BYTES = 4 * 1024**3  # the released zips hold one ~550 MB pytorch_model.bin
MAX_ZIP_COMPRESSION_RATIO = 50  # fp32 weights barely compress; a higher ratio means a zip bomb
WEIGHT_MEMBER_NAMES = ("pytorch_model.bin", "model.safetensors", "open_clip_model.safetensors")


class CheckpointError(UserError, ValueError):
    """A checkpoint that can't be used, with the file named and the problem said (one line via `medclip`)."""


@dataclass
class CheckpointInfo:
    path: str
    kind: str  # OFFICIAL_SWIN, OFFICIAL_RESNET, OPEN_CLIP, LOCAL_DIR or "unknown"
    vision_arch: str  # "swin", "resnet50", "other" or "unknown"
    num_tensors: int = 0
    num_parameters: int = 0
    logit_scale: float | None = None
    container: str = ""  # "safetensors", "torch", "zip:<member>", "local-dir"
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------------- reading


def _safe_zip_member(path: Path, archive: zipfile.ZipFile) -> zipfile.ZipInfo:
    """The weights member of a released MedCLIP zip, after checking every member name and size."""
    candidates = []
    for info in archive.infolist():
        name = info.filename
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise CheckpointError(f"{path}: zip member {name!r} has an unsafe path (absolute or '..'); refusing it")
        if info.file_size > MAX_ZIP_MEMBER_BYTES:
            raise CheckpointError(
                f"{path}: zip member {name!r} is {info.file_size} bytes, over the {MAX_ZIP_MEMBER_BYTES}-byte limit"
            )
        if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_COMPRESSION_RATIO:
            raise CheckpointError(
                f"{path}: zip member {name!r} expands {info.file_size / info.compress_size:.0f}x; refusing a "
                "possible zip bomb"
            )
        if Path(name).name in WEIGHT_MEMBER_NAMES:
            candidates.append(info)
    if not candidates:
        names = [i.filename for i in archive.infolist()][:10]
        raise CheckpointError(f"{path}: zip has no {' or '.join(WEIGHT_MEMBER_NAMES)} (members: {names})")
    if len(candidates) > 1:
        raise CheckpointError(f"{path}: zip has several weight files: {[c.filename for c in candidates]}")
    return candidates[0]


def _is_torch_zip(archive: zipfile.ZipFile) -> bool:
    return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())


def _torch_load(source, path: Path, what: str) -> object:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad input
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "central directory" in message or "failed reading" in message or isinstance(exc, EOFError):
            raise CheckpointError(f"{path}: {what} is truncated or corrupt ({message})") from exc
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{path}: {what} holds objects other than tensors; refusing to unpickle it (weights_only=True)"
            ) from exc
        raise CheckpointError(f"{path}: {what} is not a PyTorch checkpoint ({message})") from exc


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Load a state dict from a safetensors file, a torch file or a released MedCLIP zip. Never unpickles code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass 'local-dir:{path}' as the model name to load a local-dir")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or (len(head) == 8 and head[:1] != b"P" and _looks_like_safetensors(path, head)):
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "safetensors"
        except Exception as exc:  # safetensors raises its own error type for malformed files
            raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc
    if head[:2] == b"PK":
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{path}: truncated or corrupt zip/torch file ({exc})") from exc
        with archive:
            if not _is_torch_zip(archive):
                member = _safe_zip_member(path, archive)
                data = archive.read(member)
                what = f"zip member {member.filename}"
                if member.filename.endswith(".safetensors"):
                    from safetensors.torch import load as load_safetensors_bytes

                    return load_safetensors_bytes(data), f"zip:{member.filename}"
                return _unwrap(_torch_load(io.BytesIO(data), path, what), path), f"zip:{member.filename}"
    return _unwrap(_torch_load(str(path), path, "file"), path), "torch"


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    header_len = int.from_bytes(head, "little")
    if header_len <= 0 or header_len > path.stat().st_size:
        return False
    with open(path, "rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a checkpoint: expected a dict of tensors (a state dict)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------------- detection


def detect_kind(state_dict: dict[str, torch.Tensor]) -> str:
    if "vision_model.model.embeddings.patch_embeddings.projection.weight" in state_dict:
        return OFFICIAL_SWIN
    if "vision_model.model.fc.weight" in state_dict:  # torchvision ResNet whose fc is MedCLIP's projection
        return OFFICIAL_RESNET
    if any(k.startswith("visual.") for k in state_dict) and any(k.startswith("text.") for k in state_dict):
        return OPEN_CLIP
    return "unknown"


def checkpoint_vision_arch(state_dict: dict[str, torch.Tensor]) -> str:
    kind = detect_kind(state_dict)
    if kind == OFFICIAL_SWIN:
        return "swin"
    if kind == OFFICIAL_RESNET:
        return "resnet50"
    if kind == OPEN_CLIP:
        if "visual.trunk.patch_embed.proj.weight" in state_dict and any(".attn.relative_position_bias_table" in k for k in state_dict):
            return "swin"
        if "visual.trunk.conv1.weight" in state_dict:
            return "resnet50" if "visual.trunk.layer4.2.conv3.weight" in state_dict else "resnet"
        return "other"
    return "unknown"


def model_vision_arch(model: torch.nn.Module) -> str:
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    name = type(trunk).__name__.lower()
    if "swin" in name:
        return "swin"
    if name == "resnet":
        return "resnet50" if hasattr(trunk, "layer4") and len(trunk.layer4) == 3 and hasattr(trunk.layer4[2], "conv3") else "resnet"
    return "other"


def resolve_source(source: str | os.PathLike) -> Path:
    """The checkpoint file that `source` names: the file itself, or the one checkpoint inside a folder (the unzipped
    release holds a single pytorch_model.bin). A missing path, an empty folder or an ambiguous one is an error
    naming the path and what was expected."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a regular file")
    if (path / "open_clip_config.json").is_file():
        raise CheckpointError(f"{path}: is already an OpenCLIP local-dir; load it with the model name 'local-dir:{path}'")
    found = sorted(p for pattern in ("*", "*/*") for p in path.glob(pattern)
                   if (p.name in WEIGHT_MEMBER_NAMES or p.suffix == ".zip") and p.is_file())
    if len(found) == 1:
        return found[0]
    expected = ", ".join(WEIGHT_MEMBER_NAMES) + " or the released .zip"
    if not found:
        raise CheckpointError(f"{path}: folder holds no checkpoint (expected {expected}); pass the checkpoint file")
    names = ", ".join(str(p.relative_to(path)) for p in found[:5]) + (", ..." if len(found) > 5 else "")
    raise CheckpointError(f"{path}: folder holds several checkpoints ({names}); pass the one you mean")


def describe_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """What a checkpoint file or folder is, for `medclip info`."""
    path = Path(path)
    if path.is_dir():
        config = path / "open_clip_config.json"
        if not config.is_file():
            inner = resolve_source(path)
            info = describe_checkpoint(inner)
            info.notes.insert(0, f"found in folder {path}")
            return info
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
        weights = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
        info = CheckpointInfo(str(path), LOCAL_DIR, cfg.get("model_cfg", {}).get("vision_cfg", {}).get("timm_model_name", "unknown"),
                              container="local-dir")
        info.notes.append(f"weights: {', '.join(weights) or 'none'}")
        info.notes.append(f"preprocess_cfg: {json.dumps(cfg.get('preprocess_cfg', {}))}")
        return info
    state_dict, container = read_state_dict(path)
    kind = detect_kind(state_dict)
    info = CheckpointInfo(
        str(path), kind, checkpoint_vision_arch(state_dict), len(state_dict),
        sum(v.numel() for v in state_dict.values()), container=container,
    )
    if "logit_scale" in state_dict:
        info.logit_scale = float(state_dict["logit_scale"].float().reshape(-1)[0])
    if kind == "unknown":
        info.notes.append("not a MedCLIP or OpenCLIP checkpoint (no vision_model./text_model. or visual./text. keys)")
    if kind in (OFFICIAL_SWIN, OFFICIAL_RESNET):
        if "text_model.projection_head.bias" in state_dict:
            info.notes.append("text projection has a bias: pre-2022-10-23 MedCLIP code (pooler_output), not supported")
        info.notes.append(f"convert with: medclip convert {path} --model {suggest_model_name(kind)} --out DIR")
    return info


def suggest_model_name(kind: str) -> str:
    return {OFFICIAL_SWIN: "medclip-swin", OFFICIAL_RESNET: "medclip-resnet50"}.get(kind, "medclip-swin")


# ---------------------------------------------------------------------------------------------------- conversion

_SWIN_BLOCK_RENAMES = (
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)


def convert_hf_swin_to_timm(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF `SwinModel` (transformers 4.x names) -> timm `swin_tiny_patch4_window7_224` trunk.

    q/k/v fuse into qkv; HF keeps patch merging at the end of stage i, timm at the start of stage i+1;
    `relative_position_index` buffers are recomputed by timm and dropped.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key.endswith("relative_position_index"):
            continue
        if key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("embeddings.norm."):
            out["patch_embed.norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.downsample\.(.+)$", key):
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", key):
            prefix, rest = f"layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            if qm := re.match(r"attention\.self\.(query|key|value)\.(weight|bias)$", rest):
                qkv.setdefault(prefix + "attn.qkv." + qm.group(2), {})[qm.group(1)] = value
                continue
            for old, new in _SWIN_BLOCK_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            else:
                raise KeyError(f"unrecognised Swin key {key!r}")
            out[prefix + rest] = value
        elif key.startswith("pooler."):
            continue
        else:
            raise KeyError(f"unrecognised Swin key {key!r}")
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise KeyError(f"incomplete q/k/v for {key!r}: has {sorted(parts)}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MedCLIP state dict -> OpenCLIP `CustomTextCLIP` state dict for medclip-swin / medclip-resnet50."""
    kind = detect_kind(state_dict)
    if kind not in (OFFICIAL_SWIN, OFFICIAL_RESNET):
        raise CheckpointError("not an official MedCLIP state dict")
    out: dict[str, torch.Tensor] = {}
    vision = {k[len("vision_model.model."):]: v for k, v in state_dict.items() if k.startswith("vision_model.model.")}
    if kind == OFFICIAL_SWIN:
        out.update({"visual.trunk." + k: v for k, v in convert_hf_swin_to_timm(vision).items()})
        head = state_dict.get("vision_model.projection_head.weight")
    else:
        head = vision.pop("fc.weight", None)
        out.update({"visual.trunk." + k: v for k, v in vision.items()})
    if head is not None:
        out["visual.head.proj.weight"] = head
    for key, value in state_dict.items():
        if key.startswith("text_model.model."):
            rest = key[len("text_model.model."):]
            if rest.startswith("pooler."):
                continue  # BERT's CLS pooler is unused by MedCLIP's pooling
            out["text.transformer." + rest] = value
        elif key.startswith("text_model.projection_head."):
            out["text.proj." + key[len("text_model.projection_head."):]] = value
        elif key.startswith("vision_model.") and not key.startswith(("vision_model.model.", "vision_model.projection_head.")):
            out[key] = value  # unknown vision extras: surface them as unexpected keys
        elif not key.startswith(("vision_model.", "text_model.")):
            out[key] = value
    if "logit_scale" in out:
        # The reference clamps before every use; OpenCLIP doesn't at inference, so store the value actually used.
        out["logit_scale"] = out["logit_scale"].float().clamp(0, REFERENCE_LOGIT_SCALE_MAX)
    return out


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_into_model(model: torch.nn.Module, checkpoint_path: str | os.PathLike, strict: bool = True):
    """Load any supported checkpoint into a MedCLIP OpenCLIP model, converting official files on the way."""
    path = Path(checkpoint_path)
    state_dict, _ = read_state_dict(path)
    kind = detect_kind(state_dict)
    model_arch = model_vision_arch(model)
    ckpt_arch = checkpoint_vision_arch(state_dict)
    if kind == "unknown":
        sample = _format_keys(sorted(state_dict)[:5], 5)
        raise CheckpointError(
            f"{path}: not a MedCLIP or OpenCLIP checkpoint (no vision_model./text_model. or visual./text. keys; "
            f"first keys: {sample})"
        )
    if ckpt_arch in ("swin", "resnet50") and model_arch in ("swin", "resnet50") and ckpt_arch != model_arch:
        want = "medclip-swin" if ckpt_arch == "swin" else "medclip-resnet50"
        raise CheckpointError(
            f"{path}: holds {ckpt_arch} image-tower weights but the model has a {model_arch} image tower; "
            f"load it with model '{want}'"
        )
    if kind in (OFFICIAL_SWIN, OFFICIAL_RESNET):
        state_dict = convert_official_state_dict(state_dict)
    expected = model.state_dict()
    for buffer_key in ("text.transformer.embeddings.position_ids",):
        if buffer_key in state_dict and buffer_key not in expected:
            del state_dict[buffer_key]  # transformers >= 4.31 recomputes it
    if "logit_scale" in state_dict and "logit_scale" in expected:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(expected["logit_scale"].shape)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        raise CheckpointError(f"{path}: does not fit this model ({kind}); " + "; ".join(problems))
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state_dict) & set(expected))
        if state_dict[k].shape != expected[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"{path}: tensor shapes do not fit this model: {_format_keys(mismatched, 10)}")
    return model.load_state_dict(state_dict, strict=strict)


# ---------------------------------------------------------------------------------------------------- export


def export_local_dir(model_name: str, source: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert `source` for `model_name` and write an OpenCLIP local-dir / hf-hub repo layout into `out_dir`.

    The folder is written under a hidden temporary name beside `out_dir` and renamed when complete; a failed run
    leaves nothing behind, and temporaries of killed runs are removed on the next run."""
    import shutil

    import open_clip

    from open_clip_medclip.atomic import temp_path
    from open_clip_medclip.hosted import piece
    from open_clip_medclip.model_names import check_model_name
    from open_clip_medclip.models import portable_model_config

    check_model_name(model_name)
    source = resolve_source(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: already exists and is not an empty folder; choose a new --out folder")
    if not out_dir.parent.is_dir():
        raise CheckpointError(f"{out_dir}: its parent folder {out_dir.parent} does not exist")
    tmp_dir = temp_path(out_dir)  # also removes `.{name}.tmp-<pid>` folders of killed runs
    try:
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(source))
        tokenizer = open_clip.get_tokenizer(model_name)
        piece("save_for_hf")(model, tokenizer, portable_model_config(model_name), str(tmp_dir), safe_serialization=True)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir

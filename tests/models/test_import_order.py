"""`import open_clip_medclip` registers the MedCLIP models with open_clip in either import order, without
importing torch or open_clip itself (a one-shot hook registers right after `import open_clip`)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CREATE = ("m = open_clip.create_model('medclip-tiny'); "
          "from open_clip_medclip import MODEL_NAMES, MedclipPooler, MEDCLIP_MEAN; "
          "assert isinstance(m.text.pooler, MedclipPooler) and 'medclip-tiny' in MODEL_NAMES and MEDCLIP_MEAN is not None; "
          "assert 'medclip-tiny' in open_clip.list_models(); print('ok')")


@pytest.mark.parametrize("code", [
    # ours first: nothing heavy yet; open_clip (looked up with find_spec first, then imported through a
    # submodule) registers right after its import
    "import sys, importlib.util; import open_clip_medclip; "
    "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules; "
    "assert importlib.util.find_spec('open_clip') is not None; from open_clip import factory; import open_clip; "
    + CREATE,
    # open_clip first: registered at once
    "import open_clip; import open_clip_medclip; " + CREATE,
], ids=["medclip-first", "open_clip-first"])
def test_models_register_in_either_import_order(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **__import__("os").environ})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_package_hook_and_autoload_hook_together(tmp_path):
    """With the opt-in autoload installed, `import open_clip_medclip` then `import open_clip` puts two post-import
    hooks on sys.meta_path; each asks the other for open_clip's spec (this recursed without end before)."""
    from open_clip_medclip.autoload import install_autoload

    install_autoload(str(tmp_path))
    code = (f"import site; site.addsitedir({str(tmp_path)!r}); import open_clip_medclip, open_clip; "
            "open_clip.create_model('medclip-tiny'); print('registered')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "registered" in result.stdout and "RecursionError" not in result.stderr

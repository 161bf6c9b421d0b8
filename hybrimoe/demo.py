"""Where the embedded demo model lives, for `hybrimoe run` without `--model`.

The demo model is a small Qwen2-MoE byte-level language model trained on Tiny Shakespeare
(`scripts/train_demo_model.py`; its card is `demo_model/README.md`). It ships as package data, so
an installed hybrimoe finds it next to this module with nothing downloaded. It is a plain
transformers checkpoint: `AutoModelForCausalLM` / `AutoTokenizer` load it with
`local_files_only=True`.
"""

from __future__ import annotations

from pathlib import Path

from hybrimoe.errors import ModelError

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_PROMPT = "ROMEO:"


def demo_model_path() -> Path:
    """The demo checkpoint's directory; ModelError if this installation lacks it."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise ModelError(
            f"the demo model is missing from {DEMO_MODEL_DIR}; reinstall hybrimoe or pass --model"
        )
    return DEMO_MODEL_DIR

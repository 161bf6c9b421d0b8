import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """Tiny ops on a loaded shared machine stall in OpenMP barriers; one thread keeps tests quick."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """family -> a saved tiny checkpoint directory (with a byte-level tokenizer), made once."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_checkpoint(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


@pytest.fixture(scope="session")
def bf16_checkpoint(checkpoint, tmp_path_factory):
    """family -> the same tiny checkpoint with its weights cast to bfloat16, made once."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            directory = tmp_path_factory.mktemp(f"{family}-bf16")
            shutil.copytree(checkpoint(family), directory, dirs_exist_ok=True)
            model = AutoModelForCausalLM.from_pretrained(directory).to(torch.bfloat16)
            model.save_pretrained(directory)
            made[family] = directory
        return made[family]

    return get

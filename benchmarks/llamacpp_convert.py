"""llama.cpp's own converter (`convert_hf_to_gguf.py`) with the two snags of the demo's byte tokenizer
worked around (`../shared/peers/llama.cpp/README.md`), everything else as the converter does it.

- the converter does not know the byte tokenizer's pre-tokenizer hash: with no merges every byte
  is one token, so any byte-level pre-tokenizer ("gpt-2") tokenizes it identically;
- llama.cpp's loader wants a merges array for BPE vocabularies: one merge that can never apply to
  UTF-8 text (two 0xFF bytes, "ÿ ÿ" in byte-level form) keeps one token per byte.

Usage: python benchmarks/llamacpp_convert.py LLAMA_CPP_SOURCE MODEL_DIR --outfile X.gguf --outtype bf16
(run with a Python that has transformers, torch, numpy and safetensors; the tree's gguf-py is used)
"""

import runpy
import sys
from pathlib import Path

source = Path(sys.argv.pop(1))
sys.path[:0] = [str(source), str(source / "gguf-py")]

import gguf  # noqa: E402  (the tree's own gguf-py)
from conversion.base import TextModel  # noqa: E402

TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
_add_to_gguf = gguf.SpecialVocab.add_to_gguf


def _add_with_one_merge(self, gw, quiet: bool = False) -> None:
    if self.load_merges and not self.merges:
        self.merges = ["\u00ff \u00ff"]
    _add_to_gguf(self, gw, quiet)


gguf.SpecialVocab.add_to_gguf = _add_with_one_merge
sys.argv[0] = str(source / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")

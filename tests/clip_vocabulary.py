"""CLIP's real BPE tokenizer, built here from the vocabulary the `open-clip-torch` wheel ships
(`open_clip/bpe_simple_vocab_16e6.txt.gz`): nothing is downloaded.

The wheel is installed without its dependencies (README's test command): its torchvision
requirement would pull a CUDA build that breaks transformers on a CPU torch. So its package is
never imported; its tokenizer module (which needs only ftfy, regex, numpy and torch) is loaded
from its file, and serves as the reference the transformers tokenizer is checked against.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

# OpenAI CLIP's vocabulary: 256 byte symbols, the same 256 ending a word, 48,894 merges, then
# <|startoftext|> and <|endoftext|> = 49,408 tokens.
MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
START_OF_TEXT, END_OF_TEXT = 49406, 49407


def open_clip_directory() -> Path:
    spec = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is not installed: run README's test command "
                           "(pip install --no-deps open-clip-torch)")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def open_clip_tokenizer():
    """OpenCLIP's own SimpleTokenizer (the reference), loaded from its module file."""
    path = open_clip_directory() / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in byte order of its construction."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_clip_tokenizer(directory: Path) -> Path:
    """OpenAI CLIP's tokenizer files in ``directory`` (tokenizer.json, as the hub's CLIP checkpoints
    ship it); ``AutoTokenizer.from_pretrained(directory)`` loads a CLIPTokenizer."""
    from transformers import CLIPTokenizer

    lines = gzip.open(open_clip_directory() / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:MERGES + 1]]  # the first line is a version header
    symbols = byte_symbols()
    vocabulary = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocabulary += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocabulary) == VOCAB_SIZE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(vocab={token: index for index, token in enumerate(vocabulary)},
                              merges=merges, model_max_length=77)
    tokenizer.save_pretrained(directory)
    return directory

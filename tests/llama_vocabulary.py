"""Llama-2's real SentencePiece tokenizer (Vicuna v1.5 keeps its vocabulary), built from the
vocabulary in tests/assets/llama2_vocab/ (README there: its source and hashes).

Built as Llama-2's and Vicuna v1.5's tokenizer loads in transformers' legacy mode: every text
segment (the whole text, or each piece between special tokens such as <image>) gets
SentencePiece's dummy "▁" prefix and its spaces become "▁"; BPE with byte fallback. "<image>" is
the added special token 32000, as in the llava-hf checkpoints the authors start from.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets" / "llama2_vocab"
VOCABULARY = "ggml-vocab-llama-spm.gguf"
SHA256 = {VOCABULARY: "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
          f"{VOCABULARY}.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
          f"{VOCABULARY}.out": "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29"}
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = 32000
KNOWN_IDS = {"▁": 29871, "<0x0A>": 13, "▁Hello": 15043}


def check_assets() -> None:
    for name, digest in SHA256.items():
        found = hashlib.sha256((ASSETS / name).read_bytes()).hexdigest()
        if found != digest:
            raise RuntimeError(f"{ASSETS / name}: sha256 {found}, expected {digest} (tests/assets/llama2_vocab/README.md)")


@lru_cache(maxsize=1)
def llama2_tokenizer():
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    check_assets()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS, gguf_file=VOCABULARY)
    backend = tokenizer.backend_tokenizer
    # Llama-2's tokenizer.json (legacy): the dummy prefix and the spaces, per segment; no pre-tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_TOKEN_INDEX:
        raise RuntimeError(f"{IMAGE_TOKEN} got id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, expected "
                           f"{IMAGE_TOKEN_INDEX}")
    return tokenizer


def reference_pairs() -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test texts and the ids the reference tokenizer gives them."""
    texts = (ASSETS / f"{VOCABULARY}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (ASSETS / f"{VOCABULARY}.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]

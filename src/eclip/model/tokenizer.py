"""An offline tokenizer: lower-cased words hashed into a fixed vocabulary.

It needs no vocabulary file and no download, so a model saved with its config reloads anywhere.
Hash collisions are rare at 8k buckets for catalog titles and cost little: the text tower sees
word order and context too.
"""

from __future__ import annotations

import re
import zlib

import torch

PAD_ID, CLS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3
_WORD = re.compile(r"[a-z0-9]+")


class HashTokenizer:
    def __init__(self, vocab_size: int = 8192, context_length: int = 32):
        if vocab_size <= NUM_SPECIAL:
            raise ValueError(f"vocab_size must exceed {NUM_SPECIAL}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.context_length = context_length

    def word_id(self, word: str) -> int:
        # crc32, not hash(): Python salts str hashes per process.
        return NUM_SPECIAL + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - NUM_SPECIAL)

    def encode(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower())[: self.context_length - 2]
        return [CLS_ID, *(self.word_id(w) for w in words), EOS_ID]

    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns token ids (B, T) and a boolean mask (B, T), True on real tokens."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = self.encode(text)
            ids[row, : len(encoded)] = torch.tensor(encoded)
        return ids, ids != PAD_ID

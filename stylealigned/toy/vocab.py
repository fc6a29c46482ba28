"""Word-level CLIP tokenizers for tiny models: each listed word is one token, anything else is spelled out."""

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"
ALPHABET = string.ascii_lowercase + string.digits + ",.-'"


def word_level_tokenizer(words: list[str], folder) -> CLIPTokenizer:
    """Write vocab.json and merges.txt for `words` into `folder` and load them as a CLIPTokenizer.

    The merges build each word from its characters, so a listed word encodes to one token; other text falls back to
    single characters of ALPHABET (lowercased, as CLIP does).
    """
    tokens = [START, END] + [c + suffix for c in ALPHABET for suffix in ("", "</w>")]
    merges = []
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{prefix} {piece}")
            prefix += piece
            tokens.append(prefix)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)

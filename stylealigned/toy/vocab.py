"""Word-level CLIP and T5 tokenizers for tiny models: each listed word is one token, anything else is spelled out."""

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import CLIPTokenizer, T5TokenizerFast

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


def t5_tokenizer(words: list[str], model_max_length: int = 512) -> T5TokenizerFast:
    """A T5-style Unigram tokenizer: <pad>=0, </s>=1 appended to every text, <unk>=2; one token per listed word.

    Other text falls back to single characters of ALPHABET (T5 does not lowercase: capitals become <unk>).
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in dict.fromkeys(words)] + [(c, -5.0) for c in ALPHABET]
    backend = Tokenizer(Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)],
    )
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=model_max_length)

"""A small SentencePiece (Llama-2 / Mistral style) tokenizer trained on the spot: no hub download needed.

SentencePiece marks a word's leading space inside the token ("▁pens"), and decoding a piece alone drops that space;
tests use it to check that text is always decoded in context.
"""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path

CORPUS = [
    "Ann has 4 pens and buys 5 more. How many pens?",
    "A box holds 6 eggs. How many eggs are in 7 boxes?",
    "Sam had 30 stickers and gave away 12. How many are left?",
    "Tom has 2 apples and buys 3 more. How many?",
    "Ann has 4 and buys 5 so 4+5 = <<4+5=9>>9 pens in all",
    "The answer is: 9",
    "0 1 2 3 4 5 6 7 8 9 + - * / = << >> . , : ? ! ( ) $ %",
]


@functools.lru_cache(maxsize=1)
def sentencepiece_tokenizer():
    """A ``LlamaTokenizer`` over a 400-piece BPE model, with a chat template, EOS and pad tokens."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder = Path(tempfile.mkdtemp(prefix="spm-"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=3,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=True)
    tokenizer.pad_token = "<pad>"
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return tokenizer

"""Training data: examples, the JSONL format, built-in stdlib corpora, sources and tokenizers."""
from gembed.data.builtin import load_builtin
from gembed.data.examples import Example
from gembed.data.jsonl import read_jsonl, write_jsonl
from gembed.data.sources import load_examples
from gembed.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

__all__ = [
    "Example",
    "SentencePieceTokenizer",
    "load_builtin",
    "load_examples",
    "read_jsonl",
    "train_sentencepiece",
    "write_jsonl",
]

"""SentencePiece tokenizer: load a model, encode text to ids, and train a model for code and text.

Tokenizers are tagged with `kind` and share a small interface (vocab_size, the special ids and
`encode`) so other implementations can stand in for this one.

A model trained here encodes through its `tokenizers` Unigram equivalent
(`gembed.data.sentencepiece_json`), the tokenizer.json an export ships, so gembed, transformers and
TEI give the same ids by construction. That is SentencePiece's segmentation except where two
segmentations score exactly the same (e.g. runs of spaces split as 3+1 or 1+3): SentencePiece's
float32 Viterbi breaks such ties by rounding, the Unigram's float64 one by position (and for a
literal special-piece name such as "</s>" whose characters are not all pieces). A model trained
elsewhere (other normalisation, user-defined symbols) encodes with SentencePiece itself.
"""
import io
import itertools
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece

from gembed.data.sentencepiece_json import sentencepiece_to_tokenizers
from gembed.errors import GembedUserError

MAX_TRAINING_TEXTS = 200_000
TRAINER_OPTIONS = dict(
    model_type="unigram",
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    byte_fallback=True,  # unseen characters become byte pieces, never UNK
    split_digits=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,  # keep indentation
    allow_whitespace_only_pieces=True,  # let runs of indentation become single pieces
    num_threads=1,  # with no shuffling, makes the model byte-identical for the same input
    shuffle_input_sentence=False,
    minloglevel=2,
)


class SentencePieceTokenizer:
    """Encodes text with a trained SentencePiece model file."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike):
        self.path = os.fspath(model_path)
        if not os.path.isfile(self.path):
            raise GembedUserError(
                f"{self.path}: tokenizer model not found; "
                "check the path or train one with train_sentencepiece"
            )
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(model_file=self.path)
        except (RuntimeError, OSError):
            raise GembedUserError(
                f"{self.path}: not a valid SentencePiece model; "
                "point to a .model file or retrain the tokenizer"
            ) from None
        self.vocab_size: int = self._processor.vocab_size()
        self.pad_id: int = self._processor.pad_id()
        self.unk_id: int = self._processor.unk_id()
        self.bos_id: int = self._processor.bos_id()
        self.eos_id: int = self._processor.eos_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise GembedUserError(
                f"{self.path}: SentencePiece model has no pad or eos piece; "
                "retrain it with train_sentencepiece"
            )
        try:
            self._unigram = sentencepiece_to_tokenizers(self.path)
        except GembedUserError:  # not a model this package trains: SentencePiece's own encoder
            self._unigram = None

    def encode(self, texts: Sequence[str], max_length: int, add_eos: bool = False) -> list[list[int]]:
        """Token ids per text, truncated to `max_length` ids; with `add_eos` the last id is always eos."""
        if max_length < 1:
            raise GembedUserError(f"max_length must be at least 1, got {max_length}; raise MAX_LENGTH")
        if self._unigram is not None:
            encoded = [encoding.ids for encoding in self._unigram.encode_batch(list(texts))]
        else:
            encoded = self._processor.encode(list(texts), out_type=int)
        if add_eos:
            return [ids[: max_length - 1] + [self.eos_id] for ids in encoded]
        return [ids[:max_length] for ids in encoded]


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, output_path: str | os.PathLike
) -> SentencePieceTokenizer:
    """Train a unigram model on (at most MAX_TRAINING_TEXTS of) `texts`, write it atomically, load it."""
    sample = [text for text in itertools.islice(texts, MAX_TRAINING_TEXTS) if text]
    if not sample:
        raise GembedUserError("no text to train the tokenizer on; check that the training data is not empty")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size, **TRAINER_OPTIONS
        )
    except RuntimeError as error:
        user_error = _vocab_size_error(str(error), vocab_size)
        if user_error is None:
            raise
        raise user_error from None
    output_path = os.fspath(output_path)
    output_directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(output_directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output_directory, suffix=".tmp", delete=False) as temporary:
        temporary.write(model.getvalue())
    os.replace(temporary.name, output_path)
    return SentencePieceTokenizer(output_path)


def _vocab_size_error(message: str, vocab_size: int) -> GembedUserError | None:
    """The user error for sentencepiece's vocabulary-size complaints; None for any other failure."""
    too_high = re.search(r"Vocabulary size too high .*value <= (\d+)", message)
    if too_high:
        return GembedUserError(
            f"VOCAB_SIZE {vocab_size} is too large for this tokenizer corpus; "
            f"lower VOCAB_SIZE to at most {too_high.group(1)} or train on more text"
        )
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        return GembedUserError(
            f"VOCAB_SIZE {vocab_size} is too small to hold every character and byte piece; "
            f"raise VOCAB_SIZE to at least {too_low.group(1)}"
        )
    return None

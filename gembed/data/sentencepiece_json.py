"""A gembed SentencePiece model (`train_sentencepiece`) as a Hugging Face `tokenizers` Unigram
tokenizer that gives the same ids, for transformers' fast tokenizer and TEI.

SentencePiece encodes by a Viterbi search over the whole normalised text (no pre-splitting) using
only its NORMAL pieces; control, unknown and byte pieces never match text (bytes stand in for
unknown characters). A `tokenizers` Unigram model matches every vocabulary entry, so the
non-NORMAL entries get a score far below any NORMAL path: a literal "</s>" or "<0x0A>" in a text
then tokenises into characters as in SentencePiece, as long as those characters are pieces (when
one is not, the literal name wins over the unknown-character path: the one way, besides exact
score ties, in which this tokenizer differs from SentencePiece). The low score only shifts the
unknown-character penalty (`min_score` - 10 in both), which every competing path pays equally.
Normalisation is gembed's trainer's: identity rule, a "▁" dummy prefix, spaces escaped to "▁",
whitespace kept as is.
"""
from __future__ import annotations

import pathlib

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, normalizers

from gembed.errors import GembedUserError

PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
UNMATCHABLE_MARGIN = 1e6   # below the lowest NORMAL score; far above float64 rounding of the sums
SPACE = "▁"


def _check_supported(model: sentencepiece_model_pb2.ModelProto, path: pathlib.Path) -> None:
    """Raises unless the model was trained with the options this conversion reproduces."""
    spec, trainer = model.normalizer_spec, model.trainer_spec
    unsupported = {
        "model_type": trainer.model_type != trainer.UNIGRAM,
        "normalization_rule_name": spec.name != "identity" or bool(spec.precompiled_charsmap),
        "add_dummy_prefix": not spec.add_dummy_prefix,
        "remove_extra_whitespaces": spec.remove_extra_whitespaces,
        "escape_whitespaces": not spec.escape_whitespaces,
        "treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
        "byte_fallback": not trainer.byte_fallback,
        "user_defined_symbols": any(piece.type == PIECE.USER_DEFINED for piece in model.pieces),
    }
    wrong = [option for option, differs in unsupported.items() if differs]
    if wrong:
        raise GembedUserError(
            f"{path}: a SentencePiece model trained with other {', '.join(wrong)} than gembed's "
            f"train_sentencepiece; its tokenizer.json conversion would not give the same ids, so "
            f"retrain the tokenizer with gembed.")


def sentencepiece_to_tokenizers(path: str | pathlib.Path) -> tokenizers.Tokenizer:
    """The `tokenizers` Unigram tokenizer of a gembed SentencePiece .model file.

    No special tokens are added to texts and none are matched in them; a post-processor (e.g. an
    appended eos) is the caller's to set.
    """
    path = pathlib.Path(path)
    model = sentencepiece_model_pb2.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 (protobuf's DecodeError, or OSError)
        raise GembedUserError(f"{path}: not a SentencePiece model ({e}); point to the workdir's "
                              f"tokenizer.model.") from None
    _check_supported(model, path)
    floor = min(piece.score for piece in model.pieces if piece.type == PIECE.NORMAL)
    floor -= UNMATCHABLE_MARGIN
    vocab = [(piece.piece, piece.score if piece.type == PIECE.NORMAL else floor)
             for piece in model.pieces]
    unk_id = next(i for i, piece in enumerate(model.pieces) if piece.type == PIECE.UNKNOWN)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=unk_id,
                                                               byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE),
                                                 normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tokenizer

"""A gembed tokenizer as the tokenizer.json + tokenizer_config.json that transformers' fast
tokenizer, sentence-transformers and TEI load, giving the ids gembed gives.

A SentencePiece model becomes its `tokenizers` Unigram equivalent (the encoder gembed itself uses
for it); a Hugging Face tokenizer.json is kept. For last-token pooling, gembed appends the eos
token unless the tokenizer already ends texts with it; the exported post-processor does the same,
so truncation to the max length keeps eos last, as in gembed.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import tokenizers
from tokenizers import processors

from gembed.data.hf_tokenizer import TOKENIZER_JSON, TOKENIZER_SETTINGS, read_special_tokens
from gembed.data.sentencepiece_json import sentencepiece_to_tokenizers
from gembed.data.tokenizer import SentencePieceTokenizer

PROBE = "a"   # a text whose encoding shows whether the post-processor already appends eos


def _with_eos(tokenizer: tokenizers.Tokenizer, eos: str, eos_id: int) -> tokenizers.Tokenizer:
    """`tokenizer` whose post-processor appends `eos` to every text (pairs: to each text)."""
    if tokenizer.encode(PROBE).ids[-1:] == [eos_id]:
        return tokenizer
    end = {"SpecialToken": {"id": eos, "type_id": 0}}
    appended = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
                                             special_tokens=[(eos, eos_id)])
    data = json.loads(tokenizer.to_str())
    processor = data.get("post_processor")
    if processor is None:
        tokenizer.post_processor = appended
    elif processor["type"] == "TemplateProcessing":
        processor["single"].append(end)
        split = next(i for i, step in enumerate(processor["pair"])
                     if step.get("Sequence", {}).get("id") == "B")
        processor["pair"].insert(split, end)
        processor["pair"].append({"SpecialToken": {"id": eos, "type_id": 1}})
        processor["special_tokens"][eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
        return tokenizers.Tokenizer.from_str(json.dumps(data))
    else:
        tokenizer.post_processor = processors.Sequence([tokenizer.post_processor, appended])
    return tokenizer


def write_transformers_tokenizer(tokenizer, directory: pathlib.Path, *, append_eos: bool,
                                 max_length: int) -> dict[str, int | None]:
    """Writes DIR/tokenizer.json and DIR/tokenizer_config.json for an open gembed tokenizer;
    returns the {pad,bos,eos}_token_id for config.json.

    `append_eos`: the model pools the last token (gembed appends eos to every text).
    """
    if tokenizer.kind == SentencePieceTokenizer.kind:
        converted = sentencepiece_to_tokenizers(tokenizer.path)
        names = {"pad_token": tokenizer.pad_id, "eos_token": tokenizer.eos_id,
                 "bos_token": tokenizer.bos_id, "unk_token": tokenizer.unk_id}
        special = {name: converted.id_to_token(i) for name, i in names.items() if i >= 0}
    else:
        converted = tokenizers.Tokenizer.from_file(tokenizer.path)
        special = read_special_tokens(pathlib.Path(tokenizer.path).parent)
        special["pad_token"] = converted.id_to_token(tokenizer.pad_id)
    converted.no_truncation()
    converted.no_padding()
    if append_eos and tokenizer.eos_id is not None:
        converted = _with_eos(converted, converted.id_to_token(tokenizer.eos_id), tokenizer.eos_id)
    converted.save(str(directory / TOKENIZER_JSON))
    settings: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
        "model_max_length": max_length, "padding_side": "right", "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.kind == SentencePieceTokenizer.kind:
        settings["split_special_tokens"] = True   # gembed never reads "</s>" in a text as eos
    (directory / TOKENIZER_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return {f"{name}_id": converted.token_to_id(special[name]) if name in special else None
            for name in ("pad_token", "bos_token", "eos_token")}

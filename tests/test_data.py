"""Tests for gembed.data: JSONL format and errors, built-in stdlib corpora, sources, tokenizer."""
import hashlib
import itertools
import pathlib
import re
import sysconfig

import pytest

from gembed.data import (
    Example,
    SentencePieceTokenizer,
    builtin,
    load_builtin,
    load_examples,
    read_jsonl,
    train_sentencepiece,
    write_jsonl,
)
from gembed.errors import GembedUserError

GOOD_LINE = b'{"query": "q", "positive": "p"}\n'


def test_jsonl_round_trip(tmp_path):
    examples = [
        Example(query="how to sort", positive="sorted(xs)"),
        Example(query="λ calculus", positive="fun x -> x", negatives=("a", "b ∑"), task="code"),
    ]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, examples)
    assert read_jsonl(path) == examples


def test_jsonl_skips_blank_lines_ignores_extra_keys_and_bom(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"query": "q", "positive": "p", "id": 7}\r\n\n   \n' + GOOD_LINE)
    assert read_jsonl(path) == [Example("q", "p"), Example("q", "p")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b"\xff\xfe not utf8\n", "re-encode the file as UTF-8"),
        (b'{"query": "q", "positive": \n', "invalid JSON"),
        (b'["q", "p"]\n', "expected a JSON object, got an array"),
        (b'{"query": "q"}\n', 'missing key "positive"'),
        (b'{"positive": "p"}\n', 'missing key "query"'),
        (b'{"query": 3, "positive": "p"}\n', '"query" must be a string, got a number'),
        (b'{"query": "q", "positive": "p", "negatives": "n"}\n', '"negatives" must be a list'),
        (b'{"query": "q", "positive": "p", "negatives": ["n", null]}\n', '"negatives[1]" must be a string'),
        (b'{"query": "q", "positive": "p", "task": 1}\n', '"task" must be a string'),
        (b'{"query": " \\t ", "positive": "p"}\n', '"query" is empty'),
        (b'{"query": "q", "positive": ""}\n', '"positive" is empty'),
        (b'{"query": "q", "positive": "p", "negatives": ["\\n"]}\n', '"negatives[0]" is empty'),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(GOOD_LINE + b"\n" + GOOD_LINE + bad_line + GOOD_LINE)
    with pytest.raises(GembedUserError, match=re.escape(f"{path}:4: ")) as raised:
        read_jsonl(path)
    assert message in str(raised.value)


def test_jsonl_missing_and_empty_files(tmp_path):
    with pytest.raises(GembedUserError, match=r"nowhere\.jsonl: file not found"):
        read_jsonl(tmp_path / "nowhere.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n  \n")
    with pytest.raises(GembedUserError, match=r"empty\.jsonl: no examples found"):
        read_jsonl(empty)


def _expected_split(key: str) -> str:
    """The split contract, computed here independently: SHA-256 of the key as a 256-bit integer's
    top 64 bits, mod 100; 0-9 test (the held-out split users report on), 10-19 validation."""
    bucket = (int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) >> 192) % 100
    return "test" if bucket < 10 else "validation" if bucket < 20 else "train"


@pytest.mark.parametrize("name", builtin.CORPUS_NAMES)
def test_builtin_corpus_is_split_without_overlap(name):
    train, validation, test = (load_builtin(name, split) for split in ("train", "validation", "test"))
    assert len(train) > 1000 and len(test) > 100 and len(validation) > 100
    assert len(test) < len(train) / 4 and len(validation) < len(train) / 4
    assert all(e.query.strip() and e.positive.strip() for e in train + validation + test)
    pairs = [{(e.query, e.positive) for e in split} for split in (train, validation, test)]
    assert not (pairs[0] & pairs[1] or pairs[0] & pairs[2] or pairs[1] & pairs[2])


@pytest.mark.parametrize("name", builtin.CORPUS_NAMES)
def test_builtin_splits_follow_an_independent_hash_of_the_module_file(name):
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    expected = {split: [] for split in builtin.SPLITS}
    for entry in builtin._build_corpora()[name]:
        if not entry.split_key.startswith("pydoc_data.topics:"):
            assert entry.split_key.endswith(".py") and (stdlib / entry.split_key).is_file()
            assert not {"site-packages", "dist-packages"} & set(entry.split_key.split("/"))
        expected[_expected_split(entry.split_key)].append(entry.example)
    assert {split: load_builtin(name, split) for split in builtin.SPLITS} == expected


def test_builtin_corpora_are_rebuilt_identically():
    keys = list(itertools.product(builtin.CORPUS_NAMES, builtin.SPLITS))
    loaded = {key: load_builtin(*key) for key in keys}
    builtin._build_corpora.cache_clear()
    assert {key: load_builtin(*key) for key in loaded} == loaded


def test_stdlib_corpora_hold_out_whole_modules_and_code_drops_docstrings():
    splits_by_module = {}
    for name in builtin.CORPUS_NAMES:   # one module file: one split, in both corpora
        for entry in builtin._build_corpora()[name]:
            splits_by_module.setdefault(entry.split_key, set()).add(builtin._split_of(entry.split_key))
    assert all(len(splits) == 1 for splits in splits_by_module.values())
    assert set(builtin.SPLITS) == set().union(*splits_by_module.values())
    code = [e for split in builtin.SPLITS for e in load_builtin("stdlib_code", split)]
    for example in code:
        assert re.match(r"(async )?def ", example.positive)
        assert example.query not in " ".join(example.positive.split())
    # A held-out function's docstring is not a docs training positive (it was when docs were split
    # by dotted name: the name -> docstring pair taught the name of the function to find).
    docs_train = " \n".join(" ".join(e.positive.split()) for e in load_builtin("stdlib_docs", "train"))
    held_out = load_builtin("stdlib_code", "test")
    assert sum(e.query in docs_train for e in held_out) < len(held_out) / 10


def test_builtin_errors():
    with pytest.raises(GembedUserError, match="known: stdlib_code, stdlib_docs"):
        load_builtin("stdlib_poetry", "train")
    with pytest.raises(GembedUserError, match="unknown split 'dev'.*train, validation, test"):
        load_builtin("stdlib_code", "dev")


def test_load_examples_resolves_specs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(GOOD_LINE)
    assert load_examples(str(path), split="test") == [Example("q", "p")]
    assert load_examples("builtin:stdlib_docs", "test") == load_builtin("stdlib_docs", "test")
    with pytest.raises(GembedUserError, match="missing.jsonl: file not found"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(GembedUserError, match="tfds:glue/mrpc:train: cannot open this TFDS split"):
        load_examples("tfds:glue/mrpc:train")
    with pytest.raises(GembedUserError, match=r"'pairs\.csv'.*builtin:stdlib_code"):
        load_examples("pairs.csv")


def _training_texts():
    examples = load_builtin("stdlib_code", "train")[:1000]
    return [text for example in examples for text in (example.query, example.positive)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_sentencepiece(_training_texts(), 1000, tmp_path_factory.mktemp("tok") / "spm.model")


def test_tokenizer_special_ids_and_vocab(tokenizer):
    assert tokenizer.kind == "sentencepiece"
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 1000
    assert SentencePieceTokenizer(tokenizer.path).vocab_size == 1000


def test_tokenizer_encode_truncates_and_keeps_eos_last(tokenizer):
    short, long = "def f(x):\n    return x", "return the sum of the values " * 20
    plain = tokenizer.encode([short, long], max_length=64)
    assert len(plain[1]) == 64 and len(plain[0]) < 63
    with_eos = tokenizer.encode([short, long], max_length=64, add_eos=True)
    assert with_eos[0] == plain[0] + [tokenizer.eos_id]
    assert with_eos[1] == plain[1][:63] + [tokenizer.eos_id]
    assert tokenizer.encode([long], max_length=1, add_eos=True) == [[tokenizer.eos_id]]
    assert tokenizer.bos_id not in itertools.chain(*plain)


def test_tokenizer_keeps_indentation_and_falls_back_to_bytes(tokenizer):
    indented, flat = tokenizer.encode(["if x:\n        y", "if x:\n y"], max_length=64)
    assert indented != flat
    unusual = tokenizer.encode(["λ→∑ 🙂 ∀x∈ℝ"], max_length=64)[0]
    assert unusual and tokenizer.unk_id not in unusual


def test_tokenizer_training_is_byte_identical(tokenizer, tmp_path):
    again = train_sentencepiece(iter(_training_texts()), 1000, tmp_path / "again.model")
    assert open(again.path, "rb").read() == open(tokenizer.path, "rb").read()


def test_tokenizer_user_errors(tmp_path):
    with pytest.raises(GembedUserError, match="missing.model: tokenizer model not found"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(GembedUserError, match="corrupt.model: not a valid SentencePiece model"):
        SentencePieceTokenizer(corrupt)
    tiny_corpus = ["hello world, this is a tiny corpus"] * 20
    with pytest.raises(GembedUserError, match=r"lower VOCAB_SIZE to at most \d+"):
        train_sentencepiece(tiny_corpus, 5000, tmp_path / "tiny.model")
    with pytest.raises(GembedUserError, match=r"raise VOCAB_SIZE to at least \d+"):
        train_sentencepiece(tiny_corpus, 50, tmp_path / "tiny.model")
    assert not (tmp_path / "tiny.model").exists()

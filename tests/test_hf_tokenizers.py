"""Hugging Face ``tokenizer.json`` files through ``load_tokenizer``: GPT-2's byte-level BPE,
BERT's WordPiece and Llama's SentencePiece-style BPE, each trained here on a small text and
saved by ``transformers``; encode, decode, pairs and special-token roles equal its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from functional_llm.data import DataError, load_tokenizer

tr = pytest.importorskip("transformers")
tr.logging.set_verbosity_error()

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "naïve café, Ünïcode: 😀 — déjà vu; x = f(y) + 42",
    "def main():\n    return [i ** 2 for i in range(10)]",
] * 30


def _gpt2() -> tuple[Tokenizer, dict[str, str]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    eot = "<|endoftext|>"
    return tok, {"bos_token": eot, "eos_token": eot, "unk_token": eot}


def _bert() -> tuple[Tokenizer, dict[str, str]]:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    names = ("pad", "unk", "cls", "sep", "mask")
    return tok, {f"{n}_token": s for n, s in zip(names, specials, strict=True)}


def _llama() -> tuple[Tokenizer, dict[str, str]]:
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = ["<unk>", "<s>", "</s>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    return tok, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


@pytest.fixture(scope="module", params=["gpt2", "bert", "llama"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tok, specials = {"gpt2": _gpt2, "bert": _bert, "llama": _llama}[request.param]()
    reference = tr.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return request.param, reference, load_tokenizer(folder), folder


TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from("ab é😀 \n"),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_encode_and_decode_equal_the_files_own(pair: Any, text: str) -> None:
    _, reference, ours, _ = pair
    ids = ours.encode(text).tolist()
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


@settings(max_examples=30, deadline=None)
@given(a=TEXT, b=TEXT)
def test_bert_pairs_equal_the_files_template(pair: Any, a: str, b: str) -> None:
    kind, _, ours, folder = pair
    if kind != "bert":
        pytest.skip("sentence pairs are BERT's")
    want = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(a, b)
    got = ours.encode_example(a, b)
    assert got.ids.tolist() == want.ids
    assert got.token_types.tolist() == want.type_ids


def test_special_tokens_get_our_roles(pair: Any) -> None:
    _, reference, ours, folder = pair
    for role in ("bos", "eos", "unk", "pad", "cls", "sep", "mask"):
        want = getattr(reference, f"{role}_token_id")
        if want is None:
            with pytest.raises(KeyError, match=f"no special token for role '{role}'"):
                ours.id_of(role)
        else:
            assert ours.id_of(role) == want
    bare = load_tokenizer(folder / "tokenizer.json")  # no config beside it: roles by name
    assert bare.id_of("unk") == ours.id_of("unk")
    saved = folder / "ours.json"
    ours.save(saved)
    again = load_tokenizer(saved)
    assert again.specials == ours.specials
    assert again.encode(CORPUS[2]).tolist() == ours.encode(CORPUS[2]).tolist()


def test_an_unsupported_tokenizer_file_is_a_clear_error(tmp_path: Path) -> None:
    tok = Tokenizer(models.Unigram([("a", -1.0), ("<unk>", -2.0)], unk_id=1))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=r"tokenizer.json: .*'Unigram' is not supported"):
        load_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["model"]["type"] == "Unigram"

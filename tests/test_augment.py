"""Augmentation: pure functions of a key (same key, same noise), protected tokens untouched,
each operation's defining property on drawn inputs, its rate on a long sequence."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import random
from functional_llm.data import augment as A

SEEDS = st.integers(0, 2**32 - 1)


def _ids(seed: int, n: int) -> torch.Tensor:
    return random.randint(random.key(seed), (n,), 0, 50)


def _is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(x in it for x in small)


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 60), rate=st.floats(0.0, 0.9))
def test_token_noise_is_a_function_of_the_key_and_spares_protected_tokens(seed, n, rate) -> None:
    ids, key = _ids(seed, n), random.key(seed + 1)
    protected = torch.arange(n) % 5 == 0
    dropped = A.token_dropout(key, ids, rate, protected)
    assert torch.equal(dropped, A.token_dropout(key, ids, rate, protected))
    assert _is_subsequence(dropped.tolist(), ids.tolist())
    assert _is_subsequence(ids[protected].tolist(), dropped.tolist())
    blanked = A.token_blank(key, ids, rate, 99, protected)
    assert torch.equal(blanked[protected], ids[protected])
    assert bool(((blanked == ids) | (blanked == 99)).all())
    replaced = A.token_replace(key, ids, rate, 50, protected)
    assert torch.equal(replaced[protected], ids[protected]) and int(replaced.max()) < 50
    if rate == 0.0:
        assert (
            torch.equal(dropped, ids) and torch.equal(blanked, ids) and torch.equal(replaced, ids)
        )


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 60), k=st.integers(1, 6))
def test_local_shuffle_moves_each_token_fewer_than_k_places(seed, n, k) -> None:
    ids = torch.arange(n)  # each id is its own original position
    protected = torch.arange(n) % 7 == 3
    out = A.local_shuffle(random.key(seed), ids, k, protected)
    assert sorted(out.tolist()) == ids.tolist()
    assert int((out - ids).abs().max()) < k + int(protected.sum())  # free tokens jump the fixed
    assert torch.equal(out[protected], ids[protected])
    if not bool(protected.any()):
        assert int((out - ids).abs().max()) < k


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 60), rate=st.floats(0.0, 0.6))
def test_span_infill_keeps_the_rest_in_order(seed, n, rate) -> None:
    ids = _ids(seed, n)
    out = A.span_infill(random.key(seed), ids, rate, mask_id=99).tolist()
    assert _is_subsequence([x for x in out if x != 99], ids.tolist())
    assert out == A.span_infill(random.key(seed), ids, rate, mask_id=99).tolist()


def test_rates_hold_on_a_long_sequence() -> None:
    ids, key = torch.arange(20_000) % 50, random.key(0)
    blanked = A.token_blank(key, ids, 0.15, 99)
    assert abs(float((blanked == 99).float().mean()) - 0.15) < 0.01
    kept = len(A.token_dropout(key, ids, 0.3)) / 20_000
    assert abs(kept - 0.7) < 0.01
    infilled = A.span_infill(key, ids + 0, 0.3, mask_id=99)
    removed = 1 - int((infilled != 99).sum()) / 20_000
    assert abs(removed - 0.3) < 0.015  # rate of the tokens go into spans


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, words=st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=12))
def test_eda_operations_keep_their_promises(seed, words) -> None:
    key = random.key(seed)
    assert Counter(A.random_swap(key, words, 2)) == Counter(words)
    deleted = A.random_deletion(key, words, 0.5)
    assert _is_subsequence(deleted, words) and (len(deleted) >= 1 or not words)
    inserted = A.random_insertion(key, words, 2)
    assert len(inserted) == len(words) + (2 if words else 0)
    assert set(inserted) <= set(words) and _is_subsequence(words, inserted)
    copies = A.eda(key, words, copies=3)
    assert len(copies) == 3 and copies == A.eda(key, words, copies=3)


def test_bad_augmentation_requests_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\), got 1.0"):
        A.token_dropout(random.key(0), torch.arange(4), 1.0)
    with pytest.raises(ValueError, match="1-D ids"):
        A.token_blank(random.key(0), torch.zeros(2, 3, dtype=torch.long), 0.1, 0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        A.local_shuffle(random.key(0), torch.arange(4), 0)


def test_finetune_classify_adds_eda_copies_with_the_same_labels() -> None:
    import argparse

    from experiments import finetune_classify

    examples = [{"text": "a fine and moving film", "label": "1"}, {"text": "dull", "label": "0"}]
    args = argparse.Namespace(seed=0, augment_copies=3, augment_alpha=0.2)
    out = finetune_classify.augmented(examples, args)
    assert out[:2] == examples and len(out) == 2 + 3 * 2
    assert [e["label"] for e in out[2:5]] == ["1"] * 3
    assert all(set(e["text"].split()) <= set(examples[0]["text"].split()) for e in out[2:5])
    assert out == finetune_classify.augmented(examples, args)  # a function of the seed


def test_finetune_classify_noises_encoded_copies_but_never_their_specials() -> None:
    import argparse

    from experiments import finetune_classify

    texts = ["a fine and moving film", "dull , flat and long", "the best of the year"]
    tok = fl.data.SubwordTokenizer.train(texts * 5, 60)
    labels = ["0", "1"]
    features = fl.data.encode_classification(
        tok, [{"text": t, "label": labels[i % 2]} for i, t in enumerate(texts)], labels
    )
    args = argparse.Namespace(seed=0, augment_copies=4, augment_alpha=0.3)
    out = finetune_classify.noised(features, tok, args)
    assert len(out) == 3 + 3 * 4 and out[:3] == features
    specials = set(tok.special_ids)
    changed = 0
    for i, copy in enumerate(out[3:]):
        original = features[i // 4]
        assert copy["label"] == original["label"] and len(copy["tokens"]) == len(original["tokens"])
        assert list(copy["token_types"]) == list(original["token_types"])
        for a, b in zip(original["tokens"], copy["tokens"], strict=True):
            assert a == b or a not in specials  # [CLS] and [SEP] stay where they were
            changed += int(a != b)
    assert changed > 0
    again = finetune_classify.noised(features, tok, args)
    assert all(list(a["tokens"]) == list(b["tokens"]) for a, b in zip(out, again, strict=True))


# Back-translation: two tiny translators trained to memorise a mapping and its inverse.
PAD, START, EOS = 0, 1, 2
SOURCES = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [4, 6, 8]]
PIVOTS = [[(t * 5) % 9 + 3 for t in s[::-1]] for s in SOURCES]  # reversed, relabelled


def _memorised(pairs: list[tuple[list[int], list[int]]]) -> tuple:
    cfg = fl.models.TransformerConfig(src_vocab_size=12, tgt_vocab_size=12, d_model=32, nhead=2,
                                      num_encoder_layers=1, num_decoder_layers=1,
                                      dim_feedforward=64, dropout=0.0, max_seq_len=8)  # fmt: skip
    model = fl.models.Transformer(cfg)
    batch = fl.data.seq2seq_batch(pairs, pad_id=PAD, bos_id=START, eos_id=EOS)
    opt = fl.optim.adam(1e-2)
    step = fl.train.make_step(fl.losses.seq2seq(model), opt)
    state = fl.train.init_state(model.init(random.key(0)), opt, random.key(1))
    for _ in range(150):
        state, _ = step(state, batch)
    return model, state.params


@pytest.fixture(scope="module")
def translators() -> tuple:
    return (_memorised(list(zip(SOURCES, PIVOTS, strict=True))),
            _memorised(list(zip(PIVOTS, SOURCES, strict=True))))  # fmt: skip


def test_greedy_back_translation_through_memorised_translators_returns_the_source(
    translators: tuple,
) -> None:
    forward, backward = translators
    src, valid = fl.data.seq2seq_batch(list(zip(SOURCES, SOURCES, strict=True)), pad_id=PAD,
                                       bos_id=START, eos_id=EOS)["src"], None  # fmt: skip
    valid = src != PAD
    ids = dict(start_id=START, eos_id=EOS, pad_id=PAD, max_new_tokens=6)
    pivot, pivot_valid = A._translate(forward, src, valid, torch.zeros(4, 2), temperature=0.0,
                                      top_p=None, **ids)  # fmt: skip
    assert [row[ok].tolist() for row, ok in zip(pivot, pivot_valid, strict=True)] == PIVOTS
    out, out_valid = A.back_translate(random.key(0), forward, backward, src, valid,
                                      temperature=0.0, **ids)  # fmt: skip
    assert torch.equal(out, src) and torch.equal(out_valid, valid)


def test_sampled_back_translation_is_a_function_of_the_key_and_the_row(translators: tuple) -> None:
    forward, backward = translators
    src = torch.tensor([[3, 4, 5, 0], [8, 9, 10, 11]])
    valid = src != PAD
    ids = dict(start_id=START, eos_id=EOS, pad_id=PAD, max_new_tokens=6, temperature=3.0)
    a = A.back_translate(random.key(5), forward, backward, src, valid, **ids)
    b = A.back_translate(random.key(5), forward, backward, src, valid, **ids)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    draws = {tuple(A.back_translate(random.key(k), forward, backward, src, valid, **ids)[0][0]
                   .tolist()) for k in range(8)}  # fmt: skip
    assert len(draws) > 1  # a hot sampler paraphrases differently under different keys
    for tokens, ok in zip(*a, strict=True):  # right-padded, the closing EOS taken off
        assert bool(ok[: int(ok.sum())].all()) and bool((tokens[~ok] == PAD).all())
        assert EOS not in tokens[ok].tolist() or tokens[ok].tolist() == [EOS]  # empty: [EOS]
    with pytest.raises(ValueError, match=r"src must be \(batch, length\), got \(4,\)"):
        A.back_translate(random.key(0), forward, backward, src[0], **ids)

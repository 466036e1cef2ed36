"""Data transforms as pure functions of a key: MLM masking rates and protection, NSP pairs,
dynamic padding, and batch orders that shuffle, bucket and resume deterministically."""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from functional_llm import random
from functional_llm.data import BatchOrder, mask_tokens, nsp_pairs, pad_batch
from functional_llm.losses import IGNORE

VOCAB, MASK, SPECIALS = 50, 4, (0, 1, 2, 3, 4)


def corpus(key, shape=(64, 256)):
    tokens = random.randint(key, shape, 5, VOCAB)
    protected = torch.zeros(shape, dtype=torch.bool)
    protected[:, 0] = protected[:, -1] = True  # [CLS], [SEP]
    protected[:, -40:] = True  # padding
    tokens = torch.where(protected, 0, tokens)
    return tokens, protected


def mask(key, tokens, protected, **kw):
    return mask_tokens(key, tokens, protected=protected, mask_id=MASK, vocab_size=VOCAB,
                       special_ids=SPECIALS, **kw)  # fmt: skip


def within(observed, n, p, sigmas=5.0):
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@given(seed=st.integers(0, 2**31 - 1), rate=st.sampled_from([0.05, 0.15, 0.4]))
def test_masking_rates_are_within_binomial_bounds(seed, rate):
    tokens, protected = corpus(random.key(seed))
    inputs, labels = mask(random.key(seed + 1), tokens, protected, rate=rate)
    selected = labels != IGNORE
    n_open = int((~protected).sum())
    assert within(int(selected.sum()), n_open, rate)
    n = int(selected.sum())
    assert within(int((inputs[selected] == MASK).sum()), n, 0.8)
    kept = int((inputs[selected] == tokens[selected]).sum())
    # "keep" (10 %) plus random draws that hit the original id (10 % x 1/45).
    assert within(kept, n, 0.1 + 0.1 / (VOCAB - len(SPECIALS)))
    assert torch.equal(labels[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])


@given(seed=st.integers(0, 2**31 - 1))
def test_masking_never_touches_protected_tokens_and_never_draws_specials(seed):
    tokens, protected = corpus(random.key(seed), (8, 64))
    before = tokens.clone()
    inputs, labels = mask(random.key(seed), tokens, protected, rate=0.9)
    assert torch.equal(tokens, before)  # the input is not mutated
    assert (labels[protected] == IGNORE).all() and torch.equal(inputs[protected], tokens[protected])
    swapped = (labels != IGNORE) & (inputs != MASK) & (inputs != tokens)
    assert not torch.isin(inputs[swapped], torch.tensor(SPECIALS)).any()


def test_same_key_same_masks_other_key_other_masks():
    tokens, protected = corpus(random.key(0), (4, 64))
    a = mask(random.key(1), tokens, protected)
    b = mask(random.key(1), tokens, protected)
    c = mask(random.key(2), tokens, protected)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


@given(seed=st.integers(0, 2**31 - 1))
def test_whole_word_masking_selects_every_piece_of_a_word_together(seed):
    k_tok, k_words, k_mask = random.split(random.key(seed), 3)
    tokens, protected = corpus(k_tok, (4, 128))
    starts = random.bernoulli(k_words, 0.4, tokens.shape) | protected
    _, labels = mask(k_mask, tokens, protected, rate=0.3, word_starts=starts)
    selected = (labels != IGNORE).numpy()
    for row, row_starts, row_protected in zip(
        selected, starts.numpy(), protected.numpy(), strict=True
    ):
        word = np.cumsum(row_starts)
        for w in np.unique(word[~row_protected]):
            members = row[(word == w) & ~row_protected]
            assert members.all() or not members.any()


def test_masking_rejects_bad_rates_and_shapes():
    tokens, protected = corpus(random.key(0), (2, 8))
    with pytest.raises(ValueError, match="rate"):
        mask(random.key(0), tokens, protected, rate=1.5)
    with pytest.raises(ValueError, match="protected"):
        mask(random.key(0), tokens, protected[:, :4])


DOCS = [[f"d{d}s{i}" for i in range(n)] for d, n in enumerate([5, 0, 3, 8, 1, 4])]


@given(seed=st.integers(0, 2**31 - 1))
def test_nsp_pairs_are_true_next_or_from_another_document(seed):
    pairs = nsp_pairs(random.key(seed), DOCS)
    assert len(pairs) == sum(max(len(d) - 1, 0) for d in DOCS)
    for a, b, label in pairs:
        doc_a, i = a[1 : a.index("s")], int(a[a.index("s") + 1 :])
        if label == 0:
            assert b == f"d{doc_a}s{i + 1}"
        else:
            assert not b.startswith(f"d{doc_a}s")
    assert pairs == nsp_pairs(random.key(seed), DOCS)


def test_nsp_random_share_is_half():
    docs = [[f"{d}.{i}" for i in range(50)] for d in range(40)]
    labels = [label for _, _, label in nsp_pairs(random.key(3), docs)]
    assert within(sum(labels), len(labels), 0.5)
    with pytest.raises(ValueError, match="two non-empty"):
        nsp_pairs(random.key(0), [["a", "b"], []])


def test_pad_batch_pads_to_the_longest_and_marks_valid():
    examples = [
        {"tokens": np.array([5, 6, 7]), "labels": np.array([1, 2, 3]), "label": 1},
        {"tokens": np.array([8]), "labels": np.array([4]), "label": 0},
    ]
    batch = pad_batch(examples, {"tokens": 0}, multiple_of=4)
    assert batch["tokens"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, IGNORE], [4, IGNORE, IGNORE, IGNORE]]
    assert batch["valid"].tolist() == [[True] * 3 + [False], [True] + [False] * 3]
    assert batch["label"].tolist() == [1, 0]


@given(n=st.integers(0, 60), size=st.integers(1, 8), seed=st.integers(0, 100),
       drop_last=st.booleans(), bucket=st.integers(1, 4))  # fmt: skip
def test_batch_order_covers_each_index_once_and_resumes_exactly(n, size, seed, drop_last, bucket):
    lengths = [(i * 7919) % 23 for i in range(n)]
    order = functools.partial(BatchOrder, n, size, random.key(seed), drop_last=drop_last,
                              lengths=lengths, bucket=bucket)  # fmt: skip
    batches = list(order())
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    assert len(flat) == (n // size) * size if drop_last else sorted(flat) == list(range(n))
    for start in range(len(batches) + 1):
        assert list(order(start=start)) == batches[start:]


def test_length_bucketing_cuts_padding():
    lengths = [int(x) for x in random.randint(random.key(0), (4000,), 1, 200)]
    padded = lambda order: sum(max(lengths[i] for i in b) * len(b) for b in order)  # noqa: E731
    plain = padded(BatchOrder(4000, 16, random.key(1)))
    bucketed = padded(BatchOrder(4000, 16, random.key(1), lengths=lengths, bucket=50))
    assert bucketed < 0.7 * plain
    # Each epoch has its own order (a collision among 4000! orders is impossible in practice).
    assert (
        BatchOrder(4000, 16, random.key(1), epoch=1).batches()
        != BatchOrder(4000, 16, random.key(1)).batches()
    )


def test_batch_order_drives_a_dataloader():
    data = [{"tokens": np.arange(1 + i % 5), "label": i} for i in range(20)]
    order = BatchOrder(len(data), 6, random.key(4), start=1)
    loader = torch.utils.data.DataLoader(data, batch_sampler=order, collate_fn=pad_batch)
    got = [b["label"].tolist() for b in loader]
    assert got == order.batches()[1:]
    with pytest.raises(ValueError, match="past the epoch"):
        BatchOrder(len(data), 6, random.key(4), start=9)

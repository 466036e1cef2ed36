"""The cross-entropy family against torch's reference and float64 finite differences, and the
task losses against the same computation written out by hand on the models' outputs."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import losses, random
from functional_llm.losses import IGNORE


def logits_and_targets(seed, n, c, ignore_fraction):
    k = random.split(random.key(seed), 3)
    logits = random.normal(k[0], (n, c)) * 3
    targets = random.randint(k[1], (n,), 0, c)
    ignored = random.uniform(k[2], (n,)) < ignore_fraction
    return logits, torch.where(ignored, IGNORE, targets)


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 40),
    c=st.integers(2, 30),
    ignore_fraction=st.sampled_from([0.0, 0.3, 0.9]),
    smoothing=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_cross_entropy_equals_torch(seed, n, c, ignore_fraction, smoothing):
    logits, targets = logits_and_targets(seed, n, c, ignore_fraction)
    loss, aux = losses.cross_entropy(logits, targets, label_smoothing=smoothing)
    counted = int((targets != IGNORE).sum())
    if counted == 0:
        assert float(loss) == 0.0 and int(aux["count"]) == 0
        return
    expected = F.cross_entropy(logits, targets, ignore_index=IGNORE, label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["nll"], F.cross_entropy(logits, targets), rtol=1e-5, atol=1e-6)
    hits = ((logits.argmax(-1) == targets) & (targets != IGNORE)).sum() / counted
    torch.testing.assert_close(aux["accuracy"], hits)
    assert int(aux["count"]) == counted


def test_z_loss_is_mean_squared_logsumexp():
    logits, targets = logits_and_targets(0, 12, 7, 0.25)
    base, _ = losses.cross_entropy(logits, targets)
    with_z, _ = losses.cross_entropy(logits, targets, z_loss=1e-2)
    counted = targets != IGNORE
    lse = torch.logsumexp(logits, -1)[counted]
    torch.testing.assert_close(with_z - base, 1e-2 * lse.square().mean())


@pytest.mark.parametrize("smoothing,z_loss", [(0.0, 0.0), (0.2, 1e-3)])
def test_cross_entropy_gradient_against_float64_finite_differences(smoothing, z_loss):
    logits, targets = logits_and_targets(1, 6, 5, 0.3)
    logits = logits.double().requires_grad_()
    fn = lambda z: losses.cross_entropy(  # noqa: E731
        z, targets, label_smoothing=smoothing, z_loss=z_loss
    )[0]
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_all_ignored_gives_zero_loss_and_finite_gradient():
    logits = torch.randn(3, 4, requires_grad=True)
    loss, aux = losses.cross_entropy(logits, torch.full((3,), IGNORE))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(logits.grad).all()
    assert int(aux["count"]) == 0


def test_cross_entropy_rejects_bad_shapes_and_options():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) need targets of shape \(2, 3\)"):
        losses.cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class ids"):
        losses.cross_entropy(torch.zeros(2, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.next_token(None, label_smoothing=1.0)
    with pytest.raises(KeyError, match=r"has no \['targets'\]"):
        gpt, params = tiny_gpt()
        losses.next_token(gpt)(params, {"inputs": torch.zeros(1, 3, dtype=torch.long)})


def tiny_gpt():
    cfg = fl.models.GPTConfig(vocab_size=11, max_seq_len=8, d_model=8, n_layers=1, n_heads=2)
    model = fl.models.GPT(cfg)
    return model, model.init(random.key(0))


def tiny_bert():
    cfg = fl.models.BERTConfig(
        vocab_size=13, max_seq_len=8, d_model=8, n_layers=1, n_heads=2, d_ff=16, dropout=0.0
    )
    model = fl.models.BERT(cfg)
    return model, model.init(random.key(0))


def test_next_token_shifts_tokens_and_counts_valid_targets():
    model, params = tiny_gpt()
    tokens = random.randint(random.key(1), (2, 7), 0, 11)
    loss, aux = losses.next_token(model)(params, {"tokens": tokens})
    logits = model.apply(params, tokens[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(loss, expected)
    split = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    torch.testing.assert_close(losses.next_token(model)(params, split)[0], loss)
    assert int(aux["count"]) == 12


def test_seq2seq_loss_is_cross_entropy_of_teacher_forced_logits():
    cfg = fl.models.TransformerConfig(
        src_vocab_size=9, tgt_vocab_size=7, d_model=8, nhead=2, num_encoder_layers=1,
        num_decoder_layers=1, dim_feedforward=16, dropout=0.0,
    )  # fmt: skip
    model = fl.models.Transformer(cfg)
    params = model.init(random.key(0))
    k = random.split(random.key(1), 3)
    batch = {
        "src": random.randint(k[0], (2, 5), 0, 9),
        "tgt_in": random.randint(k[1], (2, 4), 0, 7),
        "tgt_out": random.randint(k[2], (2, 4), 0, 7),
    }
    loss, _ = losses.seq2seq(model)(params, batch)
    logits = model.apply(params, batch["src"], batch["tgt_in"])
    torch.testing.assert_close(
        loss, F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten())
    )


def bert_batch():
    k = random.split(random.key(2), 4)
    tokens = random.randint(k[0], (3, 8), 0, 13)
    labels = torch.full((3, 8), IGNORE)
    positions = torch.tensor([[1, 4], [2, 7], [0, 3]])
    originals = random.randint(k[1], (3, 2), 0, 13)
    labels.scatter_(1, positions, originals)
    types = (torch.arange(8) >= 4).long().expand(3, 8)
    return (
        {
            "tokens": tokens,
            "token_types": types,
            "labels": labels,
            "nsp_label": torch.tensor([0, 1, 0]),
        },
        positions,
        originals,
    )


def test_mlm_loss_at_gathered_positions_equals_full_labels():
    model, params = tiny_bert()
    batch, positions, originals = bert_batch()
    full, _ = losses.mlm(model)(params, batch)
    compact = {**batch, "labels": originals, "mlm_positions": positions}
    gathered, aux = losses.mlm(model)(params, compact)
    torch.testing.assert_close(full, gathered)
    out = model.apply(params, batch["tokens"], batch["token_types"])
    logits = model.mlm_logits(params, out.hidden)
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    torch.testing.assert_close(full, expected)
    assert int(aux["count"]) == 6


def test_bert_pretraining_is_mlm_plus_nsp():
    model, params = tiny_bert()
    batch, _, _ = bert_batch()
    total, aux = losses.bert_pretraining(model, nsp_weight=0.5)(params, batch)
    mlm, _ = losses.mlm(model)(params, batch)
    nsp, _ = losses.nsp(model)(params, batch)
    torch.testing.assert_close(total, mlm + 0.5 * nsp)
    torch.testing.assert_close(aux["mlm_loss"], mlm)
    torch.testing.assert_close(aux["nsp_loss"], nsp)


def test_task_head_losses():
    backbone, _ = tiny_bert()
    k = random.split(random.key(3), 4)
    tokens = random.randint(k[0], (4, 8), 0, 13)

    classifier = fl.models.SequenceClassifier(backbone, num_labels=3)
    params = classifier.init(k[1])
    labels = torch.tensor([0, 2, 1, 2])
    loss, _ = losses.classification(classifier)(params, {"tokens": tokens, "label": labels})
    torch.testing.assert_close(loss, F.cross_entropy(classifier.apply(params, tokens), labels))

    tagger = fl.models.TokenClassifier(backbone, num_labels=5)
    params = tagger.init(k[2])
    tags = torch.where(tokens % 3 == 0, IGNORE, tokens % 5)
    loss, _ = losses.token_classification(tagger)(params, {"tokens": tokens, "labels": tags})
    expected = F.cross_entropy(tagger.apply(params, tokens).flatten(0, 1), tags.flatten())
    torch.testing.assert_close(loss, expected)

    qa = fl.models.ExtractiveQA(backbone)
    params = qa.init(k[3])
    start, end = torch.tensor([0, 2, 3, 1]), torch.tensor([0, 4, 3, 6])
    batch = {"tokens": tokens, "start": start, "end": end}
    loss, aux = losses.qa_span(qa)(params, batch)
    spans = qa.apply(params, tokens)
    expected = (F.cross_entropy(spans.start, start) + F.cross_entropy(spans.end, end)) / 2
    torch.testing.assert_close(loss, expected)
    exact = ((spans.start.argmax(-1) == start) & (spans.end.argmax(-1) == end)).float().mean()
    torch.testing.assert_close(aux["exact"], exact)

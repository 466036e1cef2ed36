"""Task formats on small files the tests write: classification CSV/TSV/JSONL, CoNLL with BIO /
BIOES and sub-word label alignment, SQuAD v2 with windows over long contexts and answers mapped
from tokens back to text."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from functional_llm import data
from functional_llm.data import QAExample, SubwordTokenizer
from functional_llm.losses import IGNORE

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()  # noqa: SIM905


@pytest.fixture(scope="module")
def tok():
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) + " ." for i in range(len(WORDS))] * 10
    return SubwordTokenizer.train(corpus, vocab_size=60, kind="wordpiece")


# -- classification ----------------------------------------------------------------------------


def test_reads_tsv_csv_and_jsonl_alike(tmp_path, tok):
    rows = [('a fine film , "really"', "1"), ("dull", "0")]
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "d.csv").write_text('text,label\n"a fine film , ""really""",1\ndull,0\n')
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": int(y)}) + "\n"
                                              for t, y in rows))  # fmt: skip
    want = [{"text": t, "label": y} for t, y in rows]
    for suffix in ("tsv", "csv", "jsonl"):
        assert data.read_classification(tmp_path / f"d.{suffix}") == want
    labels = data.label_vocab(want)
    feats = data.encode_classification(tok, want, labels, max_length=8)
    assert [f["label"] for f in feats] == [1, 0] and all(len(f["tokens"]) <= 8 for f in feats)


def test_pairs_and_errors(tmp_path, tok):
    (tmp_path / "p.tsv").write_text("sentence1\tsentence2\tlabel\nalpha beta\tgamma\tyes\n")
    [ex] = data.read_classification(tmp_path / "p.tsv")
    assert ex == {"text": "alpha beta", "text_pair": "gamma", "label": "yes"}
    [f] = data.encode_classification(tok, [ex], ["no", "yes"])
    assert f["token_types"].tolist().count(1) == len(tok.tokenize("gamma")) + 1
    with pytest.raises(ValueError, match="'maybe' is not among"):
        data.encode_classification(tok, [{**ex, "label": "maybe"}], ["no", "yes"])
    with pytest.raises(ValueError, match="no column 'txt'"):
        data.read_classification(tmp_path / "p.tsv", text="txt")
    with pytest.raises(ValueError, match=r"\.tsv, \.csv or \.jsonl"):
        data.read_classification(tmp_path / "p.txt")


# -- sequence labelling --------------------------------------------------------------------------


def bio_tags():
    """Valid BIO sequences over two entity types."""
    one = st.one_of(st.just(["O"]), st.tuples(st.sampled_from("PL"), st.integers(0, 3)).map(
        lambda tn: [f"B-{tn[0]}"] + [f"I-{tn[0]}"] * tn[1]))  # fmt: skip
    return st.lists(one, max_size=8).map(lambda parts: [t for p in parts for t in p])


@given(tags=bio_tags())
def test_bio_bioes_round_trip(tags):
    bioes = data.bio_to_bioes(tags)
    assert data.bioes_to_bio(bioes) == tags
    assert all(t[0] in "OBIES" for t in bioes)
    following = [*bioes[1:], "O"][: len(bioes)]
    # An entity's B- or I- is always followed by its I- or E-.
    assert not any(a.startswith(("B-", "I-")) and not b.startswith(("I-", "E-"))
                   for a, b in zip(bioes, following, strict=True))  # fmt: skip


def test_read_conll_splits_sentences_and_skips_docstart(tmp_path):
    (tmp_path / "t.conll").write_text(
        "-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\nBlack NNP I-PER\n"
    )
    assert data.read_conll(tmp_path / "t.conll") == [
        (["EU", "rejects"], ["B-ORG", "O"]),
        (["Peter", "Black"], ["B-PER", "I-PER"]),
    ]
    (tmp_path / "bad.conll").write_text("lonely\n")
    with pytest.raises(ValueError, match=r"bad\.conll:1"):
        data.read_conll(tmp_path / "bad.conll")


word_lists = st.lists(
    st.sampled_from([*WORDS, "alphabeta", "Zeta-eta", "qq", "mu,nu"]), min_size=1, max_size=15
)


@given(words=word_lists, max_length=st.integers(4, 40))
def test_alignment_keeps_one_label_per_word(tok, words, max_length):
    labels = [i % 3 for i in range(len(words))]
    [f] = data.encode_tagging(tok, [(words, [str(y) for y in labels])], ["0", "1", "2"],
                              max_length=max_length)  # fmt: skip
    kept = f["labels"] != IGNORE
    seen = f["word_ids"][kept]
    assert len(seen) == len(set(seen.tolist()))  # each word labelled at most once
    assert seen.tolist() == list(range(len(seen)))  # in order, truncation only drops the tail
    assert f["labels"][kept].tolist() == labels[: len(seen)]
    if len(f["tokens"]) < max_length:
        assert len(seen) == len(words)  # nothing was cut: every word labelled
    back = data.word_predictions(f["word_ids"], np.where(kept, f["labels"], 7), len(words), 9)
    assert back == labels[: len(seen)] + [9] * (len(words) - len(seen))


# -- extractive QA -------------------------------------------------------------------------------

contexts = st.lists(st.sampled_from([*WORDS, "Alpha", "beta,", "(iota)", "mu-nu"]),
                    min_size=3, max_size=60)  # fmt: skip


@given(words=contexts, data_=st.data(), max_length=st.integers(16, 40),
       stride=st.integers(1, 8))  # fmt: skip
def test_span_mapping_round_trips_text_to_tokens_to_text(tok, words, data_, max_length, stride):
    first = data_.draw(st.integers(0, len(words) - 1))
    last = data_.draw(st.integers(first, min(first + 2, len(words) - 1)))
    context = " ".join(words)
    start = len(" ".join(words[:first])) + (first > 0)
    answer = " ".join(words[first : last + 1])
    ex = QAExample("q1", "which gamma ?", context, (answer,), (start,))
    feats = data.qa_features(tok, [ex], max_length=max_length, doc_stride=stride, max_query=6)
    hits = [f for f in feats if f["start"] > 0]
    span = data.token_span(tok.tokenize(context).offsets, start, start + len(answer))
    budget = max_length - min(len(tok.tokenize(ex.question)), 6) - 3
    if span[1] - span[0] + stride <= budget:
        assert hits, "an answer that fits a window lies whole in at least one window"
    for f in feats:
        assert len(f["tokens"]) <= max_length
    for f in hits:
        s, e = f["start"], f["end"]
        assert context[f["offsets"][s, 0] : f["offsets"][e, 1]] == answer
        # Scores that pick this window's span and "no answer" in every other window.
        peaked = lambda g, i, hit=f: 10 * np.eye(len(g["tokens"]))[i if g is hit else 0]  # noqa: E731
        starts, ends = [peaked(g, s) for g in feats], [peaked(g, e) for g in feats]
        got = data.predict_answers([ex], feats, starts, ends)
        assert got == {"q1": answer}


def test_unanswerable_questions_point_at_cls_and_predict_empty(tok):
    ex = QAExample("q2", "who ?", "alpha beta gamma", (), (), impossible=True)
    [f] = data.qa_features(tok, [ex], max_length=32)
    assert f["start"] == f["end"] == 0
    s = np.zeros(len(f["tokens"]))
    s[0] = 5.0
    assert data.predict_answers([ex], [f], [s], [s]) == {"q2": ""}
    assert data.predict_answers([ex], [f], [s], [s], null_threshold=None) != {"q2": ""}


def test_read_squad_v2(tmp_path):
    squad = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{
        "context": "Normandy is in France.",
        "qas": [
            {"id": "a", "question": "Where?", "is_impossible": False,
             "answers": [{"text": "France", "answer_start": 15}]},
            {"id": "b", "question": "When?", "is_impossible": True, "answers": [],
             "plausible_answers": [{"text": "France", "answer_start": 15}]},
        ]}]}]}  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(squad))
    a, b = data.read_squad(tmp_path / "s.json")
    assert a.context[a.starts[0] :].startswith(a.answers[0]) and not a.impossible
    assert b.impossible and b.answers == ()
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a SQuAD file"):
        data.read_squad(tmp_path / "x.json")


def test_qa_pipeline_fits_a_small_set_end_to_end():
    """Features -> span loss -> training -> predict_answers -> SQuAD scores: a small model fits
    six answerable questions (the word after the one asked about) and one unanswerable."""
    import functional_llm as fl
    from functional_llm import losses, metrics, optim, random, train

    tok = SubwordTokenizer.train([" ".join(WORDS)] * 5 + ["where who ?"] * 5, vocab_size=150)
    examples = []
    for i in range(6):
        words = WORDS[i:] + WORDS[:i]
        context, at = " ".join(words), len(" ".join(words[:3])) + 1
        examples.append(QAExample(str(i), f"where {words[2]} ?", context, (words[3],), (at,)))
    examples.append(QAExample("none", "who ?", " ".join(WORDS), (), (), impossible=True))
    features = data.qa_features(tok, examples, max_length=24, doc_stride=4, max_query=8)
    fields = ("tokens", "token_types", "start", "end")
    batch = data.pad_batch([{k: f[k] for k in fields} for f in features],
                           {"tokens": tok.id_of("pad")})  # fmt: skip
    cfg = fl.models.BERTConfig(vocab_size=tok.vocab_size, max_seq_len=24, d_model=32,
                               n_layers=2, n_heads=2, d_ff=64, dropout=0.0)  # fmt: skip
    model = fl.models.ExtractiveQA(fl.models.BERT(cfg))
    step = train.make_step(losses.qa_span(model), optim.adam(3e-3))
    state = train.init_state(model.init(random.key(0)), optim.adam(3e-3), random.key(1))
    for _ in range(400):
        state, _ = step(state, batch)
    spans = model.apply(state.params, batch["tokens"], valid=batch["valid"],
                        token_types=batch["token_types"])  # fmt: skip
    n = batch["valid"].sum(-1).tolist()
    starts = [spans.start[r, : n[r]].detach().numpy() for r in range(len(n))]
    ends = [spans.end[r, : n[r]].detach().numpy() for r in range(len(n))]
    answers = data.predict_answers(examples, features, starts, ends)
    assert answers == {**{e.id: e.answers[0] for e in examples[:6]}, "none": ""}
    assert metrics.squad_scores(examples, answers)["exact"] == 100.0

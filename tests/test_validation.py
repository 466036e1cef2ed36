"""Bad input gets a clear error naming what is wrong, and silent wrong results become errors:
token ids and targets out of range, gradients that do not fit their params, seeds outside the
documented range, patterns that match nothing, and data files that are damaged or inconsistent.
Each test is the reproduction of a defect that once passed silently (or with a bare error)."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import data, finetune, losses, optim, random, tree
from functional_llm.data import DataError

GPT = fl.models.GPT(fl.models.GPTConfig(vocab_size=11, max_seq_len=8, d_model=8, n_layers=1,
                                        n_heads=2))  # fmt: skip
BERT = fl.models.BERT(fl.models.BERTConfig(vocab_size=11, max_seq_len=8, d_model=8, n_layers=1,
                                           n_heads=2, d_ff=16))  # fmt: skip


@pytest.mark.parametrize("bad", [-1, 11, 1000])
def test_token_ids_out_of_range_name_the_argument(bad):
    params = GPT.init(random.key(0))
    tokens = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=rf"tokens holds the id {bad} at position \(0, 2\)"):
        GPT.apply(params, tokens)
    with pytest.raises(ValueError, match="token_types holds the id 2"):
        BERT.apply(BERT.init(random.key(0)), torch.ones(1, 3, dtype=torch.long),
                   torch.tensor([[0, 1, 2]]))  # fmt: skip
    with pytest.raises(ValueError, match=rf"cross_entropy targets holds the id {bad}"):
        losses.cross_entropy(torch.zeros(4, 11), torch.tensor([0, bad, 3, -100]))


def test_range_checks_stay_out_of_vmap_and_compile():
    params = GPT.init(random.key(0))
    tokens = torch.randint(0, 11, (3, 2, 5))
    eager = torch.stack([GPT.apply(params, t) for t in tokens])
    mapped = torch.func.vmap(lambda t: GPT.apply(params, t))(tokens)
    torch.testing.assert_close(mapped, eager)
    compiled = fl.train.compile(lambda t: GPT.apply(params, t))
    torch.testing.assert_close(compiled(tokens[0]), eager[0])


def test_gradients_that_do_not_fit_the_params_name_the_path():
    opt = optim.adamw(1e-3)
    params = {"embed": torch.ones(65, 32), "norm": {"scale": torch.ones(32)}}
    state = opt.init(params)
    grads = {"embed": torch.ones(1, 32), "norm": {"scale": torch.ones(32)}}  # would broadcast
    with pytest.raises(ValueError, match=r"gradient of embed is \(1, 32\) .* param is \(65, 32\)"):
        optim.update_and_apply(opt, params, grads, state)
    with pytest.raises(ValueError, match=r"gradient of norm.scale is \(32,\) torch.float64"):
        wrong_dtype = {"embed": torch.ones(65, 32), "norm": {"scale": torch.ones(32).double()}}
        optim.update_and_apply(opt, params, wrong_dtype, state)
    with pytest.raises(ValueError, match=r"structure: missing \['norm.scale'\]") as err:
        optim.update_and_apply(opt, params, {"embed": torch.ones(65, 32)}, state)
    assert "tensor(" not in str(err.value)  # no tensor contents dumped
    with pytest.raises(ValueError, match=r"update of embed is \(1, 32\)"):
        optim.apply_updates(params, grads)


@given(seed=st.integers(0, 2**64 - 1))
def test_any_64_bit_seed_gives_its_two_words(seed):
    k = random.key(seed)
    assert k.tolist() == [seed >> 32, seed & 0xFFFFFFFF]
    if seed >= 2**63:
        assert torch.equal(k, random.key(seed - 2**64))  # the same 64 bits


@pytest.mark.parametrize("seed", [1.5, 1.0, True, "1", 2**64, -(2**63) - 1])
def test_seeds_that_are_not_64_bit_ints_are_refused(seed):
    with pytest.raises((TypeError, ValueError), match=r"random\.key"):
        random.key(seed)


def test_patterns_that_match_nothing_are_errors_unless_allowed():
    params = GPT.init(random.key(0))
    with pytest.raises(ValueError, match=r"select: 'blocks.\*.atn.\*' matches no path"):
        tree.select(params, "blocks.*.attn.*", "blocks.*.atn.*")
    assert tree.select(params, "nothing.*", allow_empty=True) == {}
    with pytest.raises(ValueError, match=r"freeze: 'embd\.\*' matches no path"):
        finetune.freeze(optim.adamw(1e-3), "embd.*").init(params)
    finetune.freeze(optim.adamw(1e-3), "embd.*", allow_empty=True).init(params)


def squad(tmp_path, qa, context="The cat sat on the mat."):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": context, "qas": [qa]}]}]}))
    return path


def test_squad_spans_that_do_not_match_their_text_are_errors(tmp_path):
    ok = {"id": "q1", "question": "Who sat?", "answers": [{"text": "cat", "answer_start": 4}]}
    assert data.read_squad(squad(tmp_path, ok))[0].starts == (4,)
    for start in (5, 40):  # shifted; past the context
        bad = {**ok, "answers": [{"text": "cat", "answer_start": start}]}
        with pytest.raises(DataError, match=rf"qas\[0\].answers\[0\] \(id q1\): the answer 'cat' "
                                            rf"is not at answer_start {start}"):  # fmt: skip
            data.read_squad(squad(tmp_path, bad))


def test_squad_questions_without_answers_or_fields_are_errors(tmp_path):
    with pytest.raises(DataError, match=r"id q1\): no 'answers' field"):
        data.read_squad(squad(tmp_path, {"id": "q1", "question": "Who?"}))
    with pytest.raises(DataError, match=r"does not say \"is_impossible\": true"):
        data.read_squad(squad(tmp_path, {"id": "q1", "question": "Who?", "answers": []}))
    impossible = {"id": "q1", "question": "Who?", "is_impossible": True, "answers": []}
    assert data.read_squad(squad(tmp_path, impossible))[0].impossible
    with pytest.raises(DataError, match=r"qas\[0\]: no 'question' field"):
        data.read_squad(squad(tmp_path, {"id": "q1", "answers": []}))
    path = squad(tmp_path, impossible)
    path.write_text(path.read_text()[:-7])  # truncated
    with pytest.raises(DataError, match=rf"{path}:1:\d+: not valid JSON"):
        data.read_squad(path)


def test_doc_stride_zero_is_refused_instead_of_looping_forever():
    tok = data.SubwordTokenizer.train(["the cat sat on the mat"] * 5, 60)
    ex = data.QAExample("q", "who?", "the cat sat on the mat " * 20, ("cat",), (4,))
    with pytest.raises(ValueError, match=r"doc_stride \(0\)"):
        data.qa_features(tok, [ex], max_length=16, doc_stride=0)


def test_data_files_name_the_file_and_line(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{latin}:2:4: not UTF-8 text \(byte 0xe9\)"):
        data.read_text(latin)
    empty = tmp_path / "empty.conll"
    empty.write_text("-DOCSTART- O\n\n")
    with pytest.raises(DataError, match=f"{empty}: no sentences"):
        data.read_conll(empty)
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(DataError, match="the file is empty"):
        data.read_text(tmp_path / "blank.txt")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a", "label": "x"}\n{"text": "b"\n')
    with pytest.raises(DataError, match=f"{rows}:2: not valid JSON"):
        data.read_classification(rows)
    tok = tmp_path / "tokenizer.json"
    data.CharTokenizer.train("hello").save(tok)
    tok.write_text(tok.read_text()[:-3])
    with pytest.raises(DataError, match=f"{tok}:1:"):
        data.load_tokenizer(tok)
    with pytest.raises(ValueError, match="the text is empty"):
        data.CharTokenizer.train("")

"""Parallel text: the TSV/JSONL/gettext readers (malformed input named by file and line), the
.mo reader against the standard library's gettext, the seq2seq batch and its shift, BLEU and
ROUGE wired to sacrebleu and rouge-score, and a tiny translator that learns its data."""

import gettext
import glob
import json
import struct

import pytest
import torch

import functional_llm as fl
from functional_llm import data, losses, metrics, optim, random, train
from functional_llm import generate as G
from functional_llm.data import DataError
from functional_llm.types import IGNORE

PO = r"""# a comment
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"

#: src/main.c:10
msgid "Hello, world"
msgstr "Hallo, Welt"

msgid "multi "
"line"
msgstr "mehr"
"zeilig \"quoted\"\n"

#, fuzzy
msgid "guessed"
msgstr "geraten"

msgid "untranslated"
msgstr ""

msgctxt "menu"
msgid "File"
msgstr "Datei"

msgid "%d file"
msgid_plural "%d files"
msgstr[0] "%d Datei"
msgstr[1] "%d Dateien"

#~ msgid "obsolete"
#~ msgstr "veraltet"
"""

EXPECTED = [("Hello, world", "Hallo, Welt"), ("multi line", 'mehrzeilig "quoted"\n'),
            ("File", "Datei"), ("%d file", "%d Datei")]  # fmt: skip


def write_mo(path, entries, charset="UTF-8"):
    """A GNU .mo file (as msgfmt writes one) for (msgid, msgstr) byte-string-ready pairs."""
    header = ("", f"Content-Type: text/plain; charset={charset}\n")
    items = sorted([header, *entries])
    ids = [k.encode(charset) for k, _ in items]
    strs = [v.encode(charset) for _, v in items]
    start = 7 * 4 + 16 * len(items)
    offsets, blob = [], b""
    for s in ids + strs:
        offsets.append((len(s), start + len(blob)))
        blob += s + b"\0"
    n = len(items)
    head = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    tables = b"".join(struct.pack("<2I", *o) for o in offsets)
    path.write_bytes(head + tables + blob)


def test_po_catalogs_keep_translated_entries_only(tmp_path):
    (tmp_path / "de.po").write_text(PO, encoding="utf-8")
    assert data.read_parallel(tmp_path / "de.po") == EXPECTED
    (tmp_path / "bad.po").write_text('msgid "a"\nmsgstr b\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.po:2: expected a quoted string"):
        data.read_parallel(tmp_path / "bad.po")


def test_the_mo_reader_agrees_with_the_standard_library(tmp_path):
    entries = [("Hello", "Hallo"), ("menu\x04File", "Datei"), ("%d file\x00%d files",
               "%d Datei\x00%d Dateien"), ("Grüße", "Grüße!"), ("empty", "")]  # fmt: skip
    write_mo(tmp_path / "de.mo", entries)
    pairs = data.read_parallel(tmp_path / "de.mo")
    assert sorted(pairs) == sorted([("%d file", "%d Datei"), ("File", "Datei"),
                                    ("Grüße", "Grüße!"), ("Hello", "Hallo")])  # fmt: skip
    with open(tmp_path / "de.mo", "rb") as f:
        reference = gettext.GNUTranslations(f)
    assert reference.gettext("Hello") == "Hallo" and reference.pgettext("menu", "File") == "Datei"
    assert reference.ngettext("%d file", "%d files", 1) == "%d Datei"
    (tmp_path / "cut.mo").write_bytes((tmp_path / "de.mo").read_bytes()[:40])
    with pytest.raises(DataError, match=r"cut\.mo: a damaged \.mo catalog"):
        data.read_parallel(tmp_path / "cut.mo")
    (tmp_path / "not.mo").write_bytes(b"\0" * 32)
    with pytest.raises(DataError, match=r"not.mo: not a .mo catalog \(magic number 0x0\)"):
        data.read_parallel(tmp_path / "not.mo")


CATALOGS = sorted(glob.glob("/usr/share/locale/de/LC_MESSAGES/*.mo"))[:5]


@pytest.mark.skipif(not CATALOGS, reason="no German catalogs installed on this machine")
def test_installed_catalogs_read_as_gettext_reads_them():
    for path in CATALOGS:
        with open(path, "rb") as f:
            reference = gettext.GNUTranslations(f)
        for source, target in data.read_parallel(path):
            if "\x04" not in source:
                assert reference.gettext(source) in (target, reference.ngettext(source, "", 1))


def test_tsv_and_jsonl_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "p.tsv").write_text("a b\tx y\nno tab here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p.tsv:2: expected 'source<TAB>target', got 1"):
        data.read_parallel(tmp_path / "p.tsv")
    rows = [{"en": "a", "de": "b"}, {"en": "c"}]
    (tmp_path / "ok.jsonl").write_text(json.dumps(rows[0]), encoding="utf-8")
    assert data.read_parallel(tmp_path / "ok.jsonl", source="en", target="de") == [("a", "b")]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, rows)), encoding="utf-8")
    with pytest.raises(DataError, match=r"p.jsonl:2: no 'de' field"):
        data.read_parallel(tmp_path / "p.jsonl", source="en", target="de")
    (tmp_path / "e.tsv").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="the file is empty"):
        data.read_parallel(tmp_path / "e.tsv")


def test_seq2seq_batch_shifts_the_target_and_pads_each_side():
    batch = data.seq2seq_batch([([5, 6, 7], [8, 9]), ([5], [8, 9, 10, 11])], pad_id=0, bos_id=1,
                               eos_id=2)  # fmt: skip
    assert batch["src"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["src_valid"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["tgt_in"].tolist() == [[1, 8, 9, 0, 0], [1, 8, 9, 10, 11]]
    assert batch["tgt_out"].tolist() == [[8, 9, 2, IGNORE, IGNORE], [8, 9, 10, 11, 2]]
    assert batch["tgt_valid"].sum(-1).tolist() == [3, 5]
    cut = data.seq2seq_batch([([5, 6, 7], [8, 9, 10])], pad_id=0, bos_id=1, eos_id=2,
                             max_source=2, max_target=3)  # fmt: skip
    assert cut["src"].tolist() == [[5, 6]] and cut["tgt_out"].tolist() == [[8, 9, 2]]
    with pytest.raises(ValueError, match="a source has no tokens"):
        data.seq2seq_batch([([], [1])], pad_id=0, bos_id=1, eos_id=2)


def test_bleu_and_rouge_come_from_the_reference_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps, refs = ["the cat sat on the mat", "a dog barks"], ["the cat sat on a mat", "dogs bark"]
    got = metrics.bleu(hyps, refs)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    assert metrics.bleu(refs, refs)["bleu"] == pytest.approx(100.0)
    assert metrics.chrf(refs, refs)["chrf"] == pytest.approx(100.0)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    each = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)]
    want = 100 * sum(each) / len(each)
    assert metrics.rouge(hyps, refs)["rougeL"] == pytest.approx(want)
    assert metrics.rouge(refs, refs) == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    with pytest.raises(ValueError, match="one reference per hypothesis"):
        metrics.bleu(hyps, refs[:1])


def test_a_tiny_translator_learns_its_pairs_and_greedy_decoding_reads_them_back():
    pairs = [([3, 4, 5], [6, 7]), ([4, 3], [7, 6, 6]), ([5, 5, 3, 4], [8]), ([3], [8, 7, 6, 9])]
    cfg = fl.models.TransformerConfig(
        src_vocab_size=10, tgt_vocab_size=10, d_model=32, nhead=2, num_encoder_layers=1,
        num_decoder_layers=1, dim_feedforward=64, dropout=0.0, max_seq_len=8,
    )  # fmt: skip
    model = fl.models.Transformer(cfg)
    opt = optim.adam(3e-3)
    step = train.make_step(losses.seq2seq(model), opt, clip_norm=1.0)
    state = train.init_state(model.init(random.key(0)), opt, random.key(1))
    batch = data.seq2seq_batch(pairs, pad_id=0, bos_id=1, eos_id=2)
    for _ in range(300):
        state, _ = step(state, batch)
    out = G.generate(model, state.params, torch.full((4, 1), 1), src=batch["src"],
                     src_valid=batch["src_valid"], max_new_tokens=6, eos_id=2)  # fmt: skip
    for row, (_, target) in enumerate(pairs):
        assert out.tokens[row][out.valid[row]].tolist() == [1, *target, 2]

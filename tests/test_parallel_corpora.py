"""The corpora every machine has: translation pairs from gettext catalogs (format strings
dropped, sources deduplicated, whole catalogs held out) and code summaries from Python source
(docstrings removed, whole modules held out), built here from files the tests write."""

import pytest
from test_parallel_data import write_mo

from experiments import parallel_corpora as pc
from functional_llm.data import DataError


def locale(tmp_path, n=10):
    for i in range(n):
        folder = tmp_path / "de" / "LC_MESSAGES"
        folder.mkdir(parents=True, exist_ok=True)
        entries = [(f"open file {i}", f"Datei {i} öffnen"), ("%s: %d", "%s: %d"),
                   ("shared message", f"geteilt {i}"), ("x" * 300, "lang")]  # fmt: skip
        write_mo(folder / f"prog{i:02d}.mo", entries)
    return (tmp_path,)


def test_translation_pairs_hold_out_whole_catalogs(tmp_path):
    train, dev = pc.translation_corpus("de", dirs=locale(tmp_path))
    assert dict(dev) == {"open file 9": "Datei 9 öffnen"}  # prog09.mo: the 10th catalog
    assert ("shared message", "geteilt 0") in train  # the first translation of a source wins
    sources = [s for s, _ in train]
    assert len(sources) == len(set(sources)) and "%s: %d" not in sources
    assert all(len(s) <= 200 for s in sources) and "shared message" not in dict(dev)


def test_a_language_without_catalogs_names_those_that_exist(tmp_path):
    dirs = locale(tmp_path)
    with pytest.raises(DataError, match=r"no gettext catalogs for 'xx' .* here: de"):
        pc.translation_corpus("xx", dirs=dirs)
    with pytest.raises(DataError, match="need both"):
        pc.translation_corpus("de", dirs=dirs, every=20)  # 10 catalogs cannot hold out 1 in 20


def test_format_strings_alone_are_not_worth_learning():
    assert not pc.usable("%s: %d", "%s: %d", 200)
    assert not pc.usable("{name} <b>{count}</b>", "x", 200)
    assert pc.usable("%s: file not found", "%s: Datei nicht gefunden", 200)


MODULE = '''
def area(width, height):
    """Return the area of a rectangle.

    More words.
    """
    return width * height


class Shape:
    @staticmethod
    def describe(kind):
        """Describe a kind of shape."""
        # a comment stays
        return f"a {kind}"

    def only_docstring(self):
        """This has no body besides the docstring."""


def short():
    """Too short."""
    return 1
'''


def test_code_summaries_remove_the_docstring_and_hold_out_modules(tmp_path):
    for i in range(10):
        (tmp_path / f"mod{i}.py").write_text(MODULE.replace("rectangle", f"rectangle {i}"))
    train, dev = pc.summarization_corpus(root=tmp_path)
    assert len(train) == 18 and len(dev) == 2  # two functions per module, mod9 held out
    source, summary = dev[0]
    assert summary == "Return the area of a rectangle 9."
    assert source == "def area(width, height):\n    return width * height"
    described = next(s for s, t in train if t == "Describe a kind of shape.")
    assert described.startswith("@staticmethod\ndef describe(kind):\n    # a comment stays")

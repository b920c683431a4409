"""Tests of recur.data.conll: CoNLL-U and column files, real counts, bad files."""
import pytest

from recur.data.conll import load_conll2000, load_ud_english_ewt, read_conll, read_conllu
from recur.data.lines import DataFormatError


def _words(sentences):
    return sum(len(words) for words, _ in sentences)


def test_ud_english_ewt_counts(require_dataset):
    require_dataset("ud_english_ewt")
    data = load_ud_english_ewt()
    assert {k: len(v) for k, v in data.items()} == {"train": 12544, "dev": 2001, "test": 2077}
    assert {k: _words(v) for k, v in data.items()} == {"train": 204577, "dev": 25147,
                                                       "test": 25094}
    upos = {t for _, tags in data["train"] for t in tags}
    assert upos == {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART",
                    "PRON", "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X"}
    assert all(len(w) == len(t) for v in data.values() for w, t in v)


def _iob2_ok(tags):
    """True if every I-X follows a B-X or I-X (IOB2)."""
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            return False
        prev = tag
    return True


def test_conll2000_counts_and_iob2(require_dataset):
    require_dataset("conll2000")
    data = load_conll2000()
    assert {k: len(v) for k, v in data.items()} == {"train": 8936, "test": 2012}
    assert {k: _words(v) for k, v in data.items()} == {"train": 211727, "test": 47377}
    assert all(_iob2_ok(tags) for v in data.values() for _, tags in v)
    pos = load_conll2000(tag="pos")
    assert len({t for _, tags in pos["train"] for t in tags}) == 44  # SOURCE.txt
    assert [w for w, _ in pos["test"]] == [w for w, _ in data["test"]]


CONLLU = (
    "# sent_id = 1\n"
    "# text = Don't stop.\n"
    "1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_\n"
    "1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_\n"
    "2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_\n"
    "3\tstop\tstop\tVERB\tVB\t_\t0\troot\t_\t_\n"
    "3.1\tgo\tgo\tVERB\tVB\t_\t_\t_\t0:root\t_\n"
    "4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_\n"
    "\n"
    "1\tYes\tyes\tINTJ\tUH\t_\t0\troot\t_\t_\n"
    "\n"
)


def _file(tmp_path, data, name="toy.conllu"):
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def test_conllu_skips_comments_multiword_tokens_and_empty_nodes(tmp_path):
    path = _file(tmp_path, CONLLU)
    assert read_conllu(path) == [(["Do", "n't", "stop", "."], ["AUX", "PART", "VERB", "PUNCT"]),
                                 (["Yes"], ["INTJ"])]
    assert read_conllu(path, tag="xpos")[0][1] == ["VBP", "RB", "VB", "."]


def test_column_file_with_docstart_and_chosen_columns(tmp_path):
    path = _file(tmp_path, "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
                           "\nPeter NNP B-NP B-PER\n", name="ner.txt")
    assert read_conll(path) == [(["EU", "rejects"], ["B-ORG", "O"]), (["Peter"], ["B-PER"])]
    assert read_conll(path, word_column=0, tag_column=1)[1] == (["Peter"], ["NNP"])


@pytest.mark.parametrize("data,line,match", [
    ("", 1, "empty"),
    (CONLLU.replace("2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_", "2\tn't\tnot\tPART"), 5,
     "has 4"),
    (CONLLU[:-1], 10, "not ended by a blank line"),  # cut after the last word line
    (CONLLU[:CONLLU.index("\tUH")], 10, "has 4"),  # cut in the middle of the last word line
    (CONLLU.replace("4\t.", "5\t."), 8, "expected word ID 4"),
    ("# only a comment\n\n", 1, "no sentence"),
    (b"1\tOK\tok\tX\t_\t_\t0\troot\t_\t_\n\n1\tbad\xff\tb\tX\t_\t_\t0\troot\t_\t_\n\n", 3,
     "not valid utf-8"),
])
def test_bad_conllu_names_file_and_line(tmp_path, data, line, match):
    path = _file(tmp_path, data)
    with pytest.raises(DataFormatError, match=match) as e:
        read_conllu(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and e.value.line == line


@pytest.mark.parametrize("data,line,match", [
    ("", 1, "empty"),
    ("a DT B-NP\nb NN\n", 2, "need 3"),
    ("a DT B-NP\nb NN I-NP extra\n", 2, "line 1 has 3"),
    ("a DT B-NP\n\nb NN I-NP\nc NN", 4, "need 3"),  # truncated last line
    ("-DOCSTART- -X- O\n\n", 1, "no sentence"),
    (b"a DT B-NP\n\nb\xc3 NN I-NP\n", 3, "not valid utf-8"),
])
def test_bad_column_file_names_file_and_line(tmp_path, data, line, match):
    path = _file(tmp_path, data, name="toy.txt")
    with pytest.raises(DataFormatError, match=match) as e:
        read_conll(path, word_column=0, tag_column=2)
    assert str(e.value).startswith(f"{path}:{line}: ") and e.value.line == line

"""Tests of recur.data.sst2: counts on the real files, encodings, line splitting, bad files."""
import numpy as np
import pytest

from recur.data.lines import DataFormatError
from recur.data.sst2 import load_sst2, read_sst2


def test_counts_and_label_balance(require_dataset):
    require_dataset("sst2")
    data = load_sst2()
    assert {k: len(s) for k, (s, _) in data.items()} == {"train": 6920, "dev": 872, "test": 1821}
    # positives per split, from shared/datasets/sst2/SOURCE.txt
    assert {k: int(y.sum()) for k, (_, y) in data.items()} == {"train": 3610, "dev": 444,
                                                               "test": 909}
    for sentences, labels in data.values():
        assert labels.dtype == np.int32 and all(sentences)


def _file(tmp_path, data: bytes):
    path = tmp_path / "stsa.binary.toy"
    path.write_bytes(data)
    return path


def test_latin1_byte_e9_decodes(tmp_path):
    sentences, labels = read_sst2(_file(tmp_path, b"1 un caf\xe9 noir\n"))
    assert sentences == [["un", "caf\u00e9", "noir"]] and labels.tolist() == [1]


@pytest.mark.parametrize("data,encoding,token", [
    (b"1 wait\x85what now\n0 next\n", "latin-1", "wait\x85what"),  # NEL in latin-1
    (b"1 2\xa01/2 hours\n0 next\n", "latin-1", "2\xa01/2"),  # no-break space
    (b"1 a\x1cb c\n0 next\n", "latin-1", "a\x1cb"),  # file separator
    ("1 a\u2028b c\n0 next\n".encode("utf-8"), "utf-8", "a\u2028b"),  # line separator
])
def test_unicode_line_breaks_split_neither_lines_nor_tokens(tmp_path, data, encoding, token):
    sentences, labels = read_sst2(_file(tmp_path, data), encoding=encoding)
    assert labels.tolist() == [1, 0] and sentences[1] == ["next"]
    assert sentences[0][0] == token


@pytest.mark.parametrize("data,line,match", [
    (b"", 1, "empty"),
    (b"1 good\n0\n", 2, "expected '<label> <tokens>'"),
    (b"1 good\n\n0 bad\n", 2, "expected '<label> <tokens>'"),
    (b"1 good\nbad movie\n", 2, "'bad' is not an integer"),
    (b"1 good\n0 bad\n2 neutral\n", 3, "2 is not 0 or 1"),
    (b"1 good\n1.0 fine\n", 2, "not an integer"),
])
def test_bad_lines_name_file_and_line(tmp_path, data, line, match):
    path = _file(tmp_path, data)
    with pytest.raises(DataFormatError, match=match) as e:
        read_sst2(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and e.value.line == line


def test_invalid_bytes_in_declared_encoding_name_the_line(tmp_path):
    path = _file(tmp_path, b"1 good\n0 caf\xe9\n")
    with pytest.raises(DataFormatError, match="not valid utf-8") as e:
        read_sst2(path, encoding="utf-8")
    assert str(e.value).startswith(f"{path}:2: ")

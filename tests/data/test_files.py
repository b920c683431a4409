"""Tests of recur.data.files: lookup order, checksums, download into the cache, offline errors."""
import hashlib
import io
import pathlib
import re
import urllib.error
import zipfile

import pytest

from recur.data import files

URL = "https://example.invalid/toy.txt"
ZIP_URL = "https://example.invalid/toy.zip"
GOOD = b"the good bytes\n"
OTHER = b"other good bytes\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A dataset "toy" (one plain file, two files in one zip), empty data folder and cache."""
    monkeypatch.setitem(files.SOURCES, "toy", {
        "a.txt": files.Source(URL, _sha(GOOD)),
        "z1.txt": files.Source(ZIP_URL, _sha(GOOD), member="toy/z1.txt"),
        "z2.txt": files.Source(ZIP_URL, _sha(OTHER), member="toy/z2.txt"),
    })
    monkeypatch.setenv(files.DATA_DIR_ENV, str(tmp_path / "data"))
    monkeypatch.setenv(files.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(files, "_verified", set())
    return tmp_path


def _offline(url):
    raise urllib.error.URLError("no network in this test")


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_data_dir_comes_before_cache(toy, monkeypatch):
    monkeypatch.setattr(files, "_download", _offline)
    _write(toy / "cache" / "toy" / "a.txt", GOOD)
    assert files.find_file("toy", "a.txt") == toy / "cache" / "toy" / "a.txt"
    in_data = _write(toy / "data" / "toy" / "a.txt", GOOD)
    assert files.find_file("toy", "a.txt") == in_data


def test_checksum_mismatch_names_file_and_both_digests(toy):
    path = _write(toy / "data" / "toy" / "a.txt", b"corrupted\n")
    with pytest.raises(files.ChecksumError) as e:
        files.find_file("toy", "a.txt")
    message = str(e.value)
    assert str(path) in message and _sha(GOOD) in message and _sha(b"corrupted\n") in message


def test_verification_is_cached_until_the_file_changes(toy, monkeypatch):
    path = _write(toy / "data" / "toy" / "a.txt", GOOD)
    calls = []
    real = files.sha256_of
    monkeypatch.setattr(files, "sha256_of", lambda p: calls.append(p) or real(p))
    files.find_file("toy", "a.txt")
    files.find_file("toy", "a.txt")
    assert len(calls) == 1
    path.write_bytes(b"changed, and a different size\n")
    with pytest.raises(files.ChecksumError):
        files.find_file("toy", "a.txt")
    assert len(calls) == 2


def test_download_is_verified_and_cached(toy, monkeypatch):
    monkeypatch.setattr(files, "_download", lambda url: GOOD)
    path = files.find_file("toy", "a.txt")
    assert path == toy / "cache" / "toy" / "a.txt" and path.read_bytes() == GOOD
    monkeypatch.setattr(files, "_download", _offline)
    assert files.find_file("toy", "a.txt") == path  # from the cache, no download


def test_corrupt_download_raises_and_caches_nothing(toy, monkeypatch):
    monkeypatch.setattr(files, "_download", lambda url: b"an error page")
    with pytest.raises(files.ChecksumError) as e:
        files.find_file("toy", "a.txt")
    assert _sha(GOOD) in str(e.value) and _sha(b"an error page") in str(e.value)
    assert URL in str(e.value)
    assert not (toy / "cache" / "toy" / "a.txt").exists()


def test_zip_members_are_extracted_in_one_download(toy, monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("toy/z1.txt", GOOD)
        z.writestr("toy/z2.txt", OTHER)
    urls = []
    monkeypatch.setattr(files, "_download", lambda url: urls.append(url) or buffer.getvalue())
    assert files.find_file("toy", "z1.txt").read_bytes() == GOOD
    assert files.find_file("toy", "z2.txt").read_bytes() == OTHER
    assert urls == [ZIP_URL]


def test_offline_and_missing_says_where_to_put_the_file(toy, monkeypatch):
    monkeypatch.setattr(files, "_download", _offline)
    with pytest.raises(files.DataNotFoundError) as e:
        files.find_file("toy", "z1.txt")
    message = str(e.value)
    assert str(toy / "cache" / "toy" / "z1.txt") in message
    assert str(toy / "data" / "toy" / "z1.txt") in message
    assert ZIP_URL in message and "toy/z1.txt" in message and "no network" in message


def test_download_false_never_downloads(toy, monkeypatch):
    monkeypatch.setattr(files, "_download", lambda url: pytest.fail("downloaded"))
    with pytest.raises(files.DataNotFoundError, match="downloading is off"):
        files.find_file("toy", "a.txt", download=False)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="tinyshakespeare"):
        files.find_file("no_such_dataset", "x")
    with pytest.raises(ValueError, match="ptb.train.txt"):
        files.find_file("ptb", "ptb.nope.txt")


def test_sources_match_the_datasets_readme():
    """Every digest in the table is the one the datasets README lists for that dataset."""
    readme = pathlib.Path(__file__).resolve().parents[2].parent / "shared/datasets/README.md"
    if not readme.is_file():
        pytest.skip(f"{readme} is absent")
    rows = {}  # dataset -> its row of the first table (the second one lists results)
    for line in readme.read_text().splitlines():
        name = line.split("|")[1].strip() if line.startswith("| ") else ""
        if name in files.SOURCES:
            rows.setdefault(name, line)
    assert set(rows) == set(files.SOURCES)
    for dataset, sources in files.SOURCES.items():
        listed = set(re.findall(r"\b[0-9a-f]{64}\b", rows[dataset]))
        assert {s.sha256 for s in sources.values()} == listed, dataset


@pytest.mark.parametrize("dataset,filename",
                         [(d, f) for d, fs in files.SOURCES.items() for f in fs])
def test_real_files_match_their_digests(dataset, filename, require_dataset, monkeypatch):
    require_dataset(dataset)
    monkeypatch.setattr(files, "_download", lambda url: pytest.fail("downloaded"))
    assert files.find_file(dataset, filename).is_file()

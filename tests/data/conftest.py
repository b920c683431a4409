"""Data tests: find the shared datasets folder, and skip tests whose dataset is absent.

`RECUR_DATA_DIR` is set to `<project>/../shared/datasets` (where CI and development machines
keep the data) when it is unset and that folder exists.
"""
import os
import pathlib

import pytest

from recur.data import files

_SHARED = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
if not os.environ.get(files.DATA_DIR_ENV) and _SHARED.is_dir():
    os.environ[files.DATA_DIR_ENV] = str(_SHARED)


def _present(dataset: str) -> bool:
    """True if every file of `dataset` is in the data folder or the cache (no download)."""
    return all(any(p.is_file() for p in files.candidate_paths(dataset, name))
               for name in files.SOURCES[dataset])


@pytest.fixture
def require_dataset():
    """Returns a function that skips the calling test unless a dataset is on disk."""
    def require(dataset: str) -> None:
        if not _present(dataset):
            pytest.skip(f"dataset {dataset!r} is not under ${files.DATA_DIR_ENV} "
                        f"({os.environ.get(files.DATA_DIR_ENV, 'unset')}) nor in the cache "
                        f"{files.cache_dir()}; these tests do not download it.")
    return require

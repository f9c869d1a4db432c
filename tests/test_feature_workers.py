"""Feature extraction in worker processes writes exactly the cache one process writes."""

from __future__ import annotations

import json

import pytest
from transformers import ClapFeatureExtractor

from audio_residual.data_processing import BadAudioError, FeatureCache, load_esc50, make_synthetic_esc50


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = make_synthetic_esc50(tmp_path_factory.mktemp("esc"), n_classes=2, clips_per_class=4, seed=1)
    table = load_esc50(root)
    (table.audio_dir / table.filenames[3]).write_bytes(b"not audio at all")
    return table


def test_two_workers_write_the_same_bytes_as_one_and_stop_on_a_bad_file(table, tmp_path):
    def cache(folder: str) -> FeatureCache:  # fusion draws its crops from numpy's global RNG; 5 s clips are longer
        return FeatureCache(tmp_path / folder, ClapFeatureExtractor(max_length_s=2, truncation="fusion"))

    with pytest.raises(BadAudioError, match=table.filenames[3]):
        cache("two").compute(table, workers=2)
    pooled = cache("two").compute(table, on_bad_file="skip", workers=2)  # resumes after the bad file
    cache("one").compute(table, on_bad_file="skip", workers=1)
    assert [name for name, _ in pooled.skipped] == [table.filenames[3]]
    one, two = (cache(folder).store(table) for folder in ("one", "two"))
    assert one.features.read_bytes() == two.features.read_bytes()
    assert json.loads(one.index.read_text()) == json.loads(two.index.read_text())
    with pytest.raises(ValueError, match="workers"):
        cache("one").compute(table, workers=0)

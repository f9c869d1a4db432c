"""Feature cache: exact extractor output, reuse without recomputation, invalidation, resume, bad files, a full
disk."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from transformers import ClapFeatureExtractor

from audio_residual.data_processing import (
    BadAudioError,
    FeatureCache,
    load_audio,
    load_esc50,
    make_synthetic_esc50,
)
from audio_residual.data_processing.audio_config import AudioConfig


class CountingExtractor(ClapFeatureExtractor):
    """A real extractor (2 s max length, to keep tests fast) that counts calls and can fail on demand.

    Counters are underscore attributes: `to_dict()` includes instance attributes, and the cache key
    ignores private ones, so instrumentation does not change the cache key.
    """

    def __init__(self, fail_after: int | None = None, **kwargs):
        super().__init__(max_length_s=2, **kwargs)
        self._calls = 0
        self._fail_after = fail_after

    @property
    def calls(self) -> int:
        return self._calls

    def __call__(self, *args, **kwargs):
        if self._fail_after is not None and self._calls >= self._fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self._calls += 1
        return super().__call__(*args, **kwargs)


def rand_trunc_extractor(**kwargs) -> CountingExtractor:
    return CountingExtractor(truncation="rand_trunc", **kwargs)


@pytest.fixture
def table(tmp_path):
    root = make_synthetic_esc50(
        tmp_path / "esc", n_classes=3, clips_per_class=5, seconds=1.0, sample_rate=16000
    )
    return load_esc50(root)


def test_rows_equal_the_extractor_output(tmp_path, table):
    extractor = rand_trunc_extractor()
    features = FeatureCache(tmp_path / "cache", extractor).compute(table)
    assert features.input_features.shape == (15, 1, 201, 64)
    assert features.input_features.dtype == np.float32
    assert features.valid.all() and not features.is_longer.any() and features.skipped == []
    direct = extractor(
        load_audio(table.paths()[7]),
        sampling_rate=48000,
        truncation="rand_trunc",
        padding="repeatpad",
        return_tensors="np",
    )
    np.testing.assert_array_equal(features.input_features[7], direct["input_features"][0])


def test_second_call_reuses_memmap_without_extractor_calls(tmp_path, table):
    first = FeatureCache(tmp_path / "cache", rand_trunc_extractor()).compute(table)
    extractor = rand_trunc_extractor()
    second = FeatureCache(tmp_path / "cache", extractor).compute(table)
    assert extractor.calls == 0
    assert isinstance(second.input_features, np.memmap) and second.input_features.mode == "r"
    np.testing.assert_array_equal(second.input_features, first.input_features)


def test_config_change_recomputes_in_a_new_folder(tmp_path, table):
    base = FeatureCache(tmp_path / "cache", rand_trunc_extractor())
    base.compute(table)
    for changed in (
        FeatureCache(tmp_path / "cache", rand_trunc_extractor(), AudioConfig(int16_roundtrip=False)),
        FeatureCache(tmp_path / "cache", rand_trunc_extractor(), padding="repeat"),
        FeatureCache(tmp_path / "cache", rand_trunc_extractor(frequency_max=8000)),
    ):
        assert changed.config_hash != base.config_hash
        changed.compute(table)
        assert changed.feature_extractor.calls == 1 + len(table)  # shape probe + every clip


def test_modified_file_is_recomputed_alone(tmp_path, table):
    cache_dir = tmp_path / "cache"
    before = np.array(FeatureCache(cache_dir, rand_trunc_extractor()).compute(table).input_features)
    changed = table.paths()[4]
    sf.write(changed, np.random.default_rng(0).uniform(-0.5, 0.5, 20000), 16000, subtype="PCM_16")
    extractor = rand_trunc_extractor()
    after = FeatureCache(cache_dir, extractor).compute(table).input_features
    assert extractor.calls == 1
    assert not np.array_equal(after[4], before[4])
    np.testing.assert_array_equal(np.delete(after, 4, axis=0), np.delete(before, 4, axis=0))


def test_interrupted_run_resumes(tmp_path, table):
    cache_dir = tmp_path / "cache"
    interrupted = rand_trunc_extractor(fail_after=1 + 6)  # shape probe, then 6 clips
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(cache_dir, interrupted, checkpoint_every=4).compute(table)
    extractor = rand_trunc_extractor()
    resumed = FeatureCache(cache_dir, extractor).compute(table)
    assert extractor.calls == len(table) - 6
    fresh = FeatureCache(tmp_path / "fresh", rand_trunc_extractor()).compute(table)
    np.testing.assert_array_equal(resumed.input_features, fresh.input_features)


HARD_KILL_SCRIPT = """
import os, sys
from audio_residual.data_processing import FeatureCache, load_esc50
from transformers import ClapFeatureExtractor

class CountingExtractor(ClapFeatureExtractor):  # same name: the type is part of the cache key
    def __init__(self):
        super().__init__(max_length_s=2, truncation="rand_trunc")
        self._calls = 0

    def __call__(self, *args, **kwargs):
        self._calls += 1
        if self._calls > 1 + 7:  # shape probe, then 7 clips
            os._exit(3)  # no finally blocks, no flushes: like SIGKILL
        return super().__call__(*args, **kwargs)

FeatureCache(sys.argv[1], CountingExtractor(), checkpoint_every=3).compute(load_esc50(sys.argv[2]))
"""


def test_hard_kill_resumes_from_last_checkpoint(tmp_path, table):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", HARD_KILL_SCRIPT, str(tmp_path / "cache"), str(table.audio_dir.parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    extractor = rand_trunc_extractor()
    resumed = FeatureCache(tmp_path / "cache", extractor).compute(table)
    assert extractor.calls == len(table) - 6  # 7 clips done, the last checkpoint covered 6
    fresh = FeatureCache(tmp_path / "fresh", rand_trunc_extractor()).compute(table)
    np.testing.assert_array_equal(resumed.input_features, fresh.input_features)


def test_bad_files_error_and_skip_policies(tmp_path, table):
    cache_dir = tmp_path / "cache"
    table.paths()[2].write_bytes(b"")
    table.paths()[9].unlink()
    with pytest.raises(BadAudioError, match=rf"{table.filenames[2]}: empty file"):
        FeatureCache(cache_dir, rand_trunc_extractor()).compute(table)
    features = FeatureCache(cache_dir, rand_trunc_extractor(), AudioConfig(on_bad_file="skip")).compute(table)
    assert features.valid.tolist() == [i not in (2, 9) for i in range(15)]
    assert features.skipped == [
        (table.filenames[2], "empty file (0 bytes)"),
        (table.filenames[9], "file not found"),
    ]
    assert not features.input_features[[2, 9]].any()
    extractor = rand_trunc_extractor()
    with pytest.raises(BadAudioError, match=r"(empty file|file not found)"):  # still fails under "error"
        FeatureCache(cache_dir, extractor).compute(table)
    assert extractor.calls == 0


def test_rand_trunc_crop_is_reproducible(tmp_path):
    root = make_synthetic_esc50(tmp_path / "long", n_classes=2, clips_per_class=1, n_folds=1, seconds=3.5)
    table = load_esc50(root)
    runs = [FeatureCache(tmp_path / f"c{i}", rand_trunc_extractor()).compute(table) for i in range(2)]
    assert runs[0].is_longer.all()
    np.testing.assert_array_equal(runs[0].input_features, runs[1].input_features)
    head_crops = [
        rand_trunc_extractor()(
            load_audio(path)[: 2 * 48000], sampling_rate=48000, truncation="rand_trunc", return_tensors="np"
        )["input_features"][0]
        for path in table.paths()
    ]
    assert not np.array_equal(runs[0].input_features, np.stack(head_crops))  # a random, not a head, crop


def test_fusion_default_is_reproducible_and_leaves_global_rng_alone(tmp_path):
    root = make_synthetic_esc50(tmp_path / "long", n_classes=2, clips_per_class=1, n_folds=1, seconds=3.5)
    table = load_esc50(root)
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    runs = [FeatureCache(tmp_path / f"c{i}", CountingExtractor()).compute(table) for i in range(2)]
    assert np.random.random() == expected_next
    assert runs[0].input_features.shape == (2, 4, 201, 64)
    np.testing.assert_array_equal(runs[0].input_features, runs[1].input_features)
    assert runs[0].is_longer.all()


def test_defaults_follow_extractor_and_sample_rate_is_checked(tmp_path):
    cache = FeatureCache(tmp_path, rand_trunc_extractor(padding="repeat"))
    assert (cache.truncation, cache.padding) == ("rand_trunc", "repeat")
    with pytest.raises(ValueError, match="target_sr=44100"):
        FeatureCache(tmp_path, rand_trunc_extractor(), target_sr=44100)


def test_cache_files_are_plain_npy_and_json_where_the_cache_layout_says(tmp_path, table):
    cache = FeatureCache(tmp_path / "cache", rand_trunc_extractor())
    cache.compute(table)
    store = cache.store(table)
    files = sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*") if p.is_file())
    config = f"features/{cache.config_hash}"
    assert files == [f"{config}/config.json", f"{config}/{store.root.name}/index.json",
                     f"{config}/{store.root.name}/input_features.npy"]
    assert store.root.name.startswith(f"{table.name}-")
    assert np.load(store.features, allow_pickle=False).shape[0] == len(table)


# --- a full disk -------------------------------------------------------------------------------------------


def _fake_full_disk(monkeypatch) -> None:
    """posix_fallocate reports the full disk (where no small tmpfs can be mounted)."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)


def test_full_cache_disk_names_the_feature_file_and_reruns_cleanly(small_disk, small_data, tmp_path, cli, monkeypatch):
    """The features of 15 clips (~3.8 MB) cannot fit: an error naming the file, not a SIGBUS ("Bus error")."""
    if small_disk is None:
        _fake_full_disk(monkeypatch)
    cache = small_disk or tmp_path / "cache"
    argv = ["zeroshot", "--data", small_data, "--model", "tiny-random", "--device", "cpu", "--out", tmp_path / "out",
            "--cache", cache]
    for _ in range(2):  # and again on the rerun
        run = cli(*argv)
        assert run.code == 2 and "No space left on device" in run.errors and "input_features.npy" in run.errors, run.err
    assert not list(Path(cache).rglob("index.json"))  # nothing vouches for rows that were never written
    assert not [p for p in Path(cache).rglob("*") if p.name.endswith(".tmp")]


def test_a_sparse_feature_file_left_by_an_old_crash_is_reserved_or_refused(small_disk, tmp_path, monkeypatch):
    """A rerun reopens the feature file of the crashed run: its holes are reserved before any page is written."""
    from audio_residual.io import preallocate

    if small_disk is None:
        _fake_full_disk(monkeypatch)
    sparse = (small_disk or tmp_path) / "input_features.npy"
    with open(sparse, "wb") as handle:
        handle.truncate(4 * 2**20)  # 4 MiB of holes on a 1 MiB disk
    with pytest.raises(OSError, match="cannot reserve 4.0 MiB") as caught:
        preallocate(sparse, sparse.stat().st_size)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(sparse)

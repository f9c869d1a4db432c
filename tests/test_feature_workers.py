"""Feature extraction in worker processes writes exactly the cache one process writes, and the workers die with
their parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import ClapFeatureExtractor

from audio_residual.data_processing import BadAudioError, FeatureCache, load_esc50, make_synthetic_esc50
from audio_residual.data_processing.audio_config import AudioConfig


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = make_synthetic_esc50(tmp_path_factory.mktemp("esc"), n_classes=2, clips_per_class=4, seed=1)
    table = load_esc50(root)
    (table.audio_dir / table.filenames[3]).write_bytes(b"not audio at all")
    return table


def test_two_workers_write_the_same_bytes_as_one_and_stop_on_a_bad_file(table, tmp_path):
    def cache(folder: str, **audio) -> FeatureCache:  # fusion draws its crops from numpy's global RNG; 5 s clips
        extractor = ClapFeatureExtractor(max_length_s=2, truncation="fusion")  # are longer
        return FeatureCache(tmp_path / folder, extractor, AudioConfig(**audio))

    with pytest.raises(BadAudioError, match=table.filenames[3]):
        cache("two", workers=2).compute(table)
    pooled = cache("two", on_bad_file="skip", workers=2).compute(table)  # resumes after the bad file
    cache("one", on_bad_file="skip", workers=1).compute(table)
    assert [name for name, _ in pooled.skipped] == [table.filenames[3]]
    one, two = (cache(folder).store(table) for folder in ("one", "two"))
    assert one.features.read_bytes() == two.features.read_bytes()
    assert json.loads(one.index.read_text()) == json.loads(two.index.read_text())
    assert cache("one", workers=2).config_hash == cache("one").config_hash  # the same features: the same cache
    with pytest.raises(ValueError, match="workers"):
        AudioConfig(workers=0)


_PARENT = """
import os, sys, time
from pathlib import Path
from transformers import ClapFeatureExtractor
from audio_residual.data_processing.features import FeatureCache

class Slow(FeatureCache):
    def _clip(self, audio_dir, filename):
        (Path(sys.argv[1]) / str(os.getpid())).touch()
        time.sleep(120)

list(Slow(sys.argv[1], ClapFeatureExtractor())._clips(Path("."), [str(i) for i in range(16)], 2))
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_extraction_workers_exit_when_their_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    (tmp_path / "pids").mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "pids")], env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "pids").iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(p.name) for p in (tmp_path / "pids").iterdir()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    finally:
        parent.send_signal(signal.SIGKILL)  # kill -9: no cleanup of its own can run
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in workers if _alive(pid)]
    for pid in alive:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not alive, "workers outlived their parent"

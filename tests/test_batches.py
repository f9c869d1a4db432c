"""The one batch source: order, contents, shuffling and the fusion flags."""

import numpy as np
import torch

from audio_residual.clap.batches import batches


def _features(n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(n * 2 * 3, dtype=np.float32).reshape(n, 2, 3)
    return x, np.arange(n) % 2 == 0


def test_batches_cover_the_rows_in_order_with_their_is_longer_flags():
    x, longer = _features()
    rows = np.array([6, 0, 3, 5, 1])
    got = list(batches(x, rows, 2, "cpu", longer))
    assert [b[0].tolist() for b in got] == [[6, 0], [3, 5], [1]]
    for chunk, features, flags in got:
        np.testing.assert_array_equal(features.numpy(), x[chunk])
        assert flags.shape == (len(chunk), 1) and flags.dtype == torch.bool
        np.testing.assert_array_equal(flags.numpy()[:, 0], longer[chunk])
    assert all(b[2] is None for b in batches(x, rows, 2, "cpu"))
    assert list(batches(x, [], 4, "cpu", longer, desc="empty")) == []


def test_shuffled_batches_follow_the_generator_like_the_loops_they_replace():
    x, _ = _features(11)
    rows = np.arange(3, 11)
    torch_order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(5)).numpy()]
    numpy_order = np.random.default_rng(5).permutation(rows)
    for generator, expected in ((torch.Generator().manual_seed(5), torch_order), (np.random.default_rng(5), numpy_order)):
        got = np.concatenate([chunk for chunk, _, _ in batches(x, rows, 3, "cpu", shuffle_generator=generator)])
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(torch_order, rows)  # the seed does shuffle

"""The one way rows of a (memory-mapped) feature array become model inputs, batch by batch.

Every pass (embeddings, statistics, attention patterns, λ training, baselines, the prefix cache) iterates
`batches(...)` (or `Workspace.batches`), so batch order, contents and the fusion flag `is_longer` are the
same everywhere. Autocast stays with the caller (`bundle.autocast()`): only the forward runs under it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

Batch = tuple[np.ndarray, torch.Tensor, torch.Tensor | None]  # rows, inputs on the device, is_longer (n, 1)


def model_inputs(
    input_features: np.ndarray, rows: np.ndarray, device: torch.device | str, is_longer: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of a (memory-mapped) feature array as model inputs on `device`: features and is_longer (n, 1)."""
    x = torch.from_numpy(np.ascontiguousarray(input_features[rows])).to(device)
    if is_longer is None:
        return x, None
    return x, torch.from_numpy(np.array(is_longer[rows])).reshape(-1, 1).to(device)


def shuffled(rows: np.ndarray, generator: torch.Generator | np.random.Generator) -> np.ndarray:
    """`rows` in a random order drawn from `generator` (torch's randperm or numpy's permutation)."""
    if isinstance(generator, torch.Generator):
        return rows[torch.randperm(len(rows), generator=generator).numpy()]
    return rows[generator.permutation(len(rows))]


def batches(
    features: np.ndarray,
    rows,
    batch_size: int,
    device: torch.device | str,
    is_longer: np.ndarray | None = None,
    shuffle_generator: torch.Generator | np.random.Generator | None = None,
    desc: str | None = None,
) -> Iterator[Batch]:
    """(rows, features[rows] on `device`, is_longer (n, 1) or None) for consecutive batches of `rows`.

    With `shuffle_generator`, `rows` are first put in an order drawn from it; with `desc`, a progress bar.
    The last batch may be smaller; no rows give no batches.
    """
    rows = np.asarray(rows)
    if shuffle_generator is not None:
        rows = shuffled(rows, shuffle_generator)
    starts = range(0, len(rows), batch_size)
    if desc is not None:
        starts = tqdm(starts, desc=desc, leave=False)
    for start in starts:
        chunk = rows[start : start + batch_size]
        yield chunk, *model_inputs(features, chunk, device, is_longer)

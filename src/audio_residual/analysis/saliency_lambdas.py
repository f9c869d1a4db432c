"""A ResiDual λ file to explain the adapted model with: read it safely and check that it belongs to the run.

The file is safetensors (tensors `lambda.<group>` and `buffer.<name>`, header `config`, `units`, `sites` and
`metadata`, as `ResiDual.save` writes it; training writes `metadata` = {"fold", "config", "provenance" (model,
dataset, ...), "task"}). Before any work, `read_lambdas` turns every way the file can be unreadable (not
safetensors, empty, missing keys, a λ of the wrong length) into one ValueError naming it, and refuses
non-finite λ. `check_lambda_record` then compares the metadata with the run:

* λ of another model live in that model's head spaces: refused;
* λ of another fold of the same dataset were trained on clips of the fold being explained (a fold's
  training clips are the other folds' test clips), so the maps would explain a model that saw those clips:
  refused;
* λ of another dataset, or a file without a record, cannot be checked: a warning says so.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

HEADER_KEYS = ("config", "units", "sites")
LOAD_ERRORS = (SafetensorError, KeyError, TypeError, ValueError, RuntimeError, IndexError, json.JSONDecodeError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _header(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        lambdas = {name: handle.get_tensor(name) for name in handle.keys() if name.startswith("lambda.")}
    return header, lambdas


def read_lambdas(path: str | Path, loader: Callable[[Path], torch.nn.Module]) -> tuple[torch.nn.Module, dict]:
    """(the adapter `loader(path)` builds, the file's metadata), or a ValueError / FileNotFoundError naming the
    file: unreadable, not a λ file, inconsistent, or holding NaN / infinite λ."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--lambdas file not found: {path}")
    try:
        header, lambdas = _header(path)
    except LOAD_ERRORS as error:
        raise ValueError(f"--lambdas {path}: not a safetensors λ file ({_first_line(error)})") from None
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing or not lambdas:
        what = f"no {', '.join(missing)} in its header" if missing else "no lambda.* tensors"
        raise ValueError(f"--lambdas {path}: not a ResiDual λ file ({what}; write it with ResiDual.save)")
    bad = {name: int((~torch.isfinite(t.float())).sum()) for name, t in lambdas.items() if not torch.isfinite(t.float()).all()}
    if bad:
        count, total = sum(bad.values()), sum(t.numel() for t in lambdas.values())
        raise ValueError(f"--lambdas {path}: {count} of {total} λ are NaN or infinite (in {', '.join(sorted(bad))}): "
                         "the training that wrote it diverged")
    try:
        metadata = json.loads(header.get("metadata") or "{}")
        adapter = loader(path)
    except LOAD_ERRORS as error:
        raise ValueError(f"--lambdas {path}: not a consistent ResiDual λ file ({_first_line(error)})") from None
    return adapter, metadata if isinstance(metadata, dict) else {}


def check_lambda_record(metadata: dict, ws, fold: int, path: str | Path) -> None:
    """Refuse λ of another model or of another fold of this dataset; warn when the record cannot tell."""
    provenance = metadata.get("provenance") if isinstance(metadata.get("provenance"), dict) else {}
    model, dataset, trained_fold = provenance.get("model"), provenance.get("dataset"), metadata.get("fold")
    name = Path(path).name
    if model is not None and model != ws.bundle.model_id:
        raise ValueError(f"--lambdas {path}: trained on model {model!r}, this run explains {ws.bundle.model_id!r}; "
                         "λ live in their model's head spaces: give λ trained on this model")
    commit = provenance.get("commit")
    if model is not None and commit and ws.bundle.commit and commit != ws.bundle.commit:
        raise ValueError(f"--lambdas {path}: trained on {model} at commit {commit}, this run loaded commit "
                         f"{ws.bundle.commit}: other weights")
    same_data = dataset is not None and dataset == ws.table.name
    if same_data and trained_fold is not None and int(trained_fold) != int(fold):
        raise ValueError(f"--lambdas {path}: trained on fold {trained_fold} of {dataset}, whose training clips include "
                         f"fold {fold}'s test clips explained here; use fold {fold}'s λ or --fold {trained_fold}")
    if model is None or dataset is None or trained_fold is None:
        warnings.warn(f"--lambdas {name} records no model, dataset or fold: cannot check that it was trained on "
                      f"{ws.bundle.model_id} without fold {fold}'s test clips", stacklevel=2)
    elif not same_data:
        warnings.warn(f"--lambdas {name} was trained on {dataset!r}, not {ws.table.name!r}: the adapted model is "
                      "explained on data it was not trained on", stacklevel=2)

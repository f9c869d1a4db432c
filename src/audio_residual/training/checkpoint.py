"""Resumable training state in safetensors + JSON (no pickle): λ, best λ, optimizer and schedule state."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from audio_residual.io import atomic_path


def _split_state(state: dict, prefix: str, tensors: dict) -> dict:
    """Move the tensors of a (nested) state dict into `tensors`; return the JSON-able rest."""
    plain = {}
    for key, value in state.items():
        name = f"{prefix}.{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
            plain[str(key)] = {"__tensor__": name}
        elif isinstance(value, dict):
            plain[str(key)] = {"__dict__": _split_state(value, name, tensors), "__int_keys__": all(isinstance(k, int) for k in value)}
        else:
            plain[str(key)] = value
    return plain


def _join_state(plain: dict, tensors: dict) -> dict:
    state = {}
    for key, value in plain.items():
        if isinstance(value, dict) and "__tensor__" in value:
            state[key] = tensors[value["__tensor__"]]
        elif isinstance(value, dict) and "__dict__" in value:
            inner = _join_state(value["__dict__"], tensors)
            state[key] = {int(k): v for k, v in inner.items()} if value["__int_keys__"] else inner
        else:
            state[key] = value
    return state


def save_checkpoint(path: str | Path, states: dict[str, dict], info: dict) -> Path:
    """`states`: named state dicts (tensors may nest); `info`: JSON metadata (epoch, history, config)."""
    tensors: dict[str, torch.Tensor] = {}
    plain = {name: _split_state(state, name, tensors) for name, state in states.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"states": json.dumps(plain), "info": json.dumps(info)})
    return Path(path)


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict], dict]:
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    plain = json.loads(header["states"])
    return {name: _join_state(state, tensors) for name, state in plain.items()}, json.loads(header["info"])

"""Reading a checkpoint directory: its config.json and its weight files by tensor name.

Weights come from the checkpoint's own files: ``model.safetensors``, sharded
``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``, or the same
as PyTorch ``.bin`` files (read with ``weights_only``, so a pickle cannot run code).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class UnsupportedCheckpointError(ValueError):
    """The directory holds a model this server has no code for."""


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; is it a checkpoint directory?")
    config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise UnsupportedCheckpointError(f"{path} is not a JSON object")
    return config


def describe(config: dict[str, Any]) -> str:
    """What a config.json says the model is, for error messages."""
    return (
        f"architectures {config.get('architectures')!r}, "
        f"model_type {config.get('model_type')!r}"
    )


def weight_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = model_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [model_dir / name for name in sorted(set(weight_map.values()))]
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise FileNotFoundError(
        f"{model_dir} has no weights (model.safetensors, sharded safetensors with "
        "model.safetensors.index.json, or pytorch_model.bin)"
    )


def iter_tensors(
    model_dir: Path, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every weight file, one file at a time."""
    for path in weight_files(model_dir):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, handle.get_tensor(name)
        else:
            state = torch.load(path, map_location=device, weights_only=True)
            yield from state.items()
            del state

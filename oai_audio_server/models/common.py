"""Loading parameters by checkpoint name, the same for every model family."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import nn

from oai_audio_server.models.checkpoint import iter_tensors


def random_named_weights(model: nn.Module, device: torch.device, dtype: torch.dtype) -> set[str]:
    """For speed tests: every parameter of ``model`` (built on the meta device) made on
    ``device`` as ``dtype`` with random values (norms 1, biases 0, the rest N(0, 0.02)),
    with no weight file read: the full-size model is built on a GPU in seconds."""
    state: dict[str, torch.Tensor] = {}
    for name, meta in model.state_dict().items():
        tensor = torch.empty(meta.shape, device=device, dtype=dtype)
        if meta.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
            tensor.fill_(1.0)
        elif name.endswith("bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, 0.02)
        state[name] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    return set(state)


def load_named_weights(
    model: nn.Module, model_dir: Path, *, family: str, device: torch.device,
    dtype: torch.dtype, optional: Collection[str] = (), aliases: Mapping[str, str] = {},
    random_weights: bool = False,
) -> set[str]:
    """Assign every parameter and buffer of ``model`` (built on the meta device) the
    checkpoint's tensor of the same name, on ``device`` as ``dtype``. ``aliases`` fill a
    name from another (tied weights); a missing name not in ``optional`` is an error that
    names it, never a random value (unless ``random_weights`` asks for random values
    throughout, see random_named_weights). Returns the names found."""
    if random_weights:
        return random_named_weights(model, device, dtype)
    expected = set(model.state_dict())
    loaded: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(model_dir, device):
        if name in expected:
            loaded[name] = tensor.to(device=device, dtype=dtype)
    for name, source in aliases.items():
        if name not in loaded and source in loaded:
            loaded[name] = loaded[source]
    missing = sorted(expected - set(loaded) - set(optional))
    if missing:
        raise ValueError(
            f"{model_dir} lacks {len(missing)} tensors of a {family} checkpoint, e.g. "
            f"{', '.join(missing[:3])}"
        )
    model.load_state_dict(loaded, strict=False, assign=True)
    return set(loaded)

"""Pieces every model family's engine code needs in the same form: loading parameters
by checkpoint name, right-padded prompt ids, the last prompt position of each row, and
the per-row attention window of a decode step."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from oai_audio_server.models.checkpoint import iter_tensors


def load_named_weights(
    model: nn.Module, model_dir: Path, *, family: str, device: torch.device,
    dtype: torch.dtype, optional: Collection[str] = (), aliases: Mapping[str, str] = {},
) -> set[str]:
    """Assign every parameter and buffer of ``model`` (built on the meta device) the
    checkpoint's tensor of the same name, on ``device`` as ``dtype``. ``aliases`` fill a
    name from another (tied weights); a missing name not in ``optional`` is an error that
    names it, never a random value. Returns the names found."""
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


def right_padded(prompts: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Prompt ids [rows, longest], padded with 0 after each prompt's end."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    return ids.to(device)


def last_positions(hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Each row's hidden state at its prompt's last token: [rows, hidden]."""
    rows = torch.arange(len(lengths), device=hidden.device)
    last = torch.tensor([n - 1 for n in lengths], device=hidden.device)
    return hidden[rows, last]


def visible_positions(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The attention mask of a decode step [rows, 1, 1, kv_len]: each row sees its own
    positions up to the one it writes now (tensor ops only: capturable in a graph)."""
    window = torch.arange(kv_len, device=positions.device)[None, :] <= positions[:, None]
    return window[:, None, None, :]

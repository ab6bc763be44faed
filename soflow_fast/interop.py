"""Loading the authors' SoFlow weights into our modules.

Our DiT and SongUNet use the authors' module, parameter and buffer names, so the mapping is
mostly about unwrapping: their checkpoint dicts (``{'model': ..., 'ema_model': ...,
'optimizer': ..., 'finished_steps': ...}``, possibly with other entries, tensors among them,
beside the weights), and prefixes left by wrappers (``network.``, DDP's ``module.``,
torch.compile's ``_orig_mod.``). Their DiT checkpoints trained without label dropout
(``cfg_drop_rate`` 0, the B/4 unconditional release) have no null row in the label table:
``label_table_rows`` tells, so the model can be built to match.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

_PREFIXES = ("network.", "module.", "_orig_mod.")
_CHECKPOINT_KEYS = ("ema_model", "ema", "model", "state_dict")


def _keys(state: Mapping, limit: int = 12) -> str:
    """The first ``limit`` keys, each with its value's type: enough to tell what the dict is."""
    items = [f"{k!s} ({type(v).__name__})" for k, v in list(state.items())[:limit]]
    more = f", ... ({len(state)} in all)" if len(state) > limit else ""
    return ", ".join(items) + more


def _unwrap_checkpoint(state: Mapping, which: str | None, where: str = "checkpoint") -> Mapping:
    """The flat state dict (every value a tensor) inside ``state``.

    ``which`` picks an entry. Without it, a dict is the state dict only when all its values are
    tensors: a checkpoint may keep a tensor (a step counter, a buffer) next to its nested weights, and
    that must not make it look flat. Otherwise the first non-empty known entry (EMA first) is
    unwrapped the same way; a dict with neither is an error listing its keys.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} is a {type(state).__name__}, not a state dict")
    if which is not None:
        if which not in state:
            raise KeyError(f"{where} has no entry {which!r}; it has: {', '.join(map(str, state))}")
        return _unwrap_checkpoint(state[which], None, f"{where} entry {which!r}")
    if not state:
        raise ValueError(f"{where} is empty: no weights to load")
    others = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if not others:
        return state
    for key in _CHECKPOINT_KEYS:
        # an empty entry (a checkpoint saved without EMA weights) holds nothing to load: try the next
        if isinstance(state.get(key), Mapping) and state[key]:
            return _unwrap_checkpoint(state[key], None, f"{where} entry {key!r}")
    raise ValueError(
        f"{where} is not a state dict (values that are not tensors: {_keys(others)}) nor a known checkpoint "
        f"layout (an entry {', '.join(map(repr, _CHECKPOINT_KEYS))} holding one); pass which= to pick an "
        f"entry. Top-level keys: {_keys(state)}"
    )


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def convert_official_state_dict(state: Mapping, which: str | None = None) -> dict[str, torch.Tensor]:
    """The authors' network weights with our key names (same names, wrappers removed).

    Args:
        state: a state dict, or their checkpoint dict (``{'model': ..., 'ema_model': ...}``).
        which: the checkpoint entry to take; by default the EMA weights when present.
    """
    sd = _unwrap_checkpoint(state, which)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _strip_prefixes(key)
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r} after removing wrapper prefixes")
        out[new] = value
    return out


def label_table_rows(state: Mapping, which: str | None = None) -> int | None:
    """Rows of the DiT label table in the authors' weights (num_classes, plus one for the null
    label when they trained with label dropout); None when there is no table (the U-Net)."""
    table = convert_official_state_dict(state, which).get("y_embedder.embedding_table.weight")
    return None if table is None else int(table.shape[0])


def load_official_state_dict(model: nn.Module, state: Mapping, which: str | None = None) -> nn.Module:
    """Load the authors' weights into ``model``; any missing, unexpected or mis-shaped key is an error.

    Args:
        model: our DiT or SongUNet (or any module using the authors' names).
        state: their state dict or checkpoint dict; keys may carry ``network.`` / ``module.`` prefixes.
        which: checkpoint entry ('model' or 'ema_model'); default prefers 'ema_model'.
    Returns:
        the model, loaded in place.
    """
    sd = convert_official_state_dict(state, which)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise KeyError(f"missing key in the authors' state dict: {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise KeyError(f"unexpected key in the authors' state dict: {unexpected[0]!r} ({len(unexpected)} in all)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"shape mismatch for {k!r}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=True)
    return model

"""Load timm's `legacy_xception` state dict (Keras-ported ImageNet weights) into our Xception.

timm names modules block1..block12 with `rep` sequences built in the same order as our
`ResidualModule.layers`, so only the prefixes are renamed.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

# timm block index (1-based) -> our module path; blocks 1-3 follow the two stem convs.
_BLOCKS = {i: f"entry_flow.{i + 1}" for i in (1, 2, 3)}
_BLOCKS |= {i: f"middle_flow.{i - 4}" for i in range(4, 12)}
_BLOCKS |= {12: "exit_flow.0"}
_RENAMES = (  # (timm pattern, our replacement), applied in order
    (r"^conv1\.", "entry_flow.0.conv."),
    (r"^bn1\.", "entry_flow.0.bn."),
    (r"^conv2\.", "entry_flow.1.conv."),
    (r"^bn2\.", "entry_flow.1.bn."),
    (r"^conv3\.", "exit_flow.1.conv."),
    (r"^bn3\.", "exit_flow.1.bn."),
    (r"^conv4\.", "exit_flow.2.conv."),
    (r"^bn4\.", "exit_flow.2.bn."),
    (r"^block(\d+)\.rep\.", lambda m: f"{_BLOCKS[int(m.group(1))]}.layers."),
    (r"^block(\d+)\.skip\.", lambda m: f"{_BLOCKS[int(m.group(1))]}.shortcut.conv."),
    (r"^block(\d+)\.skipbn\.", lambda m: f"{_BLOCKS[int(m.group(1))]}.shortcut.bn."),
    (r"\.conv1\.weight$", ".depthwise.weight"),  # timm's SeparableConv2d.conv1 is the depthwise conv
    (r"^fc\.", "head.fc."),
)


def read_state_dict(source: Mapping[str, Tensor] | str | os.PathLike) -> Mapping[str, Tensor]:
    """A state dict from a mapping or a .pth/.pt/.bin/.safetensors file (tensors only: weights_only)."""
    if isinstance(source, Mapping):
        return source
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist: pass the path of a timm legacy_xception "
                                "state dict (.pth, .bin or .safetensors)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile) as error:
        if "GLOBAL" in str(error):  # weights_only refused a pickled class or function
            raise ValueError(f"{path} holds pickled objects, not only tensors, so it is not loaded (weights_only: "
                             "unpickling could run arbitrary code); use a .safetensors file or a plain state dict"
                             ) from error
        raise ValueError(f"{path} is not a readable torch file ({type(error).__name__}: truncated, corrupt or "
                         "another format); download the weights again") from error
    for key in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def timm_to_ours(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def load_timm_state_dict(model: nn.Module, source: Mapping[str, Tensor] | str | os.PathLike) -> None:
    """Copy timm's weights into `model`; any missing, unexpected or mis-shaped key is an error listing them all."""
    state = {timm_to_ours(k): v for k, v in read_state_dict(source).items()}
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    mis_shaped = sorted(f"{k}: got {tuple(state[k].shape)}, expected {tuple(ours[k].shape)}"
                        for k in set(ours) & set(state) if state[k].shape != ours[k].shape)
    problems = [f"{name} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)) if keys]
    if problems:
        raise ValueError("not a timm legacy_xception state dict for this model; "
                         "check num_classes / fc_layers match the weights.\n  " + "\n  ".join(problems))
    model.load_state_dict(state)

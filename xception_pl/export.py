"""Export a checkpoint's Polyak weights: safetensors (+ a JSON of the network and class names), a
torch.export program (.pt2) and ONNX (with the `onnx` extra).

    python -m xception_pl export --ckpt_path runs/x/checkpoints/last.ckpt --output exports/xception

Every file is written under a temporary name, checked (its logits on a sample batch equal the
checkpoint network's within TOLERANCE, or the export fails naming the largest difference) and
only then renamed into place.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import yaml
from torch import Tensor, nn

from xception_pl.checkpointing import UNREADABLE_CHECKPOINT, atomic_path, unreadable_checkpoint, write_atomically

Format = Literal["safetensors", "torch_export", "onnx"]
TOLERANCE = {"safetensors": 0.0, "torch_export": 1e-4, "onnx": 1e-3}  # max |logit difference| (ours)
SUFFIX = {"safetensors": ".safetensors", "torch_export": ".pt2", "onnx": ".onnx"}


class ExportError(RuntimeError):
    """An export whose outputs differ from the checkpoint's, or a checkpoint it cannot read."""


def network_spec(checkpoint: dict[str, Any], ckpt_path: Path) -> dict[str, Any]:
    """{"class_path", "init_args"} of the checkpoint's network: from its hyperparameters, else from the
    config.yaml that LightningCLI saved in the run directory (<run>/checkpoints/<ckpt>)."""
    hp = checkpoint.get("hyper_parameters", {})
    spec = hp.get("network")
    if not isinstance(spec, dict) or "class_path" not in spec:
        config = ckpt_path.parent.parent / "config.yaml"
        if not config.is_file():
            raise ExportError(f"{ckpt_path} does not name its network and there is no {config}: export a "
                              "checkpoint inside its run directory")
        spec = yaml.safe_load(config.read_text())["model"]["network"]
    init_args = {k: tuple(v) if isinstance(v, list) else v for k, v in (spec.get("init_args") or {}).items()}
    return {"class_path": spec["class_path"], "init_args": {**init_args, "num_classes": hp["num_classes"]}}


def run_class_names(ckpt_path: Path) -> list[str] | None:
    """Class names of the training manifest named in the run's config.yaml (checkpoints without them)."""
    config = ckpt_path.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    train = (yaml.safe_load(config.read_text()).get("data", {}).get("init_args") or {}).get("train")
    manifest = Path(str(train)) / "manifest.json"
    return json.loads(manifest.read_text()).get("class_names") if train and manifest.is_file() else None


def build(spec: dict[str, Any]) -> nn.Module:
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec["init_args"])


def load_checkpoint_network(ckpt_path: Path) -> tuple[nn.Module, dict[str, Any], list[str] | None]:
    """(network holding the Polyak weights, its spec, class names) of a checkpoint."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExportError(f"--ckpt_path {ckpt_path} does not exist") from None
    except UNREADABLE_CHECKPOINT as error:
        raise ExportError(unreadable_checkpoint(ckpt_path, error)) from None
    spec = network_spec(checkpoint, ckpt_path)
    network = build(spec)
    # With EMAWeightAveraging, "state_dict" holds the averaged weights (raw ones: "current_model_state").
    network.load_state_dict({k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items()
                             if k.startswith("network.")})
    names = checkpoint.get("class_names") or run_class_names(ckpt_path)
    return network.eval(), spec, names


def check(name: str, actual: Tensor, expected: Tensor) -> None:
    diff = (actual.float() - expected.float()).abs().max().item()
    if diff > TOLERANCE[name]:
        raise ExportError(f"{name} export differs from the checkpoint: max |logit difference| {diff:.3g} > "
                          f"{TOLERANCE[name]:g}; the file was not written")


def write_safetensors(network: nn.Module, path: Path, meta: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, path, metadata={"xception_pl": json.dumps(meta)})
    reloaded = build(meta["network"])
    reloaded.load_state_dict(load_file(path))
    return reloaded.eval()


def write_torch_export(network: nn.Module, path: Path, sample: Tensor) -> Callable[[Tensor], Tensor]:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(network, (sample,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return torch.export.load(path).module()


def write_onnx(network: nn.Module, path: Path, sample: Tensor) -> Callable[[Tensor], Tensor] | None:
    torch.onnx.export(network, (sample,), str(path), dynamo=True, input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False)
    if importlib.util.find_spec("onnxruntime") is None:
        print(f"onnxruntime is not installed: {path.name} written but not checked", file=sys.stderr)
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def export(ckpt_path: str, output: str, formats: list[Format] | None = None, image_size: int = 299,
           batch_size: int = 2) -> dict[str, str]:
    """Write the exports of `ckpt_path` next to `output` (a path without suffix); returns {format: file}.

    Args:
        ckpt_path: a checkpoint of ours (its Polyak weights are exported).
        output: path prefix: OUTPUT.safetensors (+ OUTPUT.json), OUTPUT.pt2, OUTPUT.onnx.
        formats: default: safetensors and torch_export, and onnx where `onnx` and `onnxscript` are installed.
        image_size: side of the sample batch the exports are checked on (and traced with).
        batch_size: images in the sample batch (the batch dimension stays dynamic).
    """
    network, spec, names = load_checkpoint_network(Path(ckpt_path).expanduser())
    onnx_ready = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
    formats = formats or ["safetensors", "torch_export", *(["onnx"] if onnx_ready else [])]
    if "onnx" in formats and not onnx_ready:
        raise ExportError("onnx export needs the onnx extra: pip install 'xception_pl[onnx]'")
    base = Path(output).expanduser()
    base = base.with_suffix("") if base.suffix in SUFFIX.values() else base
    base.parent.mkdir(parents=True, exist_ok=True)
    meta = {"network": spec, "class_names": names, "image_size": image_size, "source": str(ckpt_path),
            "input": "float [B, 3, H, W] in [-1, 1] (x / 127.5 - 1)"}
    sample = torch.rand(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = network(sample)
    written = {}
    for name in formats:
        path = base.with_name(base.name + SUFFIX[name])
        with atomic_path(path) as tmp:
            if name == "safetensors":
                run = write_safetensors(network, tmp, meta)
            elif name == "torch_export":
                run = write_torch_export(network, tmp, sample)
            else:
                run = write_onnx(network, tmp, sample)
            if run is not None:
                with torch.no_grad():
                    check(name, run(sample), expected)
        written[name] = str(path)
    sidecar = base.with_name(base.name + ".json")
    write_atomically(sidecar, json.dumps({**meta, "files": written}, indent=1))
    return written


def main(argv: list[str] | None = None) -> None:
    """`python -m xception_pl export --ckpt_path CKPT --output PREFIX [--formats [...]]`."""
    from jsonargparse import auto_cli

    try:
        written = auto_cli(export, args=sys.argv[1:] if argv is None else argv, as_positional=False)
    except (ExportError, OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print("\n".join(f"{name}: {path}" for name, path in written.items()), file=sys.stderr)

"""Training and inference images/s of xception_pl against timm's legacy_xception, in one process, for the
recipe of a config file: what `python -m xception_pl fit --config <config>` runs.

    PYTHONPATH=. python benchmarks/throughput.py --config configs/imagenet.yaml [--sections a,b,c,d,e] [--out r.json]
    PYTHONPATH=. python benchmarks/throughput.py --config configs/imagenet.yaml --device cpu --quick   # minutes

Taken from --config: the precision (trainer.precision), cuDNN autotuning (trainer.benchmark), the memory
layout (model.channels_last), torch.compile of the training loop (model.compile), the per-device batch
and image size (data), the optimizer with its arguments and weight-decay groups (model.optimizer,
model.weight_decay), the lr schedule and EMA (model.lr_scheduler, ema.decay). Sections b and c build
the model, data and Trainer with the CLI's own parser (xception_pl.cli.XceptionCLI) from the config, so
every callback and plugin the CLI adds runs too; a and d-e build the network and optimizer from it.
Sections (all on --device, random synthetic data unless said):
  a  model-only training step (forward, cross-entropy, backward, optimizer step): our Xception vs timm's
     legacy_xception over --precisions x --layouts x --compile x --batch-sizes;
  b  the CLI's `fit` on one batch already on the device (SyntheticDataModule), EMA as configured and
     off, vs the model-only step of (a);
  c  the CLI's `fit` from JPEG shards written by our writer (500x375 JPEGs), WebDatasetDataModule decoding
     on the CPU workers and, on CUDA, on the GPU, vs the synthetic loop of (b);
  d  inference (eval, inference_mode): ours vs timm, over --inference-compile;
  e  the paper's Table 3: parameters and training steps/s of Xception vs Inception V3 (no aux tower).
Deliberate differences from the config (ours): one device (trainer.devices 1, the config's strategy);
--batch-sizes, --precisions, --layouts and --image-size override the config's values when given (the
GPU check times batch 128, the reference numbers' batch); a and d time compile modes the config does not
pick, as comparisons; b and c run without validation and without the checkpoint callbacks (they write
only after validation or every n steps, never inside the timed steps); the model-only steps (a, e) have
no loss scaling for 16-mixed. a, d, e: the median step time over --repeats blocks of the --steps timed
steps, after --warmup steps; b, c: the mean over --steps optimizer steps after --warmup (c: at least 8 per
worker, so batches prefetched during warm-up cannot inflate the rate); the device is synchronised around
each timed region. Peak memory: CUDA max_memory_allocated, or peak RSS on CPU.
Before any timing, Xception.from_timm(timm's state dict) is checked against timm (eval, fp32 and bf16).
The timed network is Xception(), what the CLI trains: TF "same" max-pool padding and BN eps 1e-3,
where from_timm takes timm's symmetric padding and eps 1e-5 (same cost: our "same" pools pad in the pool,
without a padded copy; benchmarks/max_pool.py).
Prints a table last; writes every number with the environment to --out (JSON).
"""

from __future__ import annotations

import argparse  # a benchmark script, not part of the CLI (STYLE 6 concerns the package's CLI)
import gc
import importlib
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable

import lightning as L
import timm
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Checkpoint

from xception_pl import Xception
from xception_pl.cli import XceptionCLI
from xception_pl.data import write_shards
from xception_pl.inception import InceptionV3
from xception_pl.model import FullPrecisionLinear

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import make_images  # noqa: E402  (the 500x375 JPEGs of the data pipeline benchmark)

NUM_CLASSES = 1000
PAPER_TABLE_3 = {"xception_params": 22_855_952, "inception_params": 23_626_728, "steps_ratio": 28 / 31}
# max-autotune is left out: Triton's grouped-conv templates make autotuning the depthwise convs take > 10 min.
COMPILE_MODES = ("eager", "default", "reduce-overhead")
PRECISIONS = {"32": "fp32", "32-true": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}  # Trainer's -> ours
QUICK = dict(batch_sizes="8", steps=3, repeats=3, warmup=1, precisions="fp32", compile="eager", images=64)
FULL = dict(steps=20, repeats=5, warmup=10, compile="eager,default", images=1024)  # the rest from --config


def read_recipe(path: str) -> dict:
    """The settings the benchmark takes from a CLI config (plain YAML; a missing key is the code default)."""
    config = yaml.safe_load(Path(path).read_text())
    trainer, model, data = config.get("trainer", {}), config.get("model", {}), config.get("data", {})
    data = data.get("init_args", data)
    precision = str(trainer.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise SystemExit(f"error: {path}: trainer.precision {precision}: the benchmark knows {', '.join(PRECISIONS)}")
    optimizer = model.get("optimizer", {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01}})
    return {"config": path, "precision": PRECISIONS[precision], "benchmark": bool(trainer.get("benchmark")),
            "channels_last": model.get("channels_last", False), "compile": model.get("compile", False),
            "batch_size": data.get("batch_size", 32), "image_size": data.get("image_size", 299),
            "optimizer": optimizer, "weight_decay": model.get("weight_decay", 1e-5),
            "ema_decay": config.get("ema", {}).get("decay", 0.9999)}


def make_optimizer(model: torch.nn.Module, recipe: dict) -> torch.optim.Optimizer:
    """The config's optimizer, with XceptionModule.configure_optimizers' groups: decay on weights only."""
    module, name = recipe["optimizer"]["class_path"].rsplit(".", 1)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": recipe["weight_decay"]},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return getattr(importlib.import_module(module), name)(groups, **recipe["optimizer"].get("init_args", {}))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()  # the previous measurement's models and graphs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak RSS, to the current RSS


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) / 1024


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype) if dtype else nullcontext()


def median_rate(step, images: int, args) -> dict:
    """Images/s of the median of --repeats blocks of the --steps timed steps, after --warmup steps; the
    device is synchronised around each block only, so the host may queue a step while the device runs
    the previous one, as in a training loop. Also the peak memory."""
    reset_peak(args.device)
    for _ in range(args.warmup):
        step()
    block = max(1, args.steps // args.repeats)
    seconds = []
    for _ in range(args.steps // block):
        synchronize(args.device)
        start = time.perf_counter()
        for _ in range(block):
            step()
        synchronize(args.device)
        seconds.append((time.perf_counter() - start) / block)
    return {"img_s": images / statistics.median(seconds), "peak_mib": peak_mib(args.device)}


def build(name: str) -> torch.nn.Module:
    if name == "timm":
        return timm.create_model("legacy_xception", pretrained=False, num_classes=NUM_CLASSES)
    return InceptionV3(NUM_CLASSES, drop_rate=0.0) if name == "inception_v3" else Xception(NUM_CLASSES)


def prepare(name: str, layout: str, mode: str, args) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(model, the callable to time, a random input) on the device; a fresh compile cache per model."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = build(name).to(args.device, memory_format=fmt)
    torch.compiler.reset()  # else each new instance counts as a recompile, and past the limit runs eager
    forward = model if mode == "eager" else torch.compile(model, mode=mode, dynamic=False)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    return model, forward, images.contiguous(memory_format=fmt)


def train_step_rate(name: str, precision: str, layout: str, mode: str, args) -> dict:
    model, forward, images = prepare(name, layout, mode, args)
    target = torch.randint(0, NUM_CLASSES, (args.batch,), device=args.device)
    optimizer = make_optimizer(model, args.recipe)

    def step() -> None:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the graphs may reuse their outputs
        with autocast(args.device, precision):
            loss = F.cross_entropy(forward(images), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_rate(step, args.batch, args)


def inference_rate(name: str, precision: str, mode: str, args) -> dict:
    model, forward, images = prepare(name, args.layouts[-1], mode, args)
    model.eval()

    def step() -> None:
        with torch.inference_mode(), autocast(args.device, precision):
            forward(images)

    return median_rate(step, args.batch, args)


class StepTimer(L.Callback):
    """Seconds from the start of batch `first` to the start of batch `first + steps`: whole optimizer
    steps, with data loading, logging and every callback (EMA included)."""

    def __init__(self, first: int, steps: int) -> None:
        self.first, self.steps, self.times = first, steps, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx in (self.first, self.first + self.steps):
            synchronize(pl_module.device)
            self.times[batch_idx] = time.perf_counter()


def fit_rate(overrides: list[str], steps: int, args) -> dict:
    """Images/s of the CLI's fit (--config plus `overrides`) over `steps` optimizer steps after --warmup."""
    batches = args.warmup + steps + 1  # the last batch only marks the end of the timed steps
    with tempfile.TemporaryDirectory() as logs:
        cli = XceptionCLI(run=False, args=[
            "--config", args.config, "--trainer.accelerator", "gpu" if args.device.type == "cuda" else "cpu",
            "--trainer.devices", "1", "--trainer.max_steps", str(batches), "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", logs,
            "--trainer.precision", {v: k for k, v in PRECISIONS.items()}[args.loop_precision],
            "--data.init_args.batch_size", str(args.batch), "--data.init_args.image_size", str(args.image_size),
            "--data.init_args.train_size", str(args.batch * batches), *overrides])
        # No checkpoint files in a timed run (see the docstring).
        cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, Checkpoint)]
        timer = StepTimer(args.warmup, steps)
        cli.trainer.callbacks.append(timer)
        torch.compiler.reset()
        reset_peak(args.device)
        cli.trainer.fit(cli.model, cli.datamodule)
        written = len(list(Path(logs).rglob("*.ckpt")))
    seconds = timer.times[args.warmup + steps] - timer.times[args.warmup]
    return {"img_s": steps * args.batch / seconds, "peak_mib": peak_mib(args.device), "checkpoints_written": written}


def check_outputs(args) -> dict:
    """Our network holding timm's weights must compute timm's function (eval mode, random input)."""
    reference = build("timm").to(args.device).eval()
    ours = Xception.from_timm(reference.state_dict()).to(args.device).eval()
    fc = FullPrecisionLinear(reference.fc.in_features, reference.fc.out_features).to(args.device)
    fc.load_state_dict(reference.fc.state_dict())
    reference.fc = fc  # our classifier computes in fp32 under autocast (docs/training.md): compare like with like
    images = torch.randn(2, 3, args.image_size, args.image_size, device=args.device)
    result = {"passed": True}
    for precision, tolerance in (("fp32", 1e-3), ("bf16", 3e-2)):  # max |difference| / max |timm output|
        with torch.no_grad(), autocast(args.device, precision):
            a, b = ours(images).float(), reference(images).float()
        error = ((a - b).abs().max() / b.abs().max()).item()
        same_top1 = bool((a.argmax(1) == b.argmax(1)).all())
        result[precision] = {"max_rel_error": error, "tolerance": tolerance, "same_top1": same_top1}
        result["passed"] &= error <= tolerance and same_top1
    return result


class Sections:
    """The sections at one batch size (args.batch), as table rows {section, setting, batch, name, img_s,
    peak_mib, baseline, baseline_img_s, baseline_peak_mib, ratio} (or error)."""

    def __init__(self, args, done: list[dict]) -> None:
        self.args, self.rows, self.done = args, [], done  # done: earlier batch sizes' rows
        self.cuda = args.device.type == "cuda"
        self.precision, self.layout = args.loop_precision, args.layouts[-1]  # of sections b-e
        self.loop_mode = "default" if args.recipe["compile"] else "eager"  # the module's compile flag
        self.model_only: dict[tuple, dict | None] = {}  # (precision, layout, mode) -> (a)'s measurement of ours
        self.loop: dict | None = None  # (b)'s measurement with EMA as configured

    def measure(self, section: str, setting: str, name: str, baseline: str, run, base) -> dict | None:
        """Runs `run`, then `base` (a callable, or an earlier measurement); the ratio is run / base."""
        row = {"section": section, "setting": setting, "batch": self.args.batch, "name": name, "baseline": baseline}
        print(f"{time.strftime('%H:%M:%S')} [{section}] {setting}, batch {self.args.batch}: {name} vs {baseline}",
              file=sys.stderr, flush=True)
        try:  # one failing variant (e.g. out of memory) must not lose the rest of a long grid
            ours = run()
            base = base() if callable(base) else base
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            self.rows.append({**row, "error": f"{type(error).__name__}: {error}"[:300]})
            self.save_partial()
            return None
        written = {k: v for k, v in ours.items() if k == "checkpoints_written"}  # the fit rows: none expected
        self.rows.append({**row, "img_s": ours["img_s"], "peak_mib": ours["peak_mib"], "baseline_img_s": base["img_s"],
                          "baseline_peak_mib": base["peak_mib"], "ratio": ours["img_s"] / base["img_s"], **written})
        self.save_partial()
        return ours

    def save_partial(self) -> None:
        """Every row so far into --out, so that a run killed by a time limit keeps what it measured."""
        Path(self.args.out).write_text(json.dumps({"partial": True, "recipe": self.args.recipe,
                                                   "rows": self.done + self.rows}, indent=1))

    def a(self) -> None:
        args = self.args
        for precision, layout, mode in itertools.product(args.precisions, args.layouts, args.compile):
            if mode == "reduce-overhead" and not self.cuda:
                continue  # CUDA graphs
            self.model_only[precision, layout, mode] = self.measure(
                "a", f"train step {precision} {layout} {mode}", "ours", "timm",
                partial(train_step_rate, "ours", precision, layout, mode, args),
                partial(train_step_rate, "timm", precision, layout, mode, args))

    def synthetic(self, ema: bool = True) -> Callable[[], dict]:
        args = self.args
        data = ["--data.class_path", "xception_pl.data.synthetic.SyntheticDataModule",
                "--data.init_args.num_classes", str(NUM_CLASSES),  # one fixed batch on the device, also on CPU
                "--data.init_args.device", str(args.device) if self.cuda else "cpu:0"]
        return partial(fit_rate, [*data, *([] if ema else ["--ema.decay", "null"])], args.steps, args)

    def b(self) -> None:
        setting = f"fit synthetic {self.precision} {self.layout} {self.loop_mode}"
        base = self.model_only.get((self.precision, self.layout, self.loop_mode)) or partial(
            train_step_rate, "ours", self.precision, self.layout, self.loop_mode, self.args)
        ema = self.args.recipe["ema_decay"]
        self.loop = self.measure("b", f"{setting} EMA {ema}", "lightning", "model-only", self.synthetic(), base)
        if ema is not None:
            self.measure("b", setting + " no EMA", "lightning", "model-only", self.synthetic(ema=False), base)

    def c(self) -> None:
        args, mode = self.args, self.loop_mode
        steps = max(args.steps, 8 * args.workers)  # more than the 2 batches per worker prefetched in warm-up
        with tempfile.TemporaryDirectory() as tmp:
            make_images(Path(tmp, "images"), args.images)
            write_shards(str(Path(tmp, "images")), str(Path(tmp, "shards")), shard_size=max(1, args.images // 32),
                         workers=min(os.cpu_count() or 1, 1 + args.images // 256), progress=False)
            for decode in ("cpu", "cuda") if self.cuda else ("cpu",):
                data = ["--data.class_path", "xception_pl.data.WebDatasetDataModule", "--data.init_args.train",
                        str(Path(tmp, "shards")), "--data.init_args.val", "null", "--data.init_args.num_workers",
                        str(args.workers), "--data.init_args.decode_device", decode]
                self.measure("c", f"fit JPEG shards, decode {decode}, {args.workers} workers, {self.precision} {mode}",
                             "lightning", "synthetic", partial(fit_rate, data, steps, args),
                             self.loop or self.synthetic())

    def d(self) -> None:
        for mode in (m for m in self.args.inference_compile if self.cuda or m != "reduce-overhead"):
            self.measure("d", f"inference {self.precision} {self.layout} {mode}", "ours", "timm",
                         partial(inference_rate, "ours", self.precision, mode, self.args),
                         partial(inference_rate, "timm", self.precision, mode, self.args))

    def e(self) -> None:
        size = max(self.args.image_size, 75)  # Inception V3's smallest input
        args = argparse.Namespace(**{**vars(self.args), "image_size": size})
        self.measure("e", f"Table 3 train step {self.precision} {self.layout} eager, {size} px", "xception",
                     "inception_v3", partial(train_step_rate, "ours", self.precision, self.layout, "eager", args),
                     partial(train_step_rate, "inception_v3", self.precision, self.layout, "eager", args))


def environment(args) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else f"CPU {cpu}",
            "cpu": cpu, "cpu_cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "timm": timm.__version__,
            "lightning": L.__version__, "command": " ".join(sys.argv),
            "args": {k: str(v) for k, v in vars(args).items()}}


def table(rows: list[dict], check: dict | None, params: dict) -> str:
    lines = ["| section | setting | batch | name | img/s | baseline | img/s | ratio | peak MiB (name / baseline) |",
             "|---|---|---:|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['section']} | {r['setting']} | {r['batch']} | {r['name']} | failed: {r['error']} "
                         f"| {r['baseline']} | | | |")
            continue
        lines.append(f"| {r['section']} | {r['setting']} | {r['batch']} | {r['name']} | {r['img_s']:,.1f} | "
                     f"{r['baseline']} | {r['baseline_img_s']:,.1f} | {r['ratio']:.3f} | "
                     f"{r['peak_mib']:,.0f} / {r['baseline_peak_mib']:,.0f} |")
    if check is not None:
        lines.append(f"\nOutputs check, Xception.from_timm(timm weights) vs timm legacy_xception, eval: "
                     f"{'PASSED' if check['passed'] else 'FAILED'} " + json.dumps({k: v for k, v in check.items()
                                                                                   if k != "passed"}))
    if params:
        paper = PAPER_TABLE_3
        lines.append(f"\nTable 3: parameters Xception {params['xception']:,} (paper {paper['xception_params']:,}), "
                     f"Inception V3 {params['inception_v3']:,} (paper {paper['inception_params']:,}).")
        lines += [f"Training steps/s at batch {r['batch']}: Xception {r['img_s'] / r['batch']:.3g}, Inception V3 "
                  f"{r['baseline_img_s'] / r['batch']:.3g}, ratio {r['ratio']:.2f} (paper: 28 / 31 = "
                  f"{paper['steps_ratio']:.2f} on 60 K80s)" for r in rows if r["section"] == "e" and "ratio" in r]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/imagenet.yaml", help="the CLI config whose recipe is timed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e, run in this "
                        "order (b before c)")
    parser.add_argument("--quick", action="store_true", help=f"small defaults for a CPU: {QUICK}")
    parser.add_argument("--batch-sizes", help="comma-separated (default: the config's per-device batch)")
    parser.add_argument("--steps", type=int, help=f"timed steps (default {FULL['steps']})")
    parser.add_argument("--repeats", type=int, help=f"blocks the timed steps of a, d, e are split into, for the "
                        f"median (default {FULL['repeats']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps first (default {FULL['warmup']})")
    parser.add_argument("--precisions", help="fp32, bf16, fp16 (autocast) for a; b-e use the last (default: the "
                        "config's trainer.precision)")
    parser.add_argument("--layouts", help="nchw, channels_last for a; b-e use the last (default: the config's)")
    parser.add_argument("--compile", help=f"of {','.join(COMPILE_MODES)}, for a (default {FULL['compile']})")
    parser.add_argument("--inference-compile", help="the same for d (default: --compile)")
    parser.add_argument("--image-size", type=int, help="default: the config's data.image_size")
    parser.add_argument("--images", type=int, help=f"JPEGs written for section c (default {FULL['images']})")
    parser.add_argument("--workers", type=int, default=min(15, (os.cpu_count() or 2) - 1))
    parser.add_argument("--out", default="results.json")
    args = parser.parse_args()
    args.recipe = recipe = read_recipe(args.config)
    config_defaults = dict(batch_sizes=str(recipe["batch_size"]), precisions=recipe["precision"],
                           image_size=recipe["image_size"], layouts="channels_last" if recipe["channels_last"] else "nchw")
    for key, value in {**config_defaults, **FULL, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.inference_compile = args.inference_compile or args.compile
    args.device = torch.device(args.device)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.sections, args.precisions, args.layouts, args.compile, args.inference_compile = (
        s.split(",") for s in (args.sections, args.precisions, args.layouts, args.compile, args.inference_compile))
    for name, given, allowed in (("sections", args.sections, "abcde"), ("compile", args.compile, COMPILE_MODES),
                                 ("inference-compile", args.inference_compile, COMPILE_MODES),
                                 ("precisions", args.precisions, ("fp32", "bf16", "fp16")),
                                 ("layouts", args.layouts, ("nchw", "channels_last"))):
        if unknown := set(given) - set(allowed):
            parser.error(f"--{name} {','.join(sorted(unknown))}: choose from {','.join(allowed)}")
    if "c" in args.sections and "b" in args.sections[args.sections.index("c"):]:
        args.sections.remove("b")
        args.sections.insert(args.sections.index("c"), "b")  # c's baseline is b's measurement
    args.loop_precision = args.precisions[-1]
    if args.layouts[-1] != ("channels_last" if recipe["channels_last"] else "nchw") and {"b", "c"} & set(args.sections):
        parser.error("--layouts: sections b and c train the config's model.channels_last; the last layout must match")
    return args


def main() -> None:
    args = parse_args()
    torch.backends.cudnn.benchmark = args.recipe["benchmark"]  # trainer.benchmark; b and c: the Trainer sets it
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    torch.manual_seed(0)

    check = None
    if {"a", "d"} & set(args.sections):  # before any timing
        check = check_outputs(args)
        print(f"outputs check (ours from_timm vs timm, eval): {check}", file=sys.stderr)
    rows = []
    for args.batch in args.batch_sizes:  # the batch every measurement reads
        sections = Sections(args, rows)
        for name in args.sections:
            getattr(sections, name)()
        rows += sections.rows
    params = {}
    if "e" in args.sections:
        params = {n: sum(p.numel() for p in build(m).parameters()) for n, m in
                  (("xception", "ours"), ("inception_v3", "inception_v3"))}
    report = {"environment": environment(args), "recipe": args.recipe, "check": check, "params": params, "paper_table_3": PAPER_TABLE_3,
              "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    env = report["environment"]
    print(f"\n{env['device']}, torch {env['torch']}, timm {env['timm']}, lightning {env['lightning']}, {env['date']}")
    print(table(rows, check, params))
    sys.exit(0 if (check is None or check["passed"]) and not any("error" in r for r in rows) else 1)


if __name__ == "__main__":
    main()

"""One command that proves the GPU path: every CUDA variant of the recipe trains a few steps through the
real CLI, then the throughput table; in under 8 minutes on one GPU, compilation included.

    bash benchmarks/gpu_check.sh [--out gpu_check.json] [--wheels .whl] [--device cuda|cpu]

1. shards: 384 train / 128 val JPEGs (500x375, 10 classes) written by our writer, single-label and
   multi-label (two labels an image);
2. paths: each row of PATHS is `python -m xception_pl fit --config <config>` plus COMMON's overrides
   (the tiny shards, one device, a few steps, one validation at the end) plus the row's, in its own
   subprocess with its own timeout, with HostSyncCounter (cuda_debug: every synchronizing CUDA call)
   writing JSON. Reported: ok/failed, last train/loss finite, the val metric, host syncs and
   collectives per step in the steady state (the max over steps after the first two that neither
   log, validate nor checkpoint; the logging steps' max beside it);
3. throughput: benchmarks/throughput.py --config configs/imagenet.yaml, shortened (batch 128,
   bf16 channels_last, eager and compiled model steps vs timm, the Lightning loop, end to end from
   shards, inference);
4. kernels: benchmarks/update_kernels.py, the kernels one Polyak update and one RMSpropTF step launch
   (the multi-tensor fast path: a few per chunk of tensors, not one per tensor);
5. one table last; every number in --out (JSON). A failing or timed-out part is reported, the rest runs.
Wall-time budget on the GPU (BUDGET_S): setup 40 s, paths 170 s (three at a time: they are counted, not
timed), kernels 20 s, throughput 240 s (alone), 470 s in all; each subprocess gets the smaller of its own timeout
and what is left of its section's budget, and is killed with its data workers when it runs out.
`--device cpu` is the same at 71 px with 3 steps a path (CUDA-only paths reported as skipped): the test.
If webdataset, omegaconf or jsonargparse cannot be imported, the wheels of --wheels are installed into
a temporary directory first (nothing from the network), which goes on PYTHONPATH with the repository.
"""

from __future__ import annotations

import argparse  # a benchmark script, not part of the CLI
import importlib
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name | config | labels | overrides of the CLI | needs: cuda, gpu (runs on CUDA only, to keep the CPU test short),
# or a module argument (skipped without it) | timeout s
PATHS = [
    ("compile",         "imagenet", "single", ["--model.compile", "true"],                      "cuda", 240),
    ("compile-reduce-overhead", "imagenet", "single",
     ["--model.compile", "true", "--model.compile_mode", "reduce-overhead"],                     "cuda", 240),
    ("bf16",            "imagenet", "single", [],                                               "", 120),
    ("fp16",            "imagenet", "single", ["--trainer.precision", "16-mixed"],              "cuda", 120),
    ("nchw",            "imagenet", "single", ["--model.channels_last", "false"],               "gpu", 120),
    ("no-ema",          "imagenet", "single", ["--ema.decay", "null"],                          "gpu", 120),
    ("decode-cuda",     "imagenet", "single", ["--data.init_args.decode_device", "cuda"],       "cuda", 120),
    ("jft-map100",      "jft",      "multi",  [],                                               "", 120),
]
# One epoch of training (no epoch boundary in the steps counted), then one validation of every image.
SIZES = {"cuda": dict(train=384, val=128, image=299, resize=333, batch=32, steps=12, log_every=4, workers=4, jobs=3),
         "cpu": dict(train=16, val=10, image=71, resize=80, batch=4, steps=4, log_every=2, workers=1, jobs=1)}
CPU_OVERRIDES = ["--checkpoint.save_top_k", "0"]  # one checkpoint file (last.ckpt) instead of two: slow disks
BUDGET_S = {"setup": 40, "paths": 170, "kernels": 20, "throughput": 240}  # wall s per section on the GPU: 470 of 480
# Compilation (section a's "default") last: a time limit keeps the rest.
THROUGHPUT = {"cuda": ["--sections", "b,c,d,a", "--batch-sizes", "128", "--layouts", "channels_last",
                       "--compile", "eager,default", "--inference-compile", "eager", "--steps", "8", "--warmup", "3",
                       "--repeats", "2", "--images", "512", "--workers", "12"],
              "cpu": ["--sections", "a", "--batch-sizes", "2", "--precisions", "fp32", "--compile", "eager",
                      "--image-size", "71", "--steps", "1", "--warmup", "0", "--repeats", "1"]}  # the rest: its own test


def ensure_packages(wheels: Path) -> str | None:
    """Installs the wheels in `wheels` into a temporary site if the packages the CLI needs are missing."""
    try:
        import jsonargparse, omegaconf, webdataset  # noqa: F401, E401
        return None
    except ImportError as error:
        missing = error.name
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"error: {missing} is not installed and {wheels} holds no wheels: on a machine with network, "
                         f"run bash /path/to/wheels.sh or `pip download -d {wheels} ...` as the README says")
    site = tempfile.mkdtemp(prefix="gpu_check_site_")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", site, *map(str, found)], check=True, timeout=120)
    sys.path.insert(0, site)
    importlib.invalidate_caches()
    return site


def run(command: list[str], log: Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """(exit status or None on timeout, seconds); the whole process group (data workers too) dies on timeout."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    return code, time.perf_counter() - start


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or line.startswith("error")]
    return (errors or lines or [""])[-1].strip()[:200]


def make_shards(work: Path, size: dict) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from data_pipeline import make_images  # the 500x375 JPEGs of the data pipeline benchmark

    from xception_pl.data import write_shards

    shards = {}
    for split, count in (("train", size["train"]), ("val", size["val"])):
        images = work / "images" / split
        paths = make_images(images, count)
        shards["single", split] = work / "single" / split
        write_shards(str(images), str(shards["single", split]), shard_size=max(1, count // 8), progress=False,
                     workers=4)
        lines = [json.dumps({"path": str(p.relative_to(images)), "labels": [i % 10, (i * 3 + 1) % 10]})
                 for i, p in enumerate(paths)]
        (images / "labels.jsonl").write_text("\n".join(lines) + "\n")
        shards["multi", split] = work / "multi" / split
        write_shards(str(images / "labels.jsonl"), str(shards["multi", split]), shard_size=max(1, count // 8),
                     num_classes=10, progress=False, workers=4)
    return shards


def path_command(row: tuple, shards: dict, work: Path, device: str) -> list[str]:
    name, config, labels, overrides, _, _ = row
    s = SIZES[device]
    return [sys.executable, "-m", "xception_pl", "fit", "--config", f"configs/{config}.yaml",
            "--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.devices", "1",
            "--trainer.max_steps", str(s["steps"]), "--trainer.val_check_interval", str(s["steps"]),
            "--trainer.check_val_every_n_epoch", "null",
            "--trainer.limit_val_batches", str(math.ceil(s["val"] / s["batch"])),
            "--trainer.log_every_n_steps", str(s["log_every"]), "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(work / "runs" / name),
            "--data.init_args.train", str(shards[labels, "train"]), "--data.init_args.val", str(shards[labels, "val"]),
            "--data.init_args.batch_size", str(s["batch"]), "--data.init_args.num_workers", str(s["workers"]),
            "--data.init_args.image_size", str(s["image"]), "--data.init_args.eval_resize", str(s["resize"]),
            "--trainer.callbacks+=xception_pl.host_syncs.HostSyncCounter",
            "--trainer.callbacks.output", str(work / "syncs" / f"{name}.json"),
            "--trainer.callbacks.mode", "cuda_debug" if device == "cuda" else "dispatch", *overrides,
            *(CPU_OVERRIDES if device == "cpu" else [])]


def summarize(name: str, work: Path, device: str) -> dict:
    """Last train/loss, the val metric, and the host syncs per step, from the run's files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "runs" / name))
    events.Reload()
    scalars = {t: events.Scalars(t)[-1].value for t in events.Tags()["scalars"]}
    metric = "val/map100" if "val/map100" in scalars else "val/acc1"
    records = json.loads((work / "syncs" / f"{name}.json").read_text())["records"]
    count = "cuda_syncs" if device == "cuda" else "reads"
    steady = [r for r in records if r["global_step"] > 2 and not (r["logs"] or r["validated"] or r["checkpointed"])]
    logging = [r for r in records if r["logs"] and not r["validated"]]
    loss = scalars.get("train/loss", float("nan"))
    return {"loss": loss, "loss_finite": math.isfinite(loss), "metric": metric, "value": scalars.get(metric),
            "counted": count, "steady_syncs": max((r[count] for r in steady), default=None),
            "logging_syncs": max((r[count] for r in logging), default=None),
            "steady_collectives": max((r["collectives"] for r in steady), default=None), "steps": len(records)}


def check_path(row: tuple, shards: dict, work: Path, args, env: dict, deadline: float) -> dict:
    name, _, _, _, needs, timeout = row
    result = {"path": name, "command": " ".join(path_command(row, shards, work, args.device)[1:])}
    if needs in ("cuda", "gpu") and args.device != "cuda":
        return {**result, "status": "skipped", "note": "CUDA only" if needs == "cuda" else "GPU check only"}
    if needs not in ("", "cuda", "gpu"):
        from xception_pl.module import XceptionModule
        if needs not in inspect.signature(XceptionModule).parameters:
            return {**result, "status": "skipped", "note": f"XceptionModule has no `{needs}` argument"}
    budget = min(timeout * (1 if args.device == "cuda" else 3), deadline - time.time())
    if budget < 20:
        return {**result, "status": "skipped", "note": "section's time budget spent"}
    log = work / "logs" / f"{name}.log"
    code, seconds = run(path_command(row, shards, work, args.device), log, budget, env)
    result.update(seconds=round(seconds, 1), log=str(log))
    if code != 0:
        why = f"timed out after {budget:.0f} s" if code is None else f"exit {code}: {last_line(log)}"
        return {**result, "status": "failed", "note": why}
    try:
        result.update(summarize(name, work, args.device))
        for checkpoint in (work / "runs" / name).rglob("*.ckpt"):
            checkpoint.unlink()  # 250 MB each
    except Exception as error:  # noqa: BLE001  (a run without event files or sync records is a failure)
        return {**result, "status": "failed", "note": f"no results: {type(error).__name__}: {error}"[:200]}
    ok = result["loss_finite"] and result["value"] is not None
    return {**result, "status": "ok" if ok else "failed", "note": "" if ok else "loss not finite or no val metric"}


def path_row(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [f"path {r['path']}", r["status"], "", r.get("note", "")]
    numbers = (f"loss {r['loss']:.3f}, {r['metric']} {r['value']:.3f}, {r['counted']}/step {r['steady_syncs']} "
               f"(logging steps {r['logging_syncs']}), collectives/step {r['steady_collectives']}, {r['seconds']:.0f} s")
    return [f"path {r['path']}", "ok", numbers, ""]


def update_kernels(log: Path) -> list[dict]:
    """update_kernels.py's table rows: update, tensors, multi-tensor calls, kernels ("-" on the CPU)."""
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in log.read_text().splitlines() if line.startswith("| ")]
    return [dict(zip(("update", "tensors", "calls", "kernels"), row)) for row in cells
            if row[0] != "update" and not row[0].startswith("---")]


def throughput_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report.get("rows", []):
        item = f"{r['section']}: {r['setting']}, batch {r['batch']}"
        if "error" in r:
            rows.append([item, "failed", "", r["error"][:120]])
        else:
            rows.append([item, "ok", f"{r['name']} {r['img_s']:,.0f} img/s, {r['baseline']} {r['baseline_img_s']:,.0f}"
                         f" (x{r['ratio']:.2f}), peak {r['peak_mib']:,.0f} MiB", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--wheels", default=".whl", help="wheels of webdataset, omegaconf, jsonargparse, ...")
    parser.add_argument("--workdir", help="shards, runs and logs (default: a temporary directory, removed)")
    parser.add_argument("--paths", help="only these paths, comma-separated (default: all)")
    parser.add_argument("--no-throughput", action="store_true", help="the paths only (a quick recheck)")
    args = parser.parse_args()
    paths = [row for row in PATHS if args.paths is None or row[0] in args.paths.split(",")]
    start, budget = time.time(), dict(BUDGET_S) if args.device == "cuda" else {k: 3 * v for k, v in BUDGET_S.items()}
    site = ensure_packages(ROOT / args.wheels if not Path(args.wheels).is_absolute() else Path(args.wheels))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), site, os.environ.get("PYTHONPATH")]))}
    sys.path.insert(0, str(ROOT))
    temporary = tempfile.TemporaryDirectory(prefix="gpu_check_") if args.workdir is None else None
    work = Path(args.workdir or temporary.name)
    for sub in ("logs", "syncs", "runs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    report: dict = {"device": args.device, "budget_s": budget, "paths": [], "throughput": None}

    shards = make_shards(work, SIZES[args.device])
    report["setup_s"] = round(time.time() - start, 1)
    deadline = time.time() + budget["paths"]
    with ThreadPoolExecutor(SIZES[args.device]["jobs"]) as pool:  # counts, not timings: runs may overlap
        report["paths"] = list(pool.map(lambda row: check_path(row, shards, work, args, env, deadline), paths))

    command = [sys.executable, "benchmarks/update_kernels.py", "--device", args.device]
    code, seconds = run(command, work / "logs" / "kernels.log", budget["kernels"], env)
    report["kernels"] = update_kernels(work / "logs" / "kernels.log") if code == 0 else []
    report["kernels_status"] = {"exit": code, "seconds": round(seconds, 1),
                                "note": "" if code == 0 else f"timed out after {budget['kernels']} s" if code is None
                                else last_line(work / "logs" / "kernels.log")}

    out = work / "throughput.json"
    if args.no_throughput:
        budget["throughput"] = 0
    command = [sys.executable, "benchmarks/throughput.py", "--config", "configs/imagenet.yaml", "--device",
               args.device, "--out", str(out), *THROUGHPUT[args.device]]
    timeout = min(budget["throughput"], start + sum(budget.values()) - time.time())
    code, seconds = run(command, work / "logs" / "throughput.log", timeout, env) if timeout > 0 else (0, 0.0)
    report["throughput"] = json.loads(out.read_text()) if out.is_file() else None
    report["throughput_status"] = {"exit": code, "seconds": round(seconds, 1),
                                   "note": "" if code == 0 else f"timed out after {timeout:.0f} s" if code is None
                                   else last_line(work / "logs" / "throughput.log")}
    report["total_s"] = round(time.time() - start, 1)

    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    rows = [path_row(r) for r in report["paths"]]
    rows += [[f"kernels: {k['update']}", "ok", f"{k['kernels']} kernels, {k['calls']} multi-tensor calls",
              f"{k['tensors']} tensors"] for k in report["kernels"]] or [
        ["kernels", "failed", "", report["kernels_status"]["note"] or "no table"]]
    if not args.no_throughput:
        rows += throughput_rows(report["throughput"] or {}) or [["throughput", "failed", "",
                                                                 report["throughput_status"]["note"]]]
    if code != 0 and report["throughput"]:
        rows.append(["throughput", "failed", "", f"exit {code}: {report['throughput_status']['note']}"])
    env_line = (report["throughput"] or {}).get("environment", {})
    print(f"\n{env_line.get('device', args.device)}, torch {env_line.get('torch', '?')}, total {report['total_s']} s "
          f"(budget {sum(budget.values())} s); JSON: {args.out}")
    print("| check | status | numbers | note |\n|---|---|---|---|")
    print("\n".join(f"| {' | '.join(r)} |" for r in rows))
    if temporary is not None:
        temporary.cleanup()
    sys.exit(0 if all(r[1] in ("ok", "skipped") for r in rows) else 1)


if __name__ == "__main__":
    main()

"""The 2026 recipe's parts in a real fit: progressive resizing follows the sample count, on a resume with another
global batch too."""

import pytest
import torch

from tests.crash import TinyNetwork
from tests.helpers import scalars, tiny_data, tiny_module, tiny_trainer
from xception_pl.module import XceptionModule
from xception_pl.resizing import ProgressiveResizing


class SeesSizes(XceptionModule):
    def shared_step(self, batch, stage):
        if stage == "train":
            self.sizes.append(batch["image"].shape[-1])
        return super().shared_step(batch, stage)


def test_size_at_chosen_sample_counts():
    resizing = ProgressiveResizing(start_size=160, end_fraction=0.7, max_samples=1_000)
    at = {s: resizing.size_at(s, end_size=299) for s in (0, 100, 350, 699, 700, 5_000)}
    # 160 + 139 x s / 700, rounded to a multiple of 32: 179.9 -> 192, 229.5 -> 224, 298.8 -> 288; then 299
    assert at == {0: 160, 100: 192, 350: 224, 699: 288, 700: 299, 5_000: 299}
    assert ProgressiveResizing(start_size=160, end_size=256, max_samples=10).size_at(9, end_size=299) == 256


def test_the_size_follows_the_samples_trained_across_a_resume_with_another_global_batch(tmp_path):
    """4 steps of 4 samples, then a resume with batches of 8 (as on twice the devices): the sizes are those of the
    sample counts 0, 4, 8, 12 | 16, 24, 32 over a budget of 40 from 71 to 103 px."""
    data = tiny_data(image_size=103)
    resizing = lambda: ProgressiveResizing(start_size=71, end_fraction=1.0, multiple=16, max_samples=40)  # noqa: E731
    module = tiny_module(data, cls=SeesSizes, network=TinyNetwork)  # the sizes are the callback's, not the network's
    module.sizes = []
    trainer = tiny_trainer(tmp_path, ema=None, max_steps=4, limit_val_batches=0,
                           parts={"progressive_resizing": resizing()})
    trainer.fit(module, data)
    checkpoint = tmp_path / "four.ckpt"
    trainer.save_checkpoint(checkpoint)

    twice = tiny_data(image_size=103, batch_size=8)
    resumed = tiny_module(twice, cls=SeesSizes, network=TinyNetwork)
    resumed.sizes = []
    tiny_trainer(tmp_path, ema=None, max_steps=7, max_epochs=-1, limit_val_batches=0,
                 parts={"progressive_resizing": resizing()}).fit(resumed, twice, ckpt_path=checkpoint)
    reference = resizing()
    expected = [reference.size_at(s, 103) for s in (0, 4, 8, 12)]
    assert module.sizes == expected == [71, 80, 80, 80]
    expected = [reference.size_at(s, 103) for s in (16, 24, 32)]
    assert resumed.sizes == expected == [80, 96, 96]
    logged = [value for _, value in scalars(tmp_path)["train/image_size"]]
    assert logged[:4] == [71.0, 80.0, 80.0, 80.0] and logged[-1] == 96.0


def test_progressive_resizing_needs_a_budget_and_a_size_xception_takes():
    with pytest.raises(ValueError, match="at least 71 px"):
        ProgressiveResizing(start_size=64)
    assert not ProgressiveResizing().enabled  # off by default


def small(config: str, train: str, run: str, *extra: str) -> list[str]:
    """The config at CPU size on our writer's shards: 87 px crops from 72 px, evaluation at 96."""
    return ["fit", "--config", config, "--data.init_args.train", train, "--data.init_args.val", train,
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", "--data.init_args.image_size", "87",
            "--data.init_args.eval_image_size", "96", "--data.init_args.eval_resize", "100",
            "--progressive_resizing.start_size", "72", "--progressive_resizing.multiple", "8",
            "--model.lr_scheduler.init_args.warmup_samples", "4", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.precision", "32-true",
            "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", run, *extra]


@pytest.mark.parametrize("recipe", ["imagenet_2026", "jft_2026"])
def test_the_2026_recipes_fit_on_cpu_at_small_size(tmp_path, recipe):
    from tests.data_helpers import jsonl_source, shards
    from tests.helpers import ROOT
    from xception_pl.cli import main
    from xception_pl.data.writer import write_shards

    if recipe == "jft_2026":  # multi-label shards
        labels = [[i % 3, (i + 1) % 3] if i % 2 else [i % 3] for i in range(12)]
        write_shards(str(jsonl_source(tmp_path / "src", labels)), str(tmp_path / "train"), shard_size=4, workers=1,
                     progress=False)
    else:
        shards(tmp_path, "train", classes=3, per_class=4, shard_size=4)
    run = tmp_path / "run"
    main(small(str(ROOT / "configs" / f"{recipe}.yaml"), str(tmp_path / "train"), str(run),
               "--checkpoint.save_top_k", "0",  # last.ckpt only: one 250 MB write, not two
               # the recipe's Xception in one of them (the network is the paper's in both)
               *(["--trainer.val_check_interval", "3", "--model.network", "tests.crash.TinyNetwork"]
                 if recipe == "jft_2026" else [])))
    logged = scalars(run)
    sizes = [value for _, value in logged["train/image_size"]]
    # 72 + 15 x s / 8.4 at s = 0, 4, 8 (0.7 of 12 samples), to a multiple of 8, at most the crop
    assert sizes == [72.0, 80.0, 87.0]
    lrs = [value for _, value in logged["train/lr"]]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)  # warm-up, then the decay towards zero at the budget's end
    main_metric = "val/map100" if recipe == "jft_2026" else "val/acc1"
    assert main_metric in logged and (run / "checkpoints" / "last.ckpt").is_file()

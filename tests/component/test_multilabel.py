"""JFT-style multi-label training end to end (sec. 4.1): JSON-lines source -> shard writer -> multi-hot
targets -> sigmoid cross-entropy -> MAP@100 and top-label accuracy in TensorBoard -> best checkpoint."""

import copy

import torch

from tests.helpers import scalars, tiny_trainer
from xception_pl.data import DemoDataModule
from xception_pl.module import XceptionModule
from xception_pl.schedules import SampleStepDecay


def test_multilabel_fit_raises_map100_above_its_initial_value(tmp_path):
    torch.manual_seed(0)  # the same initial weights whatever ran before in this process
    data = DemoDataModule(root=str(tmp_path / "demo"), num_classes=4, multilabel=True, train_images_per_class=12,
                          val_images_per_class=6, source_size=80, image_size=71, eval_resize=75, batch_size=8,
                          num_workers=0)
    assert data.multilabel and data.num_classes == 4
    module = XceptionModule(
        num_classes=data.num_classes, multilabel=True, train_size=data.train_size, batch_size=data.batch_size,
        network=lambda n: __import__("xception_pl").Xception(n, bn_momentum=0.3),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.02, momentum=0.9),
        lr_scheduler=lambda opt, samples: SampleStepDecay(opt, samples, decay_rate=0.9, decay_every_samples=3_000_000),  # sec. 4.2
    )
    initial = tiny_trainer(tmp_path / "init").validate(copy.deepcopy(module), data)[0]["val/map100"]
    trainer = tiny_trainer(tmp_path / "run", max_epochs=3)
    trainer.fit(module, data)
    logged = scalars(tmp_path / "run")
    final = logged["val/map100"][-1][1]
    print(f"val/map100: {initial:.3f} at initialization, {final:.3f} after training")
    assert final > initial + 0.05, (initial, final)
    assert "val/acc1" in logged  # top-1: is the highest-scored label a positive
    best = [p.name for p in (tmp_path / "run" / "checkpoints").glob("epoch=*")]
    assert best and all("map100=" in name for name in best)  # best-k by val/map100

    predictions = trainer.predict(module, data)[0]
    assert predictions["classes"].shape == predictions["probs"].shape == (8, 4)
    assert ((predictions["probs"] > 0) & (predictions["probs"] < 1)).all()  # independent sigmoids, not a softmax
    assert not torch.allclose(predictions["probs"].sum(1), torch.ones(8))

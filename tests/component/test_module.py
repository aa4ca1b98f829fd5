"""XceptionModule on tiny synthetic data: losses, weight decay groups, EMA, predict (non-finite losses:
tests/component/test_nonfinite.py)."""

import lightning as L
import pytest
import torch
from torch import nn

from tests.helpers import scalars, tiny_data, tiny_module, tiny_trainer
from xception_pl.inception import InceptionV3
from xception_pl.module import XceptionModule


def test_weight_decay_only_on_conv_and_linear_weights(tmp_path):
    data = tiny_data()
    module = tiny_module(data, weight_decay=1e-5)
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, data)
    decay, no_decay = module.trainer.optimizers[0].param_groups
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    convs_and_linears = {id(m.weight) for m in module.network.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in decay["params"]} == convs_and_linears
    assert len(no_decay["params"]) == sum(1 for p in module.network.parameters() if p.ndim == 1)


class WeightRecorder(L.Callback):
    """The classifier weights after every optimizer step, and the ones validation runs with."""

    def __init__(self) -> None:
        self.initial, self.trained, self.validated = None, [], []

    def on_train_start(self, trainer, pl_module):
        self.initial = pl_module.network.head.fc.weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trained.append(pl_module.network.head.fc.weight.detach().clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.validated.append(pl_module.network.head.fc.weight.detach().clone())


def test_validation_uses_polyak_averaged_weights(tmp_path):
    data, recorder = tiny_data(), WeightRecorder()
    module = tiny_module(data)
    tiny_trainer(tmp_path, ema=0.5, callbacks=[recorder]).fit(module, data)
    assert len(recorder.trained) == 4 and len(recorder.validated) == 1
    expected = recorder.initial  # then TensorFlow's warm-up: decay min(0.5, (1 + t) / (10 + t)) at step t
    for t, weights in enumerate(recorder.trained):
        decay = min(0.5, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * weights
    torch.testing.assert_close(recorder.validated[0], expected)
    assert not torch.allclose(recorder.validated[0], recorder.trained[-1])
    # The checkpoint's state_dict is the average, the raw weights are kept beside it for resuming.
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    torch.testing.assert_close(checkpoint["state_dict"]["network.head.fc.weight"], expected)
    torch.testing.assert_close(checkpoint["current_model_state"]["network.head.fc.weight"], recorder.trained[-1])


def test_multilabel_loss_is_sigmoid_cross_entropy_summed_over_classes():
    module = XceptionModule(num_classes=4, multilabel=True)
    logits = torch.tensor([[2.0, -1.0, 0.0, 0.5], [0.0, 0.0, 3.0, -2.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    p = logits.sigmoid()
    by_hand = -(target * p.log() + (1 - target) * (1 - p).log()).sum() / 2
    torch.testing.assert_close(module.loss(logits, target), by_hand)


def test_label_smoothing_is_off_by_default():
    logits, target = torch.randn(3, 5), torch.tensor([0, 3, 4])
    module = XceptionModule(num_classes=5)
    torch.testing.assert_close(module.loss(logits, target), nn.functional.cross_entropy(logits, target))
    smoothed = XceptionModule(num_classes=5, label_smoothing=0.1)
    assert smoothed.loss(logits, target) != module.loss(logits, target)


def test_label_smoothing_applies_to_mixed_targets_and_to_multilabel_as_timms_bce():
    logits = torch.randn(3, 5)
    mixed = torch.tensor([[0.7, 0.3, 0, 0, 0], [0, 0, 1.0, 0, 0], [0.5, 0, 0, 0, 0.5]])  # Mixup's soft targets
    module = XceptionModule(num_classes=5, label_smoothing=0.1)
    smoothed = mixed * 0.9 + 0.1 / 5
    by_hand = -(smoothed * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(module.loss(logits, mixed), by_hand)
    multilabel = XceptionModule(num_classes=5, multilabel=True, label_smoothing=0.1)
    hot = torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1]])
    target = hot * (1 - 0.1) + 0.1 / 5  # positives 0.92, negatives 0.02
    p = logits.sigmoid()
    by_hand = -(target * p.log() + (1 - target) * (1 - p).log()).sum() / 3
    torch.testing.assert_close(multilabel.loss(logits, hot), by_hand)


def test_predict_returns_top5_classes_and_probabilities(tmp_path):
    data = tiny_data()
    module = tiny_module(data)
    batches = tiny_trainer(tmp_path, ema=None).predict(module, data)
    first = batches[0]
    assert first["classes"].shape == first["probs"].shape == (4, 5)
    assert (first["probs"][:, :-1] >= first["probs"][:, 1:]).all()  # sorted, most likely first
    module.eval()
    with torch.no_grad():
        probs = module(next(iter(data.predict_dataloader()))["image"]).softmax(-1)
    torch.testing.assert_close(first["probs"], probs.topk(5).values)


def test_inception_v3_is_a_selectable_backbone():
    """The paper's baseline (sec. 4.3): torchvision's Inception V3 without the auxiliary tower."""
    module = XceptionModule(num_classes=1000, network=InceptionV3)
    assert sum(p.numel() for p in module.network.parameters()) == 23_834_568
    assert module.network.AuxLogits is None
    module.eval()
    with torch.no_grad():
        assert module(torch.randn(1, 3, 299, 299)).shape == (1, 1000)


def test_checkpoint_of_other_classes_is_refused(tmp_path):
    data = tiny_data()
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(tiny_module(data), data)
    other = tiny_data(num_classes=7)
    with pytest.raises(ValueError, match="trained with num_classes=6 but the data gives num_classes=7"):
        tiny_trainer(tmp_path).validate(tiny_module(other), other, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")


class LogsMaxLogit(XceptionModule):
    """A training metric added as a user adds one: one line in training_metrics."""

    reads: list[tuple[bool, int]] = []  # (the step logs, host reads in its training_step)

    def training_metrics(self, loss, logits, batch):
        return {**super().training_metrics(loss, logits, batch), "max_logit": logits.detach().max()}

    def training_step(self, batch, batch_idx):
        from tests.system.test_console import ScalarReads

        with ScalarReads() as reads:
            loss = super().training_step(batch, batch_idx)
        self.reads.append((self.trainer._logger_connector.should_update_logs, reads.count))
        return loss


def test_a_training_metric_added_in_one_place_reaches_tensorboard_and_the_log_line(tmp_path, capsys):
    from xception_pl.progress import ProgressBar

    data = tiny_data(train_size=16)  # 4 steps, logged at steps 2 and 4
    module = tiny_module(data, cls=LogsMaxLogit)
    tiny_trainer(tmp_path, enable_progress_bar=True, callbacks=[ProgressBar(log_file=True)], log_every_n_steps=2,
                 limit_val_batches=0).fit(module, data)
    logged = scalars(tmp_path)["train/max_logit"]
    assert [step for step, _ in logged] == [1, 3]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all(f"max_logit {value:.4g}" in line for line, (_, value) in zip(lines, logged))
    assert [count for logs, count in module.reads if not logs] == [0, 0]  # nothing read on the quiet steps

"""The Lightning, jsonargparse and torch internals xception_pl uses (docs/code.md "Seams") are there, in the shape it
uses them: a release that renames or reshapes one fails here, by name, in seconds, instead of somewhere in a
training run. Each test names the file that relies on the internal."""

import inspect
import re
from contextvars import ContextVar
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.cli import LightningCLI
from torch import nn

from xception_pl.guard import found_nonfinite
from xception_pl.host_syncs import _ReadCounter

ROOT = Path(__file__).resolve().parents[2]


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def source(function) -> str:
    return inspect.getsource(function)


@pytest.fixture
def trainer(tmp_path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- Lightning
def test_cli_py_overrides_lightning_clis_private_parse_ckpt_path_which_lightning_still_calls():
    assert parameters(LightningCLI._parse_ckpt_path) == ["self"]
    assert "self._parse_ckpt_path()" in source(LightningCLI.__init__)
    assert parameters(LightningCLI._parser) == ["self", "subcommand"]


def test_checkpointing_py_last_checkpoint_calls_model_checkpoints_private_methods():
    for name in ("_should_skip_saving_checkpoint", "_should_save_on_train_epoch_end", "_monitor_candidates"):
        assert parameters(getattr(ModelCheckpoint, name)) == ["self", "trainer"], name
    assert parameters(ModelCheckpoint._save_topk_checkpoint) == ["self", "trainer", "monitor_candidates"]
    from lightning.pytorch.loops.progress import _BatchProgress  # what the epoch loop's batch_progress is

    assert _BatchProgress().is_last_batch is False


def test_callbacks_py_and_slurm_py_read_and_push_a_steps_logging_through_the_logger_connector(trainer):
    connector = trainer._logger_connector
    assert isinstance(type(connector).__dict__["should_update_logs"], property)
    assert isinstance(connector.should_update_logs, bool)
    assert parameters(connector.update_train_step_metrics) == []


def test_slurm_py_replaces_the_epoch_loops_sigterm_broadcast_which_advance_calls(trainer):
    loop = trainer.fit_loop.epoch_loop
    assert parameters(loop._broadcast_sigterm_tensor) == []
    assert "self._broadcast_sigterm_tensor()" in source(type(loop).advance)


def test_slurm_py_wraps_validate_settings_which_the_launcher_calls_with_keywords():
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    assert parameters(SLURMEnvironment.validate_settings) == ["self", "num_devices", "num_nodes"]
    assert "validate_settings(num_devices=" in source(_SubprocessScriptLauncher.launch)


def test_slurm_py_passes_sigterm_on_through_the_launchers_kill():
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

    for launcher in (_MultiProcessingLauncher, _SubprocessScriptLauncher):
        assert parameters(launcher.kill) == ["self", "signum"], launcher


def test_datamodule_py_moves_the_epoch_loops_restored_batch_counts_which_on_run_start_reads():
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert "data_fetcher.fetched += self.batch_progress.current.ready" in source(_TrainingEpochLoop.on_run_start)
    assert "self.batch_progress.current.completed >= self.trainer.num_training_batches" in source(
        _TrainingEpochLoop.reset)


def test_callbacks_py_validate_at_end_relies_on_the_epoch_loop_validating_when_the_trainer_should_stop():
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    check = source(_TrainingEpochLoop._should_check_val_fx)
    assert "if self.trainer.should_stop and self.trainer.fit_loop._can_stop_early:" in check


def test_hyperparameters_py_records_lightning_clis_own_instantiator_which_loading_allows():
    from lightning.pytorch.core.saving import _ALLOWED_INSTANTIATORS

    from xception_pl.hyperparameters import INSTANTIATOR

    assert INSTANTIATOR in _ALLOWED_INSTANTIATORS


def test_module_py_learns_from_a_context_variable_that_lightning_cli_built_it():
    from lightning.pytorch.core.mixins import hparams_mixin

    assert isinstance(hparams_mixin._given_hyperparameters, ContextVar)
    assert hparams_mixin._given_hyperparameters.get() is None  # outside the CLI's instantiation
    assert "_given_hyperparameters_context(" in inspect.getsource(inspect.getmodule(LightningCLI))


def test_module_py_asks_whether_a_trainer_is_attached_through_the_modules_trainer_attribute():
    module = L.LightningModule()
    assert module._trainer is None
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        module.trainer  # what the check avoids


def test_ema_py_reads_the_average_where_weight_averaging_keeps_it():
    assert WeightAveraging()._average_model is None  # an AveragedModel from setup("fit") on
    assert "self._average_model = AveragedModel(" in source(WeightAveraging.setup)
    assert "_copy_average_to_current(" in source(WeightAveraging.on_train_end)  # what on_fit_end calls


def test_checkpointing_py_best_checkpoints_keeps_the_state_key_model_checkpoint_generates():
    from xception_pl.checkpointing import BestCheckpoints

    assert "self.__class__.__qualname__" in source(ModelCheckpoint._generate_state_key)
    best, theirs = BestCheckpoints(save_top_k=2), ModelCheckpoint(monitor="val/acc1", mode="max", save_top_k=2)
    assert best.state_key == theirs.state_key  # a checkpoint of either restores the other's best-k bookkeeping


def test_checkpointing_py_and_trackers_py_rely_on_model_checkpoints_removal_rule_and_the_loggers_run_ids(tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    assert parameters(ModelCheckpoint._should_remove_checkpoint) == ["self", "trainer", "previous", "current"]
    assert "self._should_remove_checkpoint(trainer, " in source(ModelCheckpoint)  # where best-k removes a file
    mlflow = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", run_id="abc")
    assert (mlflow._run_id, mlflow._experiment_id) == ("abc", None)
    wandb = WandbLogger(offline=True, id="abc", save_dir=str(tmp_path))
    assert (wandb._id, wandb._wandb_init["id"], wandb._experiment) == ("abc", "abc", None)
    assert "wandb.init(**self._wandb_init)" in source(type(wandb).experiment.fget)


def test_storage_py_discards_a_failed_upload_so_close_completes_nothing():
    from fsspec.spec import AbstractBufferedFile
    from s3fs.core import S3File

    assert "self.closed = False" in source(AbstractBufferedFile.__init__)
    assert "if self.closed:" in source(AbstractBufferedFile.close)  # a file marked closed completes nothing
    assert "self._abort_mpu()" in source(S3File.discard)


# ---------------------------------------------------------------------------------------------- webdataset
def test_pipeline_py_sets_webdatasets_nsamples_which_each_pass_reads():
    import webdataset as wds

    assert issubclass(wds.WebLoader, wds.DataPipeline)
    assert "self.nsamples = max(nsamples, nbatches)" in source(wds.DataPipeline.with_epoch)
    assert "islice(self.iterator(), self.nsamples)" in source(wds.DataPipeline.__iter__)  # read at each iter()


# ---------------------------------------------------------------------------------------------- torch
def test_watchdog_py_counts_in_the_default_groups_store(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        store = dist.distributed_c10d._get_default_store()
        assert store.add("xception_pl/heartbeat/0", 1) == 1 and store.add("xception_pl/heartbeat/0", 0) == 1
    finally:
        dist.destroy_process_group()


def test_schedules_py_evaluates_torchs_schedulers_by_their_closed_form_or_get_lr():
    from torch.optim import lr_scheduler

    for name in ("StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "CosineAnnealingLR",
                 "PolynomialLR"):
        assert "self.last_epoch" in source(getattr(lr_scheduler, name)._get_closed_form_lr), name
    for name in ("LambdaLR", "OneCycleLR", "CyclicLR"):  # TorchShape.STATELESS: get_lr reads last_epoch alone
        assert "self.last_epoch" in source(getattr(lr_scheduler, name).get_lr), name
    assert "_get_lr_called_within_step" in source(lr_scheduler._enable_get_lr_call)


def test_distributed_py_turns_off_ddps_buffer_broadcast_which_each_forward_reads():
    from torch.nn.parallel import DistributedDataParallel

    assert "self.forward_sync_buffers" in source(DistributedDataParallel.will_sync_module_buffers)
    assert "self.will_sync_module_buffers()" in source(DistributedDataParallel._check_sync_bufs_pre_fwd)



def test_module_py_writes_the_hparams_summary_through_the_summary_writers_file_writer(tmp_path):
    from lightning.fabric.loggers.logger import _DummyExperiment
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path)
    try:
        assert callable(writer._get_file_writer().add_summary)
    finally:
        writer.close()
    assert _DummyExperiment()._get_file_writer() is None  # a TensorBoardLogger's experiment off rank 0


def test_the_hparams_summary_names_the_final_metrics_and_logs_no_scalar(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    from xception_pl.hyperparameters import log_hyperparameters

    logger = TensorBoardLogger(tmp_path, name="", version="", default_hp_metric=False)
    log_hyperparameters([logger], {"lr": 0.1, "optimizer": {"class_path": "torch.optim.SGD"}}, {"val/acc1": 0.5})
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    summary = events.PluginTagToContent("hparams")
    experiment = HParamsPluginData.FromString(summary["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/acc1"]
    assert {h.name for h in experiment.hparam_infos} == {"lr", "optimizer/class_path"}
    assert events.Tags()["scalars"] == []  # no step-0 copy of val/acc1 (TensorBoardLogger.log_hyperparams's)


def test_module_py_sets_the_lr_schedulers_last_lr_which_get_last_lr_returns():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scheduler._last_lr = [0.5]
    assert scheduler.get_last_lr() == [0.5]


def test_module_py_moves_its_counters_in_apply_which_to_goes_through():
    moved = []

    class Probe(nn.Module):
        def _apply(self, fn, *args, **kwargs):
            moved.append(fn(torch.zeros((), dtype=torch.long)).dtype)
            return super()._apply(fn, *args, **kwargs)

    Probe().to(torch.float64)
    assert moved == [torch.long]  # .to(dtype) leaves integer tensors alone, as for buffers


def test_optim_ema_and_guard_find_every_multi_tensor_op_they_call():
    used = set()
    for name in ("optim.py", "ema.py", "guard.py"):
        used |= set(re.findall(r"torch\.(_(?:amp_)?foreach_\w+)", (ROOT / "xception_pl" / name).read_text()))
    assert "_amp_foreach_non_finite_check_and_unscale_" in used and len(used) > 5
    assert [name for name in sorted(used) if not hasattr(torch, name)] == []


def test_guard_py_flags_a_non_finite_gradient_with_grad_scalers_kernel():
    finite = [torch.ones(3), torch.ones(2, dtype=torch.float64)]
    assert found_nonfinite(finite).tolist() == [0.0]
    assert found_nonfinite([*finite, torch.tensor([1.0, float("nan")])]).tolist() == [1.0]
    assert finite[0].tolist() == [1.0, 1.0, 1.0]  # unscaled by 1: unchanged


def test_optim_py_and_guard_py_rely_on_grad_scalers_contract_with_optimizers():
    from torch.amp.grad_scaler import GradScaler

    step = source(GradScaler.step)
    assert "_step_supports_amp_scaling" in step and "found_inf" in step and "grad_scale" in step


def test_host_syncs_py_sees_every_host_read_as_local_scalar_dense():
    with _ReadCounter() as counter:
        torch.ones(2).sum().item()
        float(torch.ones(()))
        bool(torch.ones(()))
    assert counter.reads == 3


def test_module_py_raises_dynamos_recompile_limit_which_dynamo_still_names_so():
    import torch._dynamo

    from xception_pl.module import XceptionModule

    limit = torch._dynamo.config.recompile_limit
    try:
        XceptionModule(num_classes=3, compile=True)
        assert torch._dynamo.config.recompile_limit == max(limit, 32)
    finally:
        torch._dynamo.config.recompile_limit = limit

from xception_pl.data.position import StreamPosition


def test_passes_follow_the_trainer_epoch_or_count_up_without_one():
    position = StreamPosition(seed=3)
    assert [position.next_pass(None) for _ in range(3)] == [(0, 0), (1, 0), (2, 0)]
    assert position.next_pass(7) == (7, 0)


def test_a_checkpoint_saves_the_next_batch_to_train_and_an_epoch_end_saves_the_next_epoch():
    position = StreamPosition(seed=3)
    position.next_pass(2)
    assert position.state_dict() == {"seed": 3, "epoch": 2, "batch": 0}  # outside a fit
    assert position.state_dict(trained=4, epoch_batches=10, global_batch=8) == {
        "seed": 3, "epoch": 2, "batch": 4, "samples": 32, "trained": 4}
    assert position.state_dict(trained=10, epoch_batches=10, global_batch=8) == {
        "seed": 3, "epoch": 3, "batch": 0, "samples": 0, "trained": 10}


def test_the_first_pass_after_a_restore_starts_at_the_saved_batch_then_passes_go_on():
    position = StreamPosition(seed=0)
    position.next_pass(None)
    position.load_state_dict({"seed": 5, "epoch": 2, "batch": 4})
    assert position.next_pass(0) == (2, 4)  # the checkpoint, not the trainer's epoch, places the first pass
    assert position.next_pass(None) == (3, 0)
    assert position.state_dict()["seed"] == 5


def test_a_checkpoint_without_a_batch_resumes_at_the_start_of_its_epoch():
    position = StreamPosition(seed=0)
    position.load_state_dict({"seed": 1, "epoch": 6})
    assert position.next_pass(None) == (6, 0)


def test_a_position_taken_on_another_world_size_goes_on_at_the_same_sample():
    saved = StreamPosition(seed=0)
    saved.next_pass(2)
    mid_epoch = saved.state_dict(trained=5, epoch_batches=10, global_batch=8)  # 40 of 80 samples, 2 ranks x 4
    position = StreamPosition(seed=0)
    position.load_state_dict(mid_epoch, global_batch=4, epoch_batches=20)  # on 1 rank
    assert (position.batch, position.batch_shift) == (10, 5)  # Lightning counted 5 batches: now 10 of 20
    position.load_state_dict(mid_epoch, global_batch=16, epoch_batches=5)  # on 4 ranks
    assert (position.batch, position.batch_shift) == (2, -3)  # 32 of the 40 samples: within one global batch
    assert position.next_pass(0) == (2, 2)

    epoch_end = saved.state_dict(trained=10, epoch_batches=10, global_batch=8)
    position.load_state_dict(epoch_end, global_batch=4, epoch_batches=20)
    assert (position.epoch, position.batch, position.batch_shift) == (3, 0, 10)  # Lightning sees 20 of 20 done
    position.load_state_dict({"seed": 1, "epoch": 6, "batch": 3}, global_batch=4, epoch_batches=20)  # older
    assert (position.batch, position.batch_shift) == (3, 0)

from xception_pl.data.position import StreamPosition


def test_passes_follow_the_trainer_epoch_or_count_up_without_one():
    position = StreamPosition(seed=3)
    assert [position.next_pass(None) for _ in range(3)] == [(0, 0), (1, 0), (2, 0)]
    assert position.next_pass(7) == (7, 0)


def test_a_checkpoint_saves_the_next_batch_to_train_and_an_epoch_end_saves_the_next_epoch():
    position = StreamPosition(seed=3)
    position.next_pass(2)
    assert position.state_dict() == {"seed": 3, "epoch": 2, "batch": 0}
    assert position.state_dict(trained=4, epoch_batches=10) == {"seed": 3, "epoch": 2, "batch": 4}
    assert position.state_dict(trained=10, epoch_batches=10) == {"seed": 3, "epoch": 3, "batch": 0}


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

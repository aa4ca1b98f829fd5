"""`python -m xception_pl lr_find --config FILE`: Lightning's lr range test on a config's own optimizer, schedule,
data and world size, leaving the run directory alone. (In this process: the command is `xception_pl.lr_find.main`.)"""

import re

import pytest

from tests.helpers import run_config, synthetic_data
from xception_pl.lr_find import main


def test_lr_find_sweeps_the_configs_global_batch_on_one_device_and_writes_only_its_curve(tmp_path, capsys):
    run = tmp_path / "run"  # the config's run directory, which the sweep must not create
    config = run_config(tmp_path / "c.yaml", run, trainer={"devices": 2, "strategy": "ddp"},  # 2 x 2 a step
                        data=synthetic_data(batch_size=2), model={"network": "tests.crash.TinyNetwork"})
    curve = tmp_path / "out" / "curve.png"
    main(["--config", str(config), "--num_training", "13", "--min_lr", "1e-5", "--max_lr", "1.0",
          "--output", str(curve)])
    printed = capsys.readouterr().out
    line = re.search(r"lr_find: suggested lr (\S+) for model.optimizer.init_args.lr at the global batch of 4 "
                     r"\(13 steps from 1e-05 to 1; the curve: (\S+)\)", printed)
    assert line, printed[-2000:]
    assert 1e-5 <= float(line[1]) <= 1.0 and line[2] == str(curve)
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not run.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]


def test_lr_find_refuses_a_bad_range_before_building_anything(tmp_path):
    with pytest.raises(SystemExit, match="lr_find needs 0 < --min_lr < --max_lr"):
        main(["--config", str(run_config(tmp_path / "c.yaml", tmp_path / "run")), "--min_lr", "1", "--max_lr", "0.1"])

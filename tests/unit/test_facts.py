"""Every data module we ship declares the facts the model is built with (xception_pl.facts.DataFacts), and the
check that links them to the model names a missing or mistyped one."""

import pytest

from tests.data_helpers import shards
from xception_pl.data import DemoDataModule, WebDatasetDataModule
from xception_pl.data.synthetic import SyntheticDataModule
from xception_pl.facts import DATA_FACTS, DataFacts, data_fact


def test_every_shipped_data_module_declares_its_facts(tmp_path):
    shards(tmp_path, "train", classes=3, per_class=2, shard_size=2)
    modules = [WebDatasetDataModule(train=str(tmp_path / "train"), batch_size=2),
               DemoDataModule(root=str(tmp_path / "demo"), num_classes=2, train_images_per_class=2,
                              val_images_per_class=1, source_size=32, batch_size=2),
               SyntheticDataModule(num_classes=4, train_size=8, batch_size=2)]
    for module in modules:
        assert isinstance(module, DataFacts)
        facts = {name: data_fact(module, name) for name in DATA_FACTS}
        assert facts["batch_size"] == 2 and facts["multilabel"] is False and facts["train_size"] > 0
    assert [data_fact(m, "num_classes") for m in modules] == [3, 2, 4]


@pytest.mark.parametrize("facts, message", [
    ({"multilabel": False, "train_size": 8, "batch_size": 2}, "Data has no `num_classes`: a data module for "
                                                              "XceptionModule declares xception_pl.facts.DataFacts"),
    ({"num_classes": True, "multilabel": False, "train_size": 8, "batch_size": 2},
     "Data.num_classes = True: xception_pl.facts.DataFacts needs int"),
    ({"num_classes": 3, "multilabel": "no", "train_size": 8, "batch_size": 2},
     "Data.multilabel = 'no': xception_pl.facts.DataFacts needs bool"),
    ({"num_classes": 3, "multilabel": False, "train_size": 8, "batch_size": 0}, "Data.batch_size = 0: must be"),
])
def test_a_missing_or_mistyped_fact_is_named(facts, message):
    data = type("Data", (), facts)()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        for name in DATA_FACTS:
            data_fact(data, name)

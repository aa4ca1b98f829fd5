"""The commands the README and docs/ show work: every training command parses against today's CLI (a moved or
renamed key fails here), the CPU demo's run for real at a few steps, every config fragment merges into the demo
config, and the README's Python example trains. (The demo itself, in full: tests/system/test_smoke.py.)"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT
from xception_pl.cli import main

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SMALL = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
         "--data.init_args.batch_size", "4"]


def blocks(language: str) -> list[tuple[str, str]]:
    """(page, text) of every ```language block."""
    return [(page.name, match) for page in PAGES
            for match in re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)]


def training_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for page, text in blocks("bash"):
        for line in text.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            found = re.search(r"-m xception_pl (fit|validate|test|predict) (.*)", line)
            if found and "$" not in found.group(2) and "<" not in found.group(2):
                commands.append((page, [found.group(1), *shlex.split(found.group(2))]))
    return commands


COMMANDS = training_commands()


def test_the_docs_show_training_commands():
    assert len(COMMANDS) >= 8 and {page for page, _ in COMMANDS} >= {"README.md", "training.md", "multinode.md"}


@pytest.mark.parametrize("page, args", COMMANDS, ids=[f"{p}: {' '.join(a)[:60]}" for p, a in COMMANDS])
def test_each_training_command_shown_parses(page, args, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        main([*[a for a in args if a != "--print_config"], "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert "model:" in capsys.readouterr().out


# The demo's variants with its own network (the demo itself: test_smoke.py; other networks at demo size:
# test_cli.py's timm run and unit/test_backbone.py).
DEMO_RUNS = [args for _, args in COMMANDS if args[:3] == ["fit", "--config", "configs/smoke.yaml"] and len(args) > 3
             and not {"--ckpt_path", "--model.network.class_path"} & set(args)]


@pytest.mark.parametrize("args", DEMO_RUNS, ids=[" ".join(a[3:])[:60] or "demo" for a in DEMO_RUNS])
def test_each_demo_command_shown_trains_a_few_steps(args, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    main([*args, *SMALL, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


FRAGMENTS = [(page, text) for page, text in blocks("yaml") if set(yaml.safe_load(text) or {}) <= {"model", "data"}]


@pytest.mark.parametrize("page, text", FRAGMENTS, ids=[f"{p}: {t.split()[0:3]}" for p, t in FRAGMENTS])
def test_each_config_fragment_shown_merges_into_the_demo_config(page, text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "fragment.yaml").write_text(text)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "configs/smoke.yaml", "--config", str(tmp_path / "fragment.yaml"), "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    for section, values in yaml.safe_load(text).items():
        assert set(values.get("init_args", values)) <= set(printed[section].get("init_args", printed[section]))


def test_the_readmes_python_example_trains(tmp_path, monkeypatch):
    (source,) = [text for page, text in blocks("python") if page == "README.md"]
    monkeypatch.chdir(tmp_path)
    small = source.replace("max_epochs=2", "max_steps=2, limit_val_batches=1, enable_progress_bar=False")
    small = small.replace("batch_size=32", "batch_size=4")
    small = small.replace("**trainer_parts(", "**trainer_parts(progress_bar=False, default_root_dir=")
    exec(compile(small, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "python" / "checkpoints" / "last.ckpt").is_file()

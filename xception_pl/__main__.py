"""`python -m xception_pl {fit,validate,test,predict} ...` trains; `shards` writes shards; `sweep` runs a study
of configs/experiments/; `report` tabulates and plots its runs; `export` exports a checkpoint; `lr_find` runs the
lr range test on a config."""

import sys


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["shards"]:
        from xception_pl.data.writer import main as write_shards

        write_shards(argv[1:])
    elif argv[:1] == ["sweep"]:
        from xception_pl.sweep import main as sweep

        sweep(argv[1:])
    elif argv[:1] == ["report"]:
        from xception_pl.report import main as report

        report(argv[1:])
    elif argv[:1] == ["lr_find"]:
        from xception_pl.lr_find import main as lr_find

        lr_find(argv[1:])
    elif argv[:1] == ["export"]:
        from xception_pl.export import main as export

        export(argv[1:])
    else:
        from xception_pl.cli import main as train

        train(args)


if __name__ == "__main__":
    main()

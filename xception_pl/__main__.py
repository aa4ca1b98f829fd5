"""`python -m xception_pl {fit,validate,test,predict} ...` trains; `python -m xception_pl shards ...` writes shards;
`python -m xception_pl export ...` exports a checkpoint."""

import sys


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["shards"]:
        from xception_pl.data.writer import main as write_shards

        write_shards(argv[1:])
    elif argv[:1] == ["export"]:
        from xception_pl.export import main as export

        export(argv[1:])
    else:
        from xception_pl.cli import main as train

        train(args)


if __name__ == "__main__":
    main()

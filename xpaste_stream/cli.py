"""The `xpaste-stream` command: one subcommand per stage, each registered by its sub-package."""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError
from .formats import FormatError

# Modules that each define `register(subparsers)`; a subcommand lives beside the code it runs.
_COMMAND_MODULES = (
    "xpaste_stream.pipeline",         # run
    "xpaste_stream.pack.cli",         # pack-coco
    "xpaste_stream.generate.cli",     # generate
    "xpaste_stream.extract.cli",      # extract
    "xpaste_stream.bank.cli",         # index
    "xpaste_stream.inspect",          # inspect
    "xpaste_stream.loader.cli",       # demo, bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xpaste-stream",
        description="X-Paste-style copy-paste augmentation at scale (WebDataset shards + DALI).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a stage not built yet registers nothing
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ConfigError, FormatError, FileNotFoundError) as e:
        print(f"xpaste-stream {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

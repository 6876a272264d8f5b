"""The `xpaste-stream` command: one subcommand per stage, each registered by its sub-package.

Here too the error policy (errors.py) meets the user: a problem found before work is one line
without a traceback (`--debug` shows it) and exit status 2; a stage whose skips pass the policy's
thresholds exits 1 and says why, after naming the first skipped samples; Ctrl-C and SIGTERM stop
with a one-line hint that rerunning resumes (exit status 130 / 143); anything unexpected exits 3.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback

from . import errors
from .config import DEVICE_HELP, ConfigError, from_dict, parse_device
from .executors import REFUSALS, UnitsFailed
from .shards import resolve_inputs

# Modules that each define `register(subparsers)`; a subcommand lives beside the code it runs.
_COMMAND_MODULES = (
    "xpaste_stream.pipeline",         # run
    "xpaste_stream.pack.cli",         # pack-coco
    "xpaste_stream.generate.cli",     # generate
    "xpaste_stream.extract.cli",      # extract
    "xpaste_stream.bank.cli",         # index
    "xpaste_stream.inspect",          # inspect
    "xpaste_stream.report",           # report
    "xpaste_stream.loader.cli",       # demo, bench
    "xpaste_stream.train.cli",        # train, evaluate
)
# Commands that write shard sets or a bank: judged by the error policy, resumed by a rerun.
_STAGE_COMMANDS = ("run", "pack-coco", "generate", "extract", "index")
# Stage commands whose positional shard patterns are checked before work (the stage checks kinds).
_INPUT_PATTERNS = {"extract": "inputs", "index": "shards"}
# Errors that are the input's or the machine's, not the program's: one line, exit status 2.
# A work unit's refusals (executors.REFUSALS: never retried) are among them, on every executor.
_USER_ERRORS = (*REFUSALS, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xpaste-stream",
        description="X-Paste-style copy-paste augmentation at scale (WebDataset shards + DALI).")
    _add_debug(parser, argparse.SUPPRESS)
    parser.set_defaults(debug=False, max_failed_fraction=None, max_bad_shards=None, show_skips=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a stage not built yet registers nothing
                continue
            raise
        module.register(sub)
    for name, command in sub.choices.items():
        _add_common_options(command, policy=name in _STAGE_COMMANDS)
    parser.set_defaults(quiet=False)
    return parser


def _device_type(text: str) -> str:
    try:
        return parse_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _is_meaningful(default) -> bool:
    return default not in (None, False, argparse.SUPPRESS, [], ()) and not callable(default)


def _unify(parser: argparse.ArgumentParser) -> None:
    """What every (sub)command shares: `--device` in one grammar (config.parse_device),
    `--quiet`, and its defaults in the help text."""
    for action in parser._actions:
        if action.dest == "device" and action.option_strings:
            action.type, action.choices = _device_type, None
            if isinstance(action.default, str) or action.default is None:
                action.default = parse_device(action.default) if action.default else action.default
            action.help = f"{DEVICE_HELP} {action.help or ''}".rstrip() if "cuda:N" not in (
                action.help or "") else action.help
        if action.help is argparse.SUPPRESS or not action.option_strings:
            continue
        text = action.help or ""
        if _is_meaningful(action.default) and "default" not in text:
            value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) \
                else action.default
            action.help = f"{text} (default: {str(value).replace('%', '%%')})".strip()
    if "quiet" not in {a.dest for a in parser._actions}:
        parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                            help="no progress bars or progress lines (results are still printed)")


def _add_debug(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of an error")


def _add_common_options(parser: argparse.ArgumentParser, policy: bool) -> None:
    """`--debug` on every (sub)command, `--quiet`, one `--device` grammar, defaults in the
    help; the error-policy thresholds on the stages."""
    _add_debug(parser, argparse.SUPPRESS)
    if policy:
        p = parser.add_argument_group("error policy (a run that passes a threshold exits 1)")
        p.add_argument("--max-failed-fraction", type=float, default=argparse.SUPPRESS,
                       metavar="F", help="fail the run when more than this fraction of its inputs "
                                         f"is skipped (default {errors.ErrorPolicy.max_failed_fraction})")
        p.add_argument("--max-bad-shards", type=int, default=argparse.SUPPRESS, metavar="N",
                       help="damaged or unreadable input shards tolerated (default "
                            f"{errors.ErrorPolicy.max_bad_shards})")
        p.add_argument("--show-skips", type=int, default=argparse.SUPPRESS, metavar="N",
                       help=f"skipped samples named on the console (default {errors.ErrorPolicy.show})")
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        _unify(parser)
    for action in subcommands:
        for child in action.choices.values():
            _add_common_options(child, policy)


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)subcommand's parser that `args` were parsed for (its usage goes with errors)."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sub.dest, None) if sub is not None else None
        if name not in (sub.choices if sub is not None else {}):
            return parser
        parser = sub.choices[name]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Arguments; an unknown one is reported with the usage of the subcommand it was given to."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def policy_from_args(args: argparse.Namespace, base: errors.ErrorPolicy | None = None
                     ) -> errors.ErrorPolicy:
    """The error policy: `base` (a pipeline file's, or the defaults) with the flags given."""
    values = vars(base) if base is not None else {}
    flags = {"max_failed_fraction": getattr(args, "max_failed_fraction", None),
             "max_bad_shards": getattr(args, "max_bad_shards", None),
             "show": getattr(args, "show_skips", None)}
    return from_dict(errors.ErrorPolicy, {**values, **{k: v for k, v in flags.items() if v is not None}},
                     "error policy")


def check_input_patterns(args: argparse.Namespace) -> None:
    """Every input pattern of a stage must name something, before any work."""
    attr = _INPUT_PATTERNS.get(args.command)
    if attr is not None:
        resolve_inputs(getattr(args, attr), stage=args.command)


def check_devices(args: argparse.Namespace) -> None:
    """A `--device` naming a GPU this machine lacks is refused before any work."""
    try:
        errors.check_device(getattr(args, "device", None))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with errors.stop_on_signals(), errors.collecting() as outcomes:
            args.error_policy = policy_from_args(args)
            check_devices(args)
            check_input_patterns(args)
            result = args.func(args)
            sys.stdout.flush()  # a reader gone (broken pipe) shows here, not at exit
    except KeyboardInterrupt as e:
        print(_stopped(args.command, e), file=sys.stderr)
        return errors.interrupted_exit_code(e)
    except BrokenPipeError:  # `xpaste-stream inspect ... | head -1`: the reader is gone
        return _broken_pipe()
    except _USER_ERRORS as e:
        _print_error(args, f"error: {e}")
        return errors.EXIT_USAGE
    except UnitsFailed as e:  # the work ran; these units failed on every attempt
        _print_error(args, f"error: {e}")
        return errors.EXIT_FAILED
    except Exception as e:  # a bug or an unforeseen environment problem: still one line
        _print_error(args, f"internal error: {type(e).__name__}: {e}"
                           + ("" if args.debug else " (rerun with --debug for the traceback)"))
        return errors.EXIT_INTERNAL
    return judge(outcomes, args.error_policy, int(result or 0))


def judge(outcomes: list[errors.StageOutcome], policy: errors.ErrorPolicy, code: int = 0) -> int:
    """Print each stage's skips and verdict (stderr); EXIT_FAILED when one failed the policy."""
    for outcome in outcomes:
        why = policy.judge(outcome)
        text = errors.format_outcome(outcome, why, policy.show)
        if text:
            print(text, file=sys.stderr)
        if why:
            code = max(code, errors.EXIT_FAILED)
    return code


def _broken_pipe() -> int:
    """End quietly when stdout's reader has gone: nothing more is printed (the interpreter's
    final flush goes to /dev/null), exit status 141 as for a process killed by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return errors.EXIT_SIGNAL_BASE + signal.SIGPIPE


def _print_error(args: argparse.Namespace, message: str) -> None:
    if args.debug:
        traceback.print_exc()
    print(f"xpaste-stream {args.command}: {message}", file=sys.stderr)


def _stopped(command: str, e: KeyboardInterrupt) -> str:
    name = signal.Signals(e.signum).name if isinstance(e, errors.Terminated) else "SIGINT (Ctrl-C)"
    hint = ("; finished shards are kept: rerun the same command to resume"
            if command in _STAGE_COMMANDS else "")
    return f"xpaste-stream {command}: stopped by {name}{hint}"


if __name__ == "__main__":
    sys.exit(main())

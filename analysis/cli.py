"""The ``lowmag`` command.

Each sub-command lives in ``analysis/commands/<name>.py`` and exposes
``register(subparsers)``; the handler it sets returns an exit code. Errors the library
raises on purpose (``AnalysisError``) print one line and exit 2: never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMAND_MODULES = [
    "analysis.commands.slides",
    "analysis.commands.synth",
    "analysis.commands.export",
    "analysis.commands.maga",
    "analysis.commands.crossval",
    "analysis.commands.models",
    "client.command",  # the hospital side, beside the library
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowmag", description="LowMag: low-magnification pathology"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from analysis.errors import AnalysisError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except AnalysisError as exc:
        print(f"lowmag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`lowmag info X | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except FileNotFoundError as exc:
        print(f"lowmag {args.command}: error: file not found: {exc.filename}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lowmag {args.command}: error: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowmag {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

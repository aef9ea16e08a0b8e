"""What every command line shares: the config flags, --print-config, and turning user errors into exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from rwkv_app.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_config_args(parser: argparse.ArgumentParser, kind: str, required: bool = True) -> None:
    """--config-dir and --{kind}-cfg NAME (no `.toml`), plus --print-config."""
    parser.add_argument("--config-dir", default="config", metavar="DIR",
                        help="folder holding model/, train/ and infer/ (default: ./config)")
    parser.add_argument(f"--{kind}-cfg", required=required, metavar="NAME",
                        help=f"name of a file in DIR/{kind}/, without .toml")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved configuration as TOML (secrets hidden) and exit")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 2 (argparse's own code) without the usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def run_main(body: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None, prog: str = "") -> int:
    """Call `body(argv)`; a `UserError` becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    try:
        return body(argv) or 0
    except UserError as e:
        print(f"{prog or 'rwkv'}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog or 'rwkv'}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def setup_logging(level: str = "info") -> None:
    """rwkv-rs level names (trace/debug/info/warn/error) onto Python logging."""
    names = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
             "error": logging.ERROR}
    logging.basicConfig(level=names.get(level, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

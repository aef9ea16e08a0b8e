"""rwkv-infer: serve the models of config/infer/NAME.toml over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import faulthandler
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from rwkv_app.cli.common import add_config_args, make_parser, run_main, setup_logging
from rwkv_app.config import config_path, dump_toml, load_infer_config


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = make_parser("rwkv-infer", "Serve the models of config/infer/NAME.toml (OpenAI-compatible HTTP API).")
    add_config_args(parser, "infer")
    args = parser.parse_args(argv)
    cfg = load_infer_config(args.config_dir, args.infer_cfg)
    if args.print_config:
        sys.stdout.write(dump_toml(cfg))
        return 0
    from rwkv_app.infer.server import InferServer

    setup_logging()
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack to stderr: why is it stuck?
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    InferServer(cfg, config_path(args.config_dir, "infer", args.infer_cfg), Path(args.config_dir)).run()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv, "rwkv-infer")


if __name__ == "__main__":
    sys.exit(main())

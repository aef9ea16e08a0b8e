"""rwkv-train: train the model a config/train/NAME.toml describes."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from rwkv_app.cli.common import add_config_args, make_parser, run_main
from rwkv_app.config import dump_toml, load_train_config


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = make_parser("rwkv-train", "Train an RWKV-7 model from config/train/NAME.toml.")
    add_config_args(parser, "train")
    args = parser.parse_args(argv)
    cfg = load_train_config(args.config_dir, args.train_cfg)
    if args.print_config:
        sys.stdout.write(dump_toml(cfg))
        return 0
    raise SystemExit("rwkv-train: training is not wired yet")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv, "rwkv-train")


if __name__ == "__main__":
    sys.exit(main())

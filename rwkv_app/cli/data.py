"""rwkv-data: turn raw text / JSONL / NumPy arrays into the binidx files a train config reads."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from rwkv_app.cli.common import add_config_args, make_parser, run_main
from rwkv_app.config import dump_toml, load_train_config


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = make_parser("rwkv-data", "Prepare training data (binidx) for config/train/NAME.toml.")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="tokenize dataset_sources into dataset_base_path/filename .bin + .idx")
    add_config_args(prepare, "train")
    args = parser.parse_args(argv)
    cfg = load_train_config(args.config_dir, args.train_cfg)
    if args.print_config:
        sys.stdout.write(dump_toml(cfg))
        return 0
    raise SystemExit("rwkv-data: prepare is not wired yet")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv, "rwkv-data")


if __name__ == "__main__":
    sys.exit(main())

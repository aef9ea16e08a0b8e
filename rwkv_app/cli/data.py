"""rwkv-data: turn raw text / JSONL / NumPy arrays into the binidx files a train config reads."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from rwkv_app.cli.common import add_config_args, make_parser, run_main, setup_logging
from rwkv_app.config import dump_toml, load_train_config
from rwkv_app.errors import UserError


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = make_parser("rwkv-data", "Prepare training data (binidx) for config/train/NAME.toml.")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="tokenize dataset_sources into dataset_base_path/filename .bin + .idx")
    add_config_args(prepare, "train")
    prepare.add_argument("--repeat", type=int, default=1, metavar="K",
                         help="write the corpus K times (each time reshuffled when shuffle_documents = true)")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    cfg = load_train_config(args.config_dir, args.train_cfg)
    if args.print_config:
        sys.stdout.write(dump_toml(cfg))
        return 0
    if args.repeat < 1:
        raise UserError(f"--repeat must be at least 1, got {args.repeat}")
    setup_logging(cfg.level)

    from rwkv_app.data.prepare import prepare_from_config

    summary = prepare_from_config(cfg, repeat=args.repeat, progress=not args.no_progress)
    print("\n".join(summary.lines()))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv, "rwkv-data")


if __name__ == "__main__":
    sys.exit(main())

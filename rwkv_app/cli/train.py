"""rwkv-train: train the model a config/train/NAME.toml describes."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from rwkv_app.cli.common import EXIT_INTERRUPTED, add_config_args, make_parser, run_main, setup_logging
from rwkv_app.config import dump_toml, load_train_config
from rwkv_app.errors import UserError


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = make_parser("rwkv-train", "Train an RWKV-7 model from config/train/NAME.toml.")
    add_config_args(parser, "train")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest training state (by step) in the run directory")
    parser.add_argument("--max-steps", type=int, metavar="N",
                        help="stop after N optimizer steps of the run (a checkpoint is saved; --resume continues)")
    parser.add_argument("--init-weights", metavar="PATH",
                        help="start from these weights (.safetensors or RWKV-LM .pth) instead of init_weights_path")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of the progress bar")
    # the deepspeed launcher appends --local_rank=N (the rank is read from LOCAL_RANK either way)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = load_train_config(args.config_dir, args.train_cfg)
    if args.print_config:
        sys.stdout.write(dump_toml(cfg))
        return 0
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {args.max_steps}")
    setup_logging(cfg.level)

    from rwkv_app.train.trainer import train

    result = train(cfg, resume=args.resume, max_steps=args.max_steps, init_weights=args.init_weights,
                   progress=False if args.no_progress else None)
    if result.interrupted:
        if result.main_process:
            print(f"rwkv-train: stopped at step {result.step}/{result.total_steps}; state saved in "
                  f"{result.run_dir / 'state'}; continue with --resume", file=sys.stderr)
        return 0 if args.max_steps is not None and result.step >= args.max_steps else EXIT_INTERRUPTED
    if result.main_process:
        print(f"rwkv-train: done, {result.step} steps, {result.tokens:,} tokens; weights: {result.weights}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv, "rwkv-train")


if __name__ == "__main__":
    sys.exit(main())

"""`python -m modeling_deepseek_v4 demo | card ...`; the `dsv4` console script parses in `dsv4_cli.py` (no heavy
imports for `--help`) and runs `run(args)` here."""

from __future__ import annotations

import sys

import torch


def run(args) -> int:
    """Run a parsed `dsv4` command (see `dsv4_cli.dsv4_parser`); returns the exit code."""
    # Tiny ops stall with 2 threads on small CPUs; the demo model is tiny.
    torch.set_num_threads(1)
    if args.command == "demo":
        from .demo import DemoFailure, run_demo

        try:
            run_demo(args.output_dir, args.new_tokens, args.seed)
        except DemoFailure:
            return 1
    elif args.command == "card":
        # model_cards builds on the modeling package; imported only here (pip-only CLI).
        from modeling_deepseek_v4.model_cards import write_model_card

        try:
            path = write_model_card(
                args.folder, args.output, license=args.license, base_model=args.base_model, datasets=args.datasets
            )
        except ValueError as exc:
            print(f"dsv4 card: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from dsv4_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

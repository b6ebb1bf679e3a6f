"""Command line of the pip package: `python -m modeling_deepseek_v4 demo` (also the `dsv4` console script)."""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 for Hugging Face transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build, save, reload and generate with a built-in tiny DeepSeek-V4")
    demo.add_argument("--output-dir", help="keep the saved model here (default: a temporary folder)")
    demo.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per prompt (default 16)")
    demo.add_argument("--seed", type=int, default=0)
    card = sub.add_parser("card", help="render README.md (a model card) for a model or adapter folder")
    card.add_argument("folder")
    card.add_argument("--output", help="where to write (default FOLDER/README.md)")
    card.add_argument("--license", help="license identifier for the card metadata (e.g. mit)")
    card.add_argument("--base-model", help="base model repo id (adapters and fine-tunes)")
    card.add_argument("--dataset", action="append", dest="datasets", help="training dataset id (repeatable)")
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())

"""The `deltakern` command (also `python -m deltakern`).

    deltakern demo                        # QLoRA fine-tuning of all-MiniLM-L6-v2 (the main job)
    deltakern demo --method dora          # qlora | lora | dora | qdora | bitfit | adapter | prefix | prompt
    deltakern demo --method quantize      # the NF4 quantization demo
    deltakern demo --save out/delta       # also save the trained delta and head
"""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from deltakern.demo import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_METHOD, METHODS

    methods = ", ".join(f"{m} ({desc}, lr {lr:g})" for m, (lr, desc) in METHODS.items())
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=[*METHODS, "quantize"], metavar="METHOD",
                        help=f"delta method to fine-tune with (default {DEFAULT_METHOD}): {methods}; or 'quantize' "
                             f"for the NF4 quantization demo")
    parser.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                        help=f"training epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--lr", type=_positive_float, default=None, help="AdamW learning rate (default: per method)")
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                        help=f"training batch size (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init, shuffling, dropout (default 0)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available, else cpu), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the encoder and its delta (default float32; the head stays float32)")
    parser.add_argument("--blocksize", type=_positive_int, default=64, help="NF4 blocksize (default 64)")
    parser.add_argument("--save", metavar="DIR", default=None,
                        help="save the trained delta (deltakern.save_delta) and the head into DIR")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the metrics as JSON to FILE")
    parser.add_argument("--cpu", action="store_true", help="same as --device cpu")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch intra-op CPU threads (default: torch's, usually one per core); pin it "
                             "for timings that others can reproduce")
    return parser


def build_parser() -> argparse.ArgumentParser:
    import deltakern

    parser = argparse.ArgumentParser(prog="deltakern", description="deltakern: fused GPU kernels for "
                                     "parameter-efficient fine-tuning")
    parser.add_argument("--version", action="version", version=f"deltakern {deltakern.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 with a delta method (QLoRA by default)",
                          description="Fine-tune the pretrained all-MiniLM-L6-v2 with a delta method on the "
                                      "support-intents texts shipped with deltakern, and print accuracy before "
                                      "and after, the trainable share, training time and peak memory. CPU runs "
                                      "the reference ops, CUDA the kernels.")
    add_demo_arguments(demo)
    return parser


def run_demo(args, parser: argparse.ArgumentParser) -> int:
    from deltakern import demo

    if args.cpu:
        args.device = "cpu"
    try:
        demo.resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"--device: {exc}")
    if args.method == "quantize":
        return demo.run_quantize(args)
    return demo.run_finetune(args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        demo_parser = parser._subparsers._group_actions[0].choices["demo"]
        return run_demo(args, demo_parser)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

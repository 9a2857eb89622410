"""The `lowbit` command. Exit codes: 0 success, 2 bad usage or bad input (one-line reason)."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """Train a small CNN on the bundled digits, quantize it to int8, show what it cost."""
    import torch

    from lowbit import demo, presets
    from lowbit.api import quantize
    from lowbit.evaluate import model_bytes

    torch.manual_seed(args.seed)
    data = demo.load_digits(args.seed)
    started = time.perf_counter()
    model = demo.train(demo.DigitsNet(), data)
    print(
        f"trained DigitsNet on {len(data.x_train)} digits in {time.perf_counter() - started:.1f} s"
    )
    started = time.perf_counter()
    qmodel = quantize(
        model, presets.int8(args.calibrator), demo.calibration_batches(data), progress=False
    )
    took = time.perf_counter() - started
    print(qmodel.lowbit_summary)
    rows = [("FP32", model), (f"INT8 ({args.calibrator})", qmodel)]
    print(f"\n{'model':<16} {'top-1 %':>8} {'weights KiB':>12}")
    for name, m in rows:
        acc = demo.accuracy(m, data.x_test, data.y_test)
        print(f"{name:<16} {acc:>8.2f} {model_bytes(m) / 1024:>12.1f}")
    print(f"\nquantization took {took:.2f} s; accuracy on {len(data.x_test)} held-out digits")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="quantize a CNN trained on the bundled digits")
    demo.add_argument(
        "--calibrator", default="minmax", choices=["minmax", "percentile", "entropy", "mse"]
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"lowbit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

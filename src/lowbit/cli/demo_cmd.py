"""`lowbit demo`: train the bundled digits CNN, quantize it to int8, show what it cost."""

from __future__ import annotations

import argparse
import time

from lowbit.calib import FROM_HISTOGRAM
from lowbit.cli import args as common


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `demo` subcommand."""
    demo = commands.add_parser("demo", help="quantize a CNN trained on the bundled digits")
    demo.add_argument("--calibrator", default="minmax", choices=FROM_HISTOGRAM)
    demo.add_argument("--seed", type=int, default=0)
    common.add_verbose(demo)
    demo.set_defaults(run=_demo, json=False)


def _demo(args: argparse.Namespace) -> int:
    """Train a small CNN on the bundled digits, quantize it to int8, show what it cost."""
    import torch

    from lowbit import presets
    from lowbit.cli import demo
    from lowbit.evaluate import model_bytes
    from lowbit.workflows.quantization import quantize

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

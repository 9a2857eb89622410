"""`lowbit quantize <hf-folder>`: a Hugging Face checkpoint quantized block by block
(`lowbit.quantize_pretrained`), with a progress bar per block and its ETA."""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.cli import args as common
from lowbit.cli.args import UsageError

METHODS = ("rtn", "gptq", "awq", "smoothquant")
FORMATS = ("compressed-tensors", "lowbit")


def add_options(p: argparse.ArgumentParser) -> None:
    """The options that apply when MODEL is a Hugging Face folder."""
    g = p.add_argument_group("Hugging Face folder (MODEL is a folder with config.json)")
    g.add_argument("--method", default="rtn", choices=METHODS, help="default: rtn")
    g.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="default: 4")
    g.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="inputs per weight scale; 0 for one scale per output channel (default: 128)",
    )
    g.add_argument("--calib-text", metavar="FILE", help="calibration text (UTF-8)")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default: 2048)")
    g.add_argument("--num-samples", type=int, help="calibration windows to use (default: all)")
    g.add_argument("--format", default="compressed-tensors", choices=FORMATS)
    g.add_argument(
        "--act-order",
        action="store_true",
        help="GPTQ: columns by decreasing Hessian diagonal, group scales fixed up front",
    )


def is_pretrained(model: str) -> bool:
    """Whether MODEL names a Hugging Face folder."""
    return Path(model).is_dir()


def run(args: argparse.Namespace) -> int:
    """Quantize the folder args.model into the folder args.output."""
    from lowbit.pretrained import quantize_pretrained

    calib = None
    if args.calib_text is not None:
        path = Path(args.calib_text)
        if not path.is_file():
            raise UsageError(f"--calib-text {args.calib_text}: no such file")
        calib = [path.read_text(encoding="utf-8")]
    if args.method != "rtn" and calib is None:
        raise UsageError(f"--method {args.method} needs calibration text: pass --calib-text FILE")
    if args.method == "smoothquant":
        args.bits, args.group_size = 8, 0
    record = quantize_pretrained(
        args.model,
        args.output,
        method=args.method,
        bits=args.bits,
        group_size=args.group_size or None,
        calib=calib,
        format=args.format,
        seq_len=args.seq_len,
        num_samples=args.num_samples,
        act_order=args.act_order,
        progress=not args.json,
    )
    if args.json:
        common.emit_json({"command": "quantize", "output": args.output, **record})
        return 0
    scheme = f"W{record['bits']}" + (f" g{record['group_size']}" if record["group_size"] else "")
    print(
        f"wrote {args.output} ({args.format}, {record['method']} {scheme}, "
        f"{record['num_blocks']} blocks) in {record['seconds']:.1f} s on "
        f"{record['calibration_batches']} calibration windows"
    )
    return 0

"""The `streamer` command: one sub-command per job, each with --help."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from streamer.errors import UserError

log = logging.getLogger("streamer")


def _export(args) -> int:
    from streamer.lipsync.export import export_onnx

    err = export_onnx(args.checkpoint, args.out, dtype=args.dtype, opset=args.opset, force=args.force)
    print(f"wrote {args.out} ({args.dtype}); max abs difference from torch fp32 on check inputs: {err:.2e}")
    return 0


def _bench(args) -> int:
    from streamer import bench

    if args.what == "audio":
        title, table = "Audio front end", bench.audio_table(bench.audio_rows())
    else:
        try:
            batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            raise UserError(f"--batches takes numbers separated by commas, not {args.batches!r}") from None
        title, table = "Wav2Lip engine", bench.engine_table(bench.engine_rows(args.model, batches, args.seconds))
    print(table)
    if args.record:
        bench.record(Path(args.record), title, table)
        print(f"recorded in {args.record}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamer", description="Real-time talking-head server: live lip-sync of an avatar to a voice.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("export", help="turn a Wav2Lip checkpoint (.pth) into an ONNX model",
                       description="Export a Wav2Lip checkpoint to ONNX (dynamic batch axis), then check the "
                                   "ONNX against torch and print the largest difference.")
    e.add_argument("--checkpoint", required=True, help="wav2lip.pth or wav2lip_gan.pth as released")
    e.add_argument("--out", required=True, help="ONNX file to write, e.g. models/wav2lip_fp16.onnx")
    e.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="weights and compute type (default fp16)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    e.add_argument("--force", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=_export)

    b = sub.add_parser("bench", help="measure inference speed on this machine",
                       description="engine: ms/frame and frames/s for every backend x dtype x batch available "
                                   "here. audio: CPU cost of resampling, streaming mel and voice activity.")
    b.add_argument("what", nargs="?", choices=("engine", "audio"), default="engine", help="what to measure")
    b.add_argument("--model", help=".pth or .onnx to measure (default: reference weights, same speed)")
    b.add_argument("--batches", default="1,4,16,64", help="comma-separated batch sizes (default 1,4,16,64)")
    b.add_argument("--seconds", type=float, default=2.0, help="time to spend per measurement (default 2)")
    b.add_argument("--record", metavar="FILE", help="append the table to FILE (e.g. BENCHMARKS.md)")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as e:
        print(f"streamer {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

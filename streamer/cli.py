"""The `streamer` command: one sub-command per job, each with --help."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from streamer.errors import UserError

log = logging.getLogger("streamer")


def _export(args) -> int:
    from streamer.lipsync.export import export_onnx

    err = export_onnx(args.checkpoint, args.out, dtype=args.dtype, opset=args.opset, force=args.force)
    print(f"wrote {args.out} ({args.dtype}); max abs difference from torch fp32 on check inputs: {err:.2e}")
    return 0


def auto_or_int(unit: str):
    """An argparse type: the word auto, or a whole number of `unit`."""

    def parse(text: str) -> int | str:
        if text == "auto":
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number of {unit}, or auto") from None

    return parse


def _bench(args) -> int:
    from streamer import bench

    if args.what == "audio":
        title, table = "Audio front end", bench.audio_table(bench.audio_rows())
    elif args.what == "live":
        if args.pause_first < 0:
            raise UserError("--pause-first must be 0 or more seconds")
        title, table = "Live session", bench.kv_table(bench.live_rows(args.model, args.live_seconds, args.delay_ms,
                                                                    args.sessions or 1, args.viewers, args.voice,
                                                                    args.pause_first, args.workers,
                                                                    args.client_processes, args.max_batch,
                                                                    not args.no_decode, args.video_avatar,
                                                                    args.client_cores))
    elif args.what == "soak":
        from streamer.soak import soak_rows

        if args.soak_minutes <= 0:
            raise UserError("--soak-minutes must be more than 0")
        title, table = "Soak", bench.kv_table(soak_rows(60 * args.soak_minutes, args.sessions or 4, args.churn,
                                                        args.half_open, args.model, args.workers))
    elif args.what == "sharpness":
        title, table = "Close-up sharpness", bench.kv_table(bench.sharpness_rows())
    elif args.what == "audio-pe":
        from streamer.lipsync.musetalk import is_musetalk

        if not is_musetalk(args.model):
            raise UserError("bench audio-pe needs --model musetalk:DIR")
        title, table = "MuseTalk audio_pe on vs off", bench.kv_table(bench.audio_pe_rows(args.model, args.voice))
    elif args.what == "avatar":
        title, table = "Avatar cache and blending", bench.kv_table(bench.avatar_rows(args.avatar_seconds))
    else:
        try:
            batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            raise UserError(f"--batches takes numbers separated by commas, not {args.batches!r}") from None
        from streamer.lipsync.musetalk import is_musetalk

        if is_musetalk(args.model):
            title, table = "MuseTalk engine", bench.musetalk_table(bench.musetalk_rows(args.model, batches,
                                                                                     args.seconds, only=args.device))
        else:
            title, table = "Wav2Lip engine", bench.engine_table(bench.engine_rows(args.model, batches, args.seconds,
                                                                                only=args.device))
    print(table)
    if args.record:
        bench.record(Path(args.record), title, table)
        print(f"recorded in {args.record}")
    return 0


def _config(args, **flags):
    from streamer.config import load_config

    return load_config(args.config, flags)


def _avatar(cfg, name):
    from streamer.avatar.cache import DEMO_NAME, Avatar, avatar_dir, demo_avatar, keep_frames

    if name == DEMO_NAME and not (avatar_dir(cfg.avatar.dir, name) / "meta.json").exists():
        log.info("preparing the demo avatar (once)")
        return demo_avatar(cfg.avatar.dir)
    return keep_frames(Avatar.load(cfg.avatar.dir, name), cfg.avatar.raw_frames_mb)  # one prepared before it


def _use_avatar(engine, avatar, progress: bool) -> None:
    """An engine that keeps something per avatar crop (MuseTalk's latents) reads or computes it now."""
    if hasattr(engine, "use_avatar"):
        engine.use_avatar(avatar, progress)


def _prepare(args) -> int:
    from streamer.avatar.cache import IMAGE_SUFFIXES, PrepareSettings, prepare

    if args.image and Path(args.image).suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--image takes a photo ({', '.join(sorted(IMAGE_SUFFIXES))}); for {args.image} use --video")

    cfg = _config(args, **{"avatar.dir": args.avatars, "avatar.max_height": args.max_height, "model.path": args.model,
                           "model.device": args.device, "model.dtype": args.dtype})
    engine = None
    face_size = cfg.avatar.face_size
    if args.model is not None:  # crops at the model's size, and what it keeps per crop
        from streamer.lipsync.engine import load_engine

        # prepare runs no audio: MuseTalk's whisper encoder stays on disk
        engine = load_engine(cfg.model.path, cfg.model.device, cfg.model.dtype, musetalk=cfg.musetalk, audio=False)
        face_size = engine.face_size
    settings = PrepareSettings(face_size=face_size, max_height=cfg.avatar.max_height,
                               raw_frames_mb=cfg.avatar.raw_frames_mb)
    avatar = prepare(args.video or args.image, args.name, cfg.avatar.dir, settings, force=args.force,
                     progress=not args.quiet)
    _use_avatar(engine, avatar, not args.quiet)
    w, h = avatar.size
    print(f"avatar {avatar.name}: {avatar.frames} frames {w}x{h} at {avatar.fps:g} fps in {avatar.path}")
    return 0


def _render(args) -> int:
    from streamer import outfile
    from streamer.lipsync.engine import load_engine, resolve_model
    from streamer.render import OUT_SUFFIXES, read_audio, render

    cfg = _config(args, **{"avatar.dir": args.avatars, "avatar.name": args.avatar, "model.path": args.model,
                           "model.device": args.device, "model.dtype": args.dtype,
                           "render.batch_size": args.batch_size, "musetalk.audio_pe": args.audio_pe})
    # what the user gave is checked before anything slow or lasting (a model loaded, the demo avatar made)
    outfile.check(args.out, args.force, OUT_SUFFIXES)
    audio = read_audio(args.audio)
    if cfg.model.path is not None:
        resolve_model(cfg.model.path)
    avatar = _avatar(cfg, cfg.avatar.name)
    engine = load_engine(cfg.model.path, cfg.model.device, cfg.model.dtype, mouth=avatar.mouth_in_crop(),
                         musetalk=cfg.musetalk)
    _use_avatar(engine, avatar, not args.quiet)
    log.info("engine: %s", engine.name)
    summary = render(avatar, audio, args.out, engine, batch_size=cfg.render.batch_size,
                     vad=cfg.audio.voice_activity(25), force=args.force, progress=not args.quiet, crf=cfg.render.crf,
                     fade=cfg.live.fade_frames)
    print(f"wrote {args.out}: {summary['frames']} frames at {summary['fps']:g} fps, {summary['seconds']:.2f} s, "
          f"mouth animated in {summary['speech_frames']} frames")
    return 0


def _tell_front(port: int) -> None:
    """A process started by the front writes where it listens (0: ready, no port) into its port file."""
    tmp = os.environ["STREAMER_PORT_FILE"] + ".tmp"
    Path(tmp).write_text(str(port))
    os.replace(tmp, os.environ["STREAMER_PORT_FILE"])


def _serve_inference(cfg, path: str) -> int:
    """The inference service of a multi-process server: the one model copy, until SIGTERM."""
    import signal
    import threading

    from streamer.lipsync.engine import load_engine
    from streamer.live.service import run_service

    avatar = _avatar(cfg, cfg.avatar.name)
    if cfg.model.path is not None:
        # the media workers make the audio windows: no whisper encoder here
        engine = load_engine(cfg.model.path, cfg.model.device, cfg.model.dtype, musetalk=cfg.musetalk, audio=False)
        _use_avatar(engine, avatar, False)
    else:
        engine = load_engine(None, mouth=avatar.mouth_in_crop())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_service(engine, path, bytes.fromhex(os.environ["STREAMER_INFERENCE_KEY"]), cfg.live.max_batch, stop,
                on_ready=lambda: _tell_front(0))
    return 0


def _check_delay(cfg) -> None:
    """A fixed delay below the model's floor is refused at start, not raised by every channel."""
    import math

    from streamer.lipsync.engine import model_lookahead_s
    from streamer.live.channel import FPS, cut_lookahead, packet_floor

    delay = cfg.live.delay_ms
    if delay == "auto":
        return
    lookahead = cut_lookahead(cfg.audio.voice_activity(FPS), cfg.live.fade_frames,
                              model_lookahead_s(cfg.model.path, cfg.musetalk))
    floor = math.ceil(1000 * packet_floor(lookahead) - 1e-6)
    if delay < floor:
        raise UserError(f"a delay of {delay} ms is below this model's floor of {floor} ms (its audio lookahead and "
                        "the voice activity settings): use at least that, and more for inference, or auto")


def _serve(args) -> int:
    import asyncio
    import signal

    from aiohttp import web

    from streamer.lipsync.engine import load_engine
    from streamer.server.app import Server, open_line, warn_if_open
    from streamer.server.guard import ConnectionGuard

    cfg = _config(args, **{"avatar.dir": args.avatars, "avatar.name": args.avatar, "model.path": args.model,
                           "model.device": args.device, "model.dtype": args.dtype, "server.host": args.host,
                           "server.port": args.port, "live.delay_ms": args.delay_ms,
                           "server.max_sessions": args.max_sessions, "server.workers": args.workers,
                           "live.max_batch": args.max_batch, "musetalk.audio_pe": args.audio_pe})
    _check_delay(cfg)
    workers = cfg.server.workers
    if workers == "auto":
        from streamer.server.front import workers_for

        workers = workers_for(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if workers > 1:  # this process is the front: the workers load the model, after a quick check here
        from streamer.lipsync.engine import resolve_model
        from streamer.server.front import serve_front

        if cfg.model.path is not None:
            resolve_model(cfg.model.path)
        avatar = _avatar(cfg, cfg.avatar.name)  # prepared once here, not by every worker at once
        from streamer.lipsync.musetalk import ensure_latents, is_musetalk

        if is_musetalk(cfg.model.path):  # its latents too: the service has a start deadline
            ensure_latents(resolve_model(cfg.model.path), avatar, cfg.model.device, cfg.model.dtype)
        asyncio.run(serve_front(cfg, workers))
        return 0
    service = os.environ.get("STREAMER_INFERENCE")  # the socket of a multi-process server's inference service
    if os.environ.get("STREAMER_ROLE") == "inference":
        return _serve_inference(cfg, service)
    remote = None
    if service:  # a media worker: inference is the service's
        import cv2

        from streamer.live.service import RemoteWorker

        cv2.setNumThreads(1)  # one event loop's worth of work: a pool as large as the machine only spins

        from streamer.lipsync.engine import load_features
        from streamer.lipsync.musetalk import is_musetalk

        if is_musetalk(cfg.model.path):  # its whisper on a CPU: workers' torch pools spinning against each
            import torch  # other made a block's encode ~1 s instead of 30 ms in 2 of 6 starts

            torch.set_num_threads(1)

        remote = RemoteWorker(service, bytes.fromhex(os.environ["STREAMER_INFERENCE_KEY"]))
        engine = remote.engine
        engine.features = load_features(cfg.model.path, cfg.model.device, cfg.model.dtype, musetalk=cfg.musetalk)
    elif cfg.model.path is not None:  # a missing or bad model fails before any avatar work
        engine = load_engine(cfg.model.path, cfg.model.device, cfg.model.dtype, musetalk=cfg.musetalk)
    avatar = _avatar(cfg, cfg.avatar.name)
    if cfg.model.path is None and remote is None:
        engine = load_engine(None, mouth=avatar.mouth_in_crop())
    elif remote is None:
        _use_avatar(engine, avatar, not args.quiet)
    log.info("engine: %s; avatar: %s (%d frames, %dx%d)", engine.name, avatar.name, avatar.frames, *avatar.size)
    if remote is None:  # one process serving (as a media worker, above): OpenCV's calls are per frame, on the
        import cv2  # event loop, too small to share; a second thread made 4 talkers cost 21% of a core each, not 18%

        cv2.setNumThreads(1)
    host, port = cfg.server.host, cfg.server.port

    async def run() -> None:
        runner = web.AppRunner(Server(cfg, engine, avatar, worker=remote).app(), access_log=None, shutdown_timeout=5)
        await runner.setup()
        ConnectionGuard.install(runner, cfg.server.max_connections_per_client, cfg.server.header_timeout_s)
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
        bound = site._server.sockets[0].getsockname()[1]  # --port 0: the one the system gave
        if os.environ.get("STREAMER_PORT_FILE"):  # a media worker tells its front where it listens
            _tell_front(bound)
        else:
            warn_if_open(host, cfg.server.token)
            print(open_line(host, bound, cfg.server.token), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: closing every session")
        await runner.cleanup()

    asyncio.run(run())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamer", description="Real-time talking-head server: live lip-sync of an avatar to a voice.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="settings file (default: built-in defaults, as configs/default.yaml)")
    common.add_argument("--avatars", help="folder of prepared avatars (setting avatar.dir, default avatars/)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    sv = sub.add_parser("serve", parents=[common], help="serve the live avatar: open the page, talk, watch it lip-sync",
                        description="Serve web/ and WebRTC sessions: the browser sends your voice, the server "
                                    "returns the avatar lip-synced to it at 25 fps with your voice delayed to match.")
    sv.add_argument("--model", help="Wav2Lip .onnx/.pth (a path or a name in models/), or musetalk:DIR, a MuseTalk "
                                    "v1.5 folder in the released layout (default: builtin engine)")
    sv.add_argument("--audio-pe", choices=("on", "off"),
                    help="MuseTalk: add the released inference's positional encoding to its audio features "
                         "(default on; off: as trained)")
    sv.add_argument("--avatar", help="prepared avatar name (default astronaut, the demo)")
    sv.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, help="HTTP port (default 8080; 0: any free one, printed)")
    sv.add_argument("--workers", type=auto_or_int("processes"), metavar="N",
                    help="media worker processes (default auto: one per two cores; 1: one process)")
    sv.add_argument("--device", choices=("auto", "cuda", "cpu"), help="where inference runs (default auto)")
    sv.add_argument("--dtype", choices=("auto", "fp16", "fp32"), help="inference precision (default auto)")
    sv.add_argument("--delay-ms", type=auto_or_int("milliseconds"),
                    help="voice-in to lips-out delay in ms, or auto (default: auto, what the mouths were measured "
                         "to need, lookahead included (99th percentile), + 10 ms)")
    sv.add_argument("--max-sessions", type=int, help="voices at once, more get 503 (default 4)")
    sv.add_argument("--max-batch", type=int, metavar="N", help="most frames in one inference call, across all "
                                                               "sessions (default 8; more for many talkers on a GPU)")
    sv.set_defaults(func=_serve)
    pr = sub.add_parser("prepare", parents=[common], help="turn a video or photo into an avatar (done once)",
                        description="Detect the face in every frame and cache what the live path needs under "
                                    "the avatars folder. The same source again is reused; a changed one rebuilt.")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="a video of a person facing the camera (any format PyAV reads)")
    src.add_argument("--image", help="a photo: becomes a still avatar")
    pr.add_argument("--name", required=True, help="avatar name: letters, digits, '-' and '_'")
    pr.add_argument("--max-height", type=int, help="scale taller sources down to this (default 1080)")
    pr.add_argument("--model", help="prepare for this model: face crops at its size and, for musetalk:DIR, the "
                                    "latents of every crop, so serve and render start at full speed")
    pr.add_argument("--device", choices=("auto", "cuda", "cpu"), help="where --model runs (default auto)")
    pr.add_argument("--dtype", choices=("auto", "fp16", "fp32"), help="--model's precision (default auto)")
    pr.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    pr.set_defaults(func=_prepare)

    r = sub.add_parser("render", parents=[common], help="turn an audio file into a lip-synced mp4",
                       description="Lip-sync an avatar to an audio file (any format PyAV reads) and write an "
                                   "H.264 + AAC mp4 as long as the audio, at 25 fps (a video avatar's frames picked by "
                                   "time). The output appears only when complete.")
    r.add_argument("--audio", required=True, help="speech to lip-sync: wav, mp3, m4a, ogg, ...")
    r.add_argument("--out", required=True, help="mp4 to write")
    r.add_argument("--avatar", help="prepared avatar name (default astronaut, the demo, prepared on first use)")
    r.add_argument("--model", help="Wav2Lip .onnx/.pth (a path or a name in models/), or musetalk:DIR, a MuseTalk "
                                   "v1.5 folder in the released layout (default: builtin engine)")
    r.add_argument("--audio-pe", choices=("on", "off"),
                   help="MuseTalk: add the released inference's positional encoding to its audio features "
                        "(default on; off: as trained)")
    r.add_argument("--device", choices=("auto", "cuda", "cpu"), help="where inference runs (default auto)")
    r.add_argument("--dtype", choices=("auto", "fp16", "fp32"), help="inference precision (default auto)")
    r.add_argument("--batch-size", type=int, help="frames per inference call (default 16)")
    r.add_argument("--force", action="store_true", help="replace OUT if it exists")
    r.set_defaults(func=_render)

    e = sub.add_parser("export", help="turn a Wav2Lip checkpoint (.pth) into an ONNX model",
                       description="Export a Wav2Lip checkpoint to ONNX (dynamic batch axis), then check the "
                                   "ONNX against torch and print the largest difference.")
    e.add_argument("--checkpoint", required=True, help="wav2lip.pth or wav2lip_gan.pth as released")
    e.add_argument("--out", required=True, help="ONNX file to write, e.g. models/wav2lip_fp16.onnx")
    e.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="weights and compute type (default fp16)")
    e.add_argument("--opset", type=int, default=18,
                   help="ONNX opset (default 18, torch's own; another is converted to where onnx can: 17 and newer)")
    e.add_argument("--force", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=_export)

    b = sub.add_parser("bench", help="measure this machine: inference, live sessions, soak and more",
                       description="engine: ms/frame and frames/s for every backend x dtype x batch available here. "
                                   "audio: CPU cost of resampling, streaming mel and voice activity. avatar: preparing "
                                   "and loading a long 1080p avatar (time, disk, RAM), blending. live: a real talk "
                                   "session on this machine: fps, voice-in to lips-out delay, late frames. soak: "
                                   "talkers for --soak-minutes with a viewer coming and going, connect/disconnect "
                                   "churn and offers that never connect: memory, threads, files and gauges before and "
                                   "after, fps and delay first and last minute. sharpness: how much of a 1080p "
                                   "close-up's fine detail a render keeps around the mouth (builtin engine). audio-pe: "
                                   "MuseTalk's mouths for --voice with its audio positional encoding on and off, and "
                                   "how much they differ.")
    b.add_argument("what", nargs="?", choices=("engine", "audio", "avatar", "live", "soak", "sharpness", "audio-pe"),
                   default="engine",
                   help="what to measure (default engine)")
    b.add_argument("--avatar-seconds", type=float, default=60, help="length of the 1080p avatar (default 60)")
    b.add_argument("--live-seconds", type=float, default=30, help="length of the live session (default 30)")
    b.add_argument("--delay-ms", type=auto_or_int("milliseconds"),
                   help="live target delay in ms, or auto (default from the config: auto)")
    b.add_argument("--sessions", type=int, help="live: concurrent talkers (default 1); soak: talkers (default 4)")
    b.add_argument("--soak-minutes", type=float, default=60, help="soak: how long (default 60)")
    b.add_argument("--churn", type=int, default=200, help="soak: connect/disconnect cycles (default 200)")
    b.add_argument("--half-open", type=int, default=50, help="soak: offers that never connect (default 50)")
    b.add_argument("--viewers", type=int, default=0, help="live: WHEP viewers of the first talker's channel")
    b.add_argument("--voice", metavar="AUDIO", help="live and audio-pe: what is said, any audio file (default: "
                                                    "espeak-ng speech)")
    b.add_argument("--workers", type=auto_or_int("processes"), metavar="N",
                   help="live: the server's media worker processes (default: serve's own default, auto)")
    b.add_argument("--client-processes", type=int, metavar="K",
                   help="live: processes the clients run in (default: one per two cores, at most 8)")
    b.add_argument("--client-cores", type=int, default=0, metavar="K",
                   help="live: run the clients on the last K usable cores and the server (all its processes) on "
                        "the others, so that neither takes the other's cores: the server's capacity on the rest "
                        "(default 0: both share every core)")
    b.add_argument("--max-batch", type=int, metavar="N", help="live: the server's --max-batch (default: its own)")
    b.add_argument("--no-decode", action="store_true",
                   help="live: clients count the video frames they receive without decoding them, so that many "
                        "sessions on one box measure the server, not the clients (voice still decoded)")
    b.add_argument("--video-avatar", type=float, default=0, metavar="S",
                   help="live: serve a 512x512 video avatar of S seconds (made here), not the demo photo")
    b.add_argument("--pause-first", type=float, default=1.0, metavar="S",
                   help="live: seconds of silence before the voice (default 1; 0 talks at once)")
    b.add_argument("--model", help=".pth or .onnx, or musetalk:DIR, to measure (engine default: reference weights, "
                                   "same speed; live default: builtin engine; audio-pe: a musetalk:DIR is needed)")
    b.add_argument("--device", choices=("cuda", "cpu"), help="engine: only this device (default: every one here)")
    b.add_argument("--batches", default="1,4,16,64", help="comma-separated batch sizes (default 1,4,16,64)")
    b.add_argument("--seconds", type=float, default=2.0, help="time to spend per measurement (default 2)")
    b.add_argument("--record", metavar="FILE", help="append the table to FILE (e.g. BENCHMARKS.md)")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    worker = os.environ.get("STREAMER_WORKER")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s " + (f"[worker {worker}] " if worker else "")
                               + "%(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as e:
        if not getattr(e, "reported", False):  # (a process it started has said it already)
            print(f"streamer {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""What a talker's per-packet and per-frame work costs on this machine, one call at a time.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENCV_FOR_THREADS_NUM=1 python scripts/stage-costs.py

(the one-thread pools are how BENCHMARKS.md compared machines: a talker's stages each run on one thread)

Prints wall and process CPU time per call (CPU above wall means other threads of the process ran
meanwhile, e.g. a math library's pool spinning) and the process's thread count. Run it on two
machines to compare their cores for this work (BENCHMARKS.md: the H100 box against the CPU box).
"""

from __future__ import annotations

import itertools
import os
import time
from fractions import Fraction

import cv2
import numpy as np

from streamer.audio.resample import StreamResampler
from streamer.avatar.cache import DEMO_IMAGE
from streamer.live.tracks import OpusPackets, encoder_frame
from streamer.live.vp8 import open_encoder


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def run(name: str, fn, n: int) -> None:
    fn()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    w, c = (time.perf_counter() - w0) / n, (time.process_time() - c0) / n
    print(f"{name:28s} wall {1e6 * w:8.1f} us  cpu {1e6 * c:8.1f} us  threads {threads()}", flush=True)


def python_loop() -> dict:
    d: dict[int, int] = {}
    for i in range(2000):
        d[i % 97] = d.get(i % 97, 0) + i
    return d


def main() -> None:
    run("python dict loop (2000)", python_loop, 2000)
    img = cv2.resize(cv2.imread(str(DEMO_IMAGE)), (512, 512))
    frames = []
    for k in range(50):  # a mouth region that changes, as a talking avatar's
        f = img.copy()
        f[300:380, 200:312] = np.clip(f[300:380, 200:312].astype(int) + 7 * (k % 5), 0, 255).astype(np.uint8)
        frames.append(f)
    count = itertools.count()
    run("BGR->I420 encoder_frame", lambda: encoder_frame(frames[next(count) % 50]), 500)
    yuv = [encoder_frame(f) for f in frames]
    encoder = open_encoder(512, 512, 1_000_000)

    def vp8() -> None:
        i = next(count)
        frame = yuv[i % 50]
        frame.pts, frame.time_base = i * 3600, Fraction(1, 90000)  # as live: without a time base the encoder
        encoder.encode(frame)  # thinks it has next to no bitrate a frame and spends far less time

    run("VP8 encode 512x512", vp8, 500)
    opus, pcm = OpusPackets(), (np.sin(np.arange(960) / 7) * 8000).astype(np.int16)
    run("Opus encode 20 ms", lambda: opus.encode(pcm, 960 * next(count)), 1000)
    resampler = StreamResampler(48000)
    packet = np.random.default_rng(1).standard_normal(960).astype(np.float32)
    run("resample 48->16k, 20 ms", lambda: resampler.push(packet), 2000)
    a = np.random.default_rng(2).standard_normal((80, 201)).astype(np.float32)
    b = np.random.default_rng(3).standard_normal((201, 16)).astype(np.float32)
    run("numpy 80x201 @ 201x16", lambda: a @ b, 5000)
    print(f"cores: os.cpu_count {os.cpu_count()}, usable {len(os.sched_getaffinity(0))}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""CPU a received voice packet costs decoded on aiortc's decoder thread (a thread hop, a task made on
the loop, a wake-up of it) against decoded at once on the event loop (`streamer/live/wire.py`).

    python scripts/voice-decode-hop.py

Real Opus packets of a tone, 2000 of each, the loop turning once between packets.
"""
import asyncio, queue, threading, time, av, numpy as np
from fractions import Fraction
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.rtcrtpreceiver import decoder_worker
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from streamer.live.tracks import OpusPackets
enc=OpusPackets()
t=np.arange(960*500)/48000
pcm=(np.sin(2*np.pi*220*t)*8000*(1+np.sin(t*3))/2).astype(np.int16)
pk=[bytes(enc.encode(pcm[i*960:(i+1)*960], i*960)) for i in range(500)]
codec=RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
N=2000
async def thread_path():
    loop=asyncio.get_running_loop(); q=queue.Queue(); out=asyncio.Queue(); ev=threading.Event()
    th=threading.Thread(target=decoder_worker, args=(loop,q,out,ev)); th.start()
    c0=time.process_time(); w0=time.perf_counter()
    for i in range(N):
        q.put((codec, JitterFrame(data=pk[i%500], timestamp=i*960)))
        f=await out.get()
        await asyncio.sleep(0.0)  # the loop does other things between packets
    c=time.process_time()-c0; w=time.perf_counter()-w0
    q.put(None); await out.get(); th.join()
    return c/N*1e6, w/N*1e6
async def inline_path():
    out=asyncio.Queue(); dec=OpusDecoder()
    c0=time.process_time(); w0=time.perf_counter()
    for i in range(N):
        for f in dec.decode(JitterFrame(data=pk[i%500], timestamp=i*960)): out.put_nowait(f)
        f=await out.get()
        await asyncio.sleep(0.0)
    c=time.process_time()-c0; w=time.perf_counter()-w0
    return c/N*1e6, w/N*1e6
for _ in range(3):
    print("thread hop: cpu %.1f us wall %.1f us" % asyncio.run(thread_path()))
    print("inline    : cpu %.1f us wall %.1f us" % asyncio.run(inline_path()))

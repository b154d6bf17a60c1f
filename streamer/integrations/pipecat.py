"""Pipecat: a frame processor that gives a voice agent streamer's face.

Put `StreamerAvatar` after the TTS service. It sends the agent's speech (`TTSAudioRawFrame`) to a
streamer channel over the WebSocket audio API, ends an utterance at `TTSStoppedFrame`, and on an
`InterruptionFrame` (the user barged in) stops the avatar's mouth and voice at once. People watch and
hear the agent on the channel (talk page, WHEP, OBS page): the voice comes from there, delayed to
match the lips, so by default the TTS audio does not go on down the pipeline (`forward_audio=True`
passes it on too).

    pipeline = Pipeline([transport.input(), stt, context_aggregator.user(), llm, tts,
                         StreamerAvatar("http://127.0.0.1:8080", channel="agent"), ...])

Install with `pip install "streamer[pipecat]"` (Pipecat itself brings the CPU onnxruntime: on a GPU
server run the agent in its own environment; it only talks to the server over the network).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from streamer.audio import StreamResampler
from streamer.client import Speaker, SpeakerError
from streamer.live.pushed import RATES

log = logging.getLogger(__name__)

RETRY_S = 5.0  # after a failed connection
END_WAIT_S = 15.0  # at the pipeline's end, the last utterance may play this long


class StreamerAvatar(FrameProcessor):
    def __init__(self, url: str, channel: str = "default", token: str | None = None, forward_audio: bool = False,
                 on_event=None, **kwargs):
        """url: the streamer server (http://host:port); channel: the one to drive (one voice per channel);
        on_event: called with each server event (playback_started, playback_finished, ...)."""
        super().__init__(**kwargs)
        self.url, self.channel, self.token = url, channel, token
        self.forward_audio = forward_audio
        self.on_event = on_event
        self._speaker: Speaker | None = None
        self._rate: int | None = None
        self._resampler: StreamResampler | None = None
        self._events: asyncio.Task | None = None
        self._speaking = False
        self._retry_at = 0.0  # after a failed connection, frames are dropped until then

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            await self._send(frame)
            if self.forward_audio:
                await self.push_frame(frame, direction)
            return
        if isinstance(frame, TTSStoppedFrame) and self._speaker is not None and self._speaking:
            self._speaking = False
            await self._tell(self._speaker.end)
        elif isinstance(frame, InterruptionFrame) and self._speaker is not None:
            self._speaking = False
            await self._tell(self._speaker.clear)
        elif isinstance(frame, EndFrame):  # let the last words play out (bounded), then leave
            if self._speaker is not None:
                if self._speaking:
                    self._speaking = False
                    await self._tell(self._speaker.end)
                try:  # (the speaker's own count: an utterance cut off before its first byte is none)
                    await asyncio.wait_for(self._speaker.idle.wait(), END_WAIT_S)
                except asyncio.TimeoutError:
                    pass
            await self._close()
        elif isinstance(frame, CancelFrame):
            await self._close()
        elif isinstance(frame, StartFrame):
            pass
        await self.push_frame(frame, direction)

    async def _send(self, frame: TTSAudioRawFrame) -> None:
        pcm = np.frombuffer(frame.audio, np.int16)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        if self._speaker is None:
            if time.monotonic() < self._retry_at:
                return
            # the socket's rate is the TTS's when the server takes it, else 48 kHz
            self._rate = frame.sample_rate if frame.sample_rate in RATES else 48000
            try:
                self._speaker = await Speaker.connect(self.url, self.channel, self._rate, self.token)
            except (SpeakerError, OSError, asyncio.TimeoutError) as e:
                self._retry_at = time.monotonic() + RETRY_S  # not a handshake per audio frame
                await self.push_error(f"streamer: cannot drive channel {self.channel} "
                                      f"(retrying in {RETRY_S:.0f} s): {e}")
                return
            self._events = self.create_task(self._read_events())
        if frame.sample_rate != self._rate:
            if self._resampler is None or self._resampler.rate != frame.sample_rate:
                self._resampler = StreamResampler(frame.sample_rate, target=self._rate)
            pcm = self._resampler.push(pcm.astype(np.float32) / 32768)
        self._speaking = True
        speaker = self._speaker
        try:
            await speaker.send(pcm)
        except (ConnectionError, RuntimeError, OSError) as e:  # the server went away: connect again later
            if self._speaker is not speaker:  # reset meanwhile (the server ended the session): the next audio connects
                return
            await self.push_error(f"streamer: channel {self.channel} lost: {e}")
            await self._close()
            self._retry_at = time.monotonic() + RETRY_S

    async def _read_events(self) -> None:
        try:
            while True:
                ev = await self._speaker.event()
                if self.on_event is not None:
                    self.on_event(ev)
        except SpeakerError as e:  # the server ended the session (or restarted): connect at the next audio
            log.info("streamer channel %s: %s", self.channel, e)
            speaker, self._speaker, self._events = self._speaker, None, None
            self._speaking = False
            await speaker.close()

    async def _tell(self, command: Callable[[], Awaitable[None]]) -> None:
        """The speaker's end or clear; a connection lost meanwhile is dropped, the frame goes on."""
        try:
            await command()
        except (ConnectionError, RuntimeError, OSError) as e:
            log.info("streamer channel %s lost: %s", self.channel, e)
            await self._close()

    async def _close(self) -> None:
        if self._events is not None:
            await self.cancel_task(self._events)
            self._events = None
        if self._speaker is not None:
            await self._speaker.close()
            self._speaker = None
        self._speaking = False

    async def cleanup(self):
        await super().cleanup()
        await self._close()

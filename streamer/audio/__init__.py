"""Audio front end: Wav2Lip-exact mel features (offline and streaming), resampling, voice activity.

numpy and scipy only, no asyncio: the live server and the offline renderer both build on this.
"""

from streamer.audio.mel import LOOKAHEAD_S, MelStream, mel_windows, melspectrogram
from streamer.audio.resample import StreamResampler, resample, to_mono_float
from streamer.audio.vad import VoiceActivity

__all__ = ["LOOKAHEAD_S", "MelStream", "StreamResampler", "VoiceActivity", "mel_windows", "melspectrogram",
           "resample", "to_mono_float"]

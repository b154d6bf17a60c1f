import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from streamer.audio import (
    LOOKAHEAD_S,
    MelStream,
    StreamResampler,
    VoiceActivity,
    mel_windows,
    melspectrogram,
    resample,
    to_mono_float,
)
from streamer.audio.mel import LOOKAHEAD_SAMPLES, window_start
from streamer.mouth import speech_strength
from tests.conftest import DATA


def stream_windows(wav, chunk_sizes, fps=25):
    stream = MelStream(fps)
    out = []
    i = 0
    k = 0
    while i < len(wav):
        n = chunk_sizes[k % len(chunk_sizes)]
        out += stream.push(wav[i : i + n])
        i += n
        k += 1
    out += stream.flush()
    assert [idx for idx, _ in out] == list(range(len(out)))
    return np.stack([w for _, w in out]) if out else np.zeros((0, 80, 16), np.float32)


def original_chain(wav):
    """The original Wav2Lip features computed by librosa itself (reflect padding, as librosa 0.7)."""
    librosa = pytest.importorskip("librosa")
    y = np.append(wav[0], wav[1:] - 0.97 * wav[:-1])
    spec = np.abs(librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, center=True, pad_mode="reflect"))
    mel = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ spec
    db = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


@pytest.fixture(scope="module")
def mel_golden():
    return dict(np.load(DATA / "mel_golden.npz"))


def test_golden_mel_and_windows(mel_golden):
    mel = melspectrogram(mel_golden["wav"])
    assert mel.shape == mel_golden["mel"].shape and mel.dtype == np.float32
    assert np.abs(mel - mel_golden["mel"]).max() < 1e-4
    windows = mel_windows(mel)
    assert windows.shape == mel_golden["chunks"].shape
    assert np.abs(windows - mel_golden["chunks"]).max() < 1e-4


def test_streaming_20ms_equals_golden(mel_golden):
    assert np.abs(stream_windows(mel_golden["wav"], [320]) - mel_golden["chunks"]).max() < 1e-4


@settings(max_examples=60, deadline=None)
@given(length=st.integers(0, 24000), chunks=st.lists(st.integers(1, 5000), min_size=1, max_size=8),
       seed=st.integers(0, 2**16), fps=st.sampled_from([25, 30]))
def test_streaming_equals_offline_for_any_chunking(length, chunks, seed, fps):
    wav = (np.random.default_rng(seed).standard_normal(length) * 0.1).astype(np.float32)
    offline = mel_windows(melspectrogram(wav), fps)
    streamed = stream_windows(wav, chunks, fps)
    assert streamed.shape == offline.shape
    if len(offline):
        assert np.abs(streamed - offline).max() < 1e-4


def test_unseen_speech_matches_the_original_chain(speech16k):
    for wav in speech16k:
        reference = mel_windows(original_chain(wav))
        offline = mel_windows(melspectrogram(wav))
        streamed = stream_windows(wav, [320])
        assert offline.shape == reference.shape == streamed.shape
        assert np.abs(offline - reference).max() < 1e-4
        assert np.abs(streamed - reference).max() < 1e-4


def test_each_window_comes_out_as_soon_as_its_audio_arrived(speech16k):
    wav = speech16k[0]
    stream = MelStream()
    seen = 0
    for i in range(0, len(wav), 160):
        for idx, _ in stream.push(wav[i : i + 160]):
            needed = 200 * (window_start(idx, 25) + 15) + 400
            assert needed <= stream.samples < needed + 160  # not before, and not a chunk later
            assert stream.samples - 640 * idx <= LOOKAHEAD_SAMPLES + 160
            seen += 1
    assert seen > 0 and abs(LOOKAHEAD_S - 0.2125) < 1e-9


def test_streaming_memory_stays_bounded():
    stream = MelStream()
    rng = np.random.default_rng(0)
    for _ in range(3000):  # 60 s in 20 ms pushes
        stream.push(rng.standard_normal(320).astype(np.float32) * 0.1)
        assert stream._x.size < 1500 and stream._mel.shape[1] < 40


def test_48k_stereo_packets_give_the_file_windows_without_shift(speech16k):
    wav16 = speech16k[0]
    mono48 = signal.resample_poly(wav16, 3, 1).astype(np.float32)
    stereo = np.stack([mono48 * 0.9, mono48 * 1.1], axis=1)
    pcm = np.round(np.clip(stereo, -1, 1) * 32767).astype(np.int16).reshape(-1)  # interleaved s16

    file_windows = mel_windows(melspectrogram(resample(to_mono_float(pcm, 2), 48000)))
    resampler, stream = StreamResampler(48000), MelStream()
    out = []
    for i in range(0, pcm.size, 960 * 2):  # 20 ms packets as Opus decodes them
        out += stream.push(resampler.push(to_mono_float(pcm[i : i + 1920], 2)))
    out += stream.push(resampler.flush()) + stream.flush()
    live = np.stack([w for _, w in out])
    assert live.shape == file_windows.shape
    assert np.abs(live - file_windows).max() < 1e-3
    # and the same as the original 16 kHz audio, to resampler precision: no shift in time
    assert np.median(np.abs(live - mel_windows(melspectrogram(wav16)))) < 0.02


@pytest.mark.parametrize("rate", [48000, 44100, 32000, 22050, 8000])
def test_resampling_keeps_sample_timing(rate):
    x = np.zeros(rate, np.float32)
    x[rate // 2] = 1.0  # a click at exactly 0.5 s
    r = StreamResampler(rate)
    y = np.concatenate([r.push(x[: rate // 3]), r.push(x[rate // 3 :]), r.flush()])
    assert len(y) == 16000
    assert int(np.argmax(y)) == 8000
    assert np.abs(y - resample(x, rate)).max() < 1e-5


@pytest.mark.parametrize("rate", [16000, 24000])
def test_upsampling_to_48k_streams_like_offline(rate):
    """What a program pushes at 16 or 24 kHz reaches a channel at 48 kHz, on time, in any chunks."""
    x = np.zeros(rate, np.float32)
    x[rate // 2] = 1.0
    r = StreamResampler(rate, target=48000)
    y = np.concatenate([r.push(x[:777]), r.push(x[777:5000]), r.push(x[5000:]), r.flush()])
    assert len(y) == 48000 and int(np.argmax(y)) == 24000
    assert np.abs(y - resample(x, rate, target=48000)).max() < 1e-5


def vad_frames(sig, **kw):
    vad = VoiceActivity(**kw)
    out = []
    for i in range(0, len(sig), 320):
        out += vad.push(sig[i : i + 320])
    out += vad.flush()
    assert [i for i, _ in out] == list(range(len(out)))
    return np.array([s for _, s in out])


def test_voice_activity_speech_silence_and_noise(speech16k):
    wav = speech16k[0]  # 0.5 s silence, speech, 0.5 s silence
    rng = np.random.default_rng(0)
    lead = np.zeros(16000, np.float32)
    sig = np.concatenate([lead, wav, np.zeros(32000, np.float32)])
    speech = vad_frames(sig)
    start = (16000 + 8000) // 640  # first frame of speech
    end = (16000 + len(wav) - 8000) // 640
    assert speech[start + 3 : end - 3].mean() > 0.95  # words are speech
    assert not speech[: start - 4].any() and not speech[end + 10 :].any()  # silence is not
    assert speech[start - 1]  # pre-roll: the onset is not cut ...
    assert speech_strength(speech)[start - 3] > 0  # ... and the mouth fades in before it
    noisy = vad_frames(sig + rng.standard_normal(sig.size).astype(np.float32) * 0.02)
    assert noisy[start + 3 : end - 3].mean() > 0.9
    for level in (0.01, 0.1, 0.3):  # steady noise, quiet to loud, is not speech
        assert vad_frames(rng.standard_normal(16000 * 3).astype(np.float32) * level).mean() < 0.05
    hum = np.sin(2 * np.pi * 100 * np.arange(48000) / 16000).astype(np.float32) * 0.3
    assert vad_frames(hum).mean() < 0.05


def test_voice_activity_decides_within_the_mel_lookahead(speech16k):
    vad = VoiceActivity(preroll_ms=120)
    wav = speech16k[0]
    for i in range(0, len(wav), 320):
        n = i + len(wav[i : i + 320])
        for idx, _ in vad.push(wav[i : i + 320]):
            assert n - 640 * idx <= LOOKAHEAD_SAMPLES  # voice activity adds no delay to the mel windows


def test_voice_activity_memory_is_bounded_and_forget_ends_speech_now(speech16k):
    wav = speech16k[0]
    vad = VoiceActivity()
    long = np.concatenate([wav] * 12)  # over a minute of speech
    decided = []
    for i in range(0, len(long), 320):
        decided += vad.push(long[i : i + 320])
    assert len(vad._voiced) < 1500  # not one entry per 20 ms since the start
    assert [i for i, _ in decided] == list(range(len(decided)))
    # mid-speech barge-in: the hangover of what was heard does not keep the next (silent) frames speaking
    vad = VoiceActivity()
    for i in range(0, 16000 + len(wav) // 2, 320):
        vad.push(np.concatenate([np.zeros(16000, np.float32), wav])[i : i + 320])
    vad.forget()
    after = [s for i in range(0, 8000, 320) for _, s in vad.push(np.zeros(320, np.float32))]
    assert after and not any(after)

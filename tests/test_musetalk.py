"""The MuseTalk engine on a released-layout folder with random weights (toy widths, built by
scripts/musetalk-layout.py): loading and its errors, the audio windows as released, streaming equal
to offline, audio_pe changing the UNet's audio input and nothing else, and `streamer render`."""

import itertools
import json
import math
import shutil

import av
import numpy as np
import pytest
import torch

from streamer.audio.resample import StreamResampler
from streamer.audio.whisper import POSITION
from streamer.errors import UserError
from streamer.lipsync.engine import load_engine
from streamer.lipsync.musetalk import LAYOUT, MuseTalkInfer, positional_encoding
from streamer.live.channel import packet_floor, voice_lead
from tests.conftest import run_cli, speak, write_wav


@pytest.fixture(scope="module")
def engine(musetalk_dir):
    return MuseTalkInfer(musetalk_dir, device="cpu")


@pytest.fixture(scope="module")
def clip():
    from streamer.audio import resample

    x, rate = speak("Lips follow the voice.")
    return np.concatenate([np.zeros(4000, np.float32), resample(x, rate), np.zeros(4000, np.float32)])


def released_windows(folder, audio16: np.ndarray) -> np.ndarray:
    """MuseTalk v1.5's AudioProcessor on a clip under 30 s, written out from its description: one
    30 s segment, every layer's hidden states, trimmed at floor(seconds * 50), 4 zero positions before
    and zeros after, frame i reading positions 2i .. 2i+9 of that, (10 positions x layers, d)."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    fe = WhisperFeatureExtractor.from_pretrained(str(folder / "whisper"))
    model = WhisperModel.from_pretrained(str(folder / "whisper")).eval()
    feats = fe(audio16, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        hs = torch.stack(model.encoder(feats, output_hidden_states=True).hidden_states, dim=2)[0]
    hs = hs[: math.floor(audio16.size / 16000 * 50)]
    hs = torch.cat([torch.zeros_like(hs[:4]), hs, torch.zeros_like(hs[:12])])
    frames = math.floor(audio16.size / 16000 * 25)
    return np.stack([hs[2 * i : 2 * i + 10].reshape(-1, hs.shape[-1]).numpy() for i in range(frames)])


def test_a_released_layout_folder_loads_and_gives_256px_mouths(engine):
    assert engine.face_size == 256 and engine.features.shape == (50, 32)  # 10 positions x 5 layers, toy d_model
    assert "musetalk" in engine.name and "audio_pe on" in engine.name
    rng = np.random.default_rng(0)
    windows = rng.standard_normal((3, 50, 32)).astype(np.float32)
    crops = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    out = engine.predict_crops(windows, crops)
    assert out.shape == (3, 256, 256, 3) and out.dtype == np.uint8
    assert 10 < out.std() and out.min() < 50 and out.max() > 200  # a picture, not a constant
    assert np.array_equal(out, engine.predict_crops(windows, crops))  # deterministic: the cached latents too
    single = engine.predict_crops(windows[1:2], crops[1:2])
    assert np.abs(single.astype(int) - out[1]).max() <= 2  # a frame does not depend on its batch
    with pytest.raises(ValueError):
        engine.predict_crops(windows[:, :10], crops)


def test_audio_windows_are_the_released_ones_when_the_encoder_hears_the_whole_clip(musetalk_dir, clip):
    """With context_ms past the clip's end every block is encoded from the whole clip, as the release
    does offline; the default 160 ms context is what live needs, and differs from it."""
    want = released_windows(musetalk_dir, clip)
    whole = MuseTalkInfer(musetalk_dir, device="cpu", context_ms=5000, warmup=False)
    got = whole.features.offline(clip, len(want))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    live = MuseTalkInfer(musetalk_dir, device="cpu", warmup=False).features.offline(clip, len(want))
    assert np.abs(live - want).max() > 1e-3


@pytest.mark.parametrize("chunk", [320, 777, 4000, 16000])
@pytest.mark.parametrize("background", [False, True])
def test_streamed_audio_windows_equal_offline_for_any_chunking(engine, clip, chunk, background):
    f = engine.features
    frames = -(-clip.size // 640)
    want = f.offline(clip, frames)
    stream = f.stream(background=background)
    got = {}
    for k in range(0, clip.size, chunk):
        for i, w in stream.push(clip[k : k + chunk]):
            assert i not in got
            got[i] = w
            if not background:  # handed out as soon as its audio and the encoder's context are in
                assert stream.samples - 640 * i <= f.lookahead_s * 16000 + chunk
    for i, w in stream.flush():
        got[i] = w
    assert sorted(got) == list(range(frames))
    assert max(np.abs(got[i] - want[i]).max() for i in got) == 0


@pytest.mark.parametrize("block_ms", [60, 80, 100])
def test_every_frames_window_is_in_by_the_live_delays_floor(musetalk_dir, block_ms):
    """20 ms packets of 48 kHz voice from its first sample, led by the channel's silence, through the
    channel's resampler: each frame's whisper window is out by `packet_floor` after the frame's start,
    and at most a packet more than the latest one needs (blocks of 80 ms end every other frame)."""
    f = MuseTalkInfer(musetalk_dir, device="cpu", block_ms=block_ms, warmup=False).features
    resampler, stream = StreamResampler(48000), f.stream(background=False)
    voice = (0.1 * np.random.default_rng(0).standard_normal(48000 * 3)).astype(np.float32)
    waits = {}
    lead = voice_lead(f.lookahead_s)
    stream.push(resampler.push(np.zeros(lead, np.float32)))
    for k in range(0, voice.size, 960):
        for i, _ in stream.push(resampler.push(voice[k : k + 960])):
            waits[i] = (lead + k + 960) / 48000 - i / 25
    assert len(waits) > 50
    floor = packet_floor(f.lookahead_s)
    assert floor - 0.02 - 1e-9 <= max(waits.values()) <= floor + 1e-9


def test_the_lookahead_is_what_the_blocks_and_context_need(musetalk_dir):
    e = MuseTalkInfer(musetalk_dir, device="cpu", block_ms=40, context_ms=100, warmup=False)
    # frame i reads up to position 2i+5; its 2-position block ends at most 1 position later, +100 ms
    assert e.features.lookahead_s == pytest.approx((6 + 1) * POSITION / 16000 + 0.1)
    with pytest.raises(UserError, match="multiples of 20"):
        MuseTalkInfer(musetalk_dir, device="cpu", block_ms=30, warmup=False)


def test_audio_pe_changes_the_unets_audio_input_and_nothing_else(musetalk_dir):
    on = MuseTalkInfer(musetalk_dir, device="cpu", audio_pe=True, warmup=False)
    off = MuseTalkInfer(musetalk_dir, device="cpu", audio_pe=False, warmup=False)
    seen = {}

    def spy(name):
        def hook(module, args, kwargs):
            sample, t = args[:2]
            seen[name] = (sample.clone(), t.clone(), kwargs["encoder_hidden_states"].clone())
        return hook

    on.unet.register_forward_pre_hook(spy("on"), with_kwargs=True)
    off.unet.register_forward_pre_hook(spy("off"), with_kwargs=True)
    rng = np.random.default_rng(1)
    windows = rng.standard_normal((2, 50, 32)).astype(np.float32)
    crops = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    a, b = on.predict_crops(windows, crops), off.predict_crops(windows, crops)
    (s_on, t_on, h_on), (s_off, t_off, h_off) = seen["on"], seen["off"]
    assert torch.equal(s_on, s_off) and torch.equal(t_on, t_off) and int(t_on) == 0  # same latents, timestep 0
    assert torch.equal(h_off, torch.from_numpy(windows))  # off: the whisper windows as they are
    np.testing.assert_allclose((h_on - h_off).numpy(), np.broadcast_to(positional_encoding(50, 32), (2, 50, 32)),
                               atol=1e-6)
    assert np.abs(a.astype(int) - b).mean() > 0.5  # and the mouths differ


def test_the_positional_encoding_is_the_released_formula():
    d, rows = 384, 50  # as released: PositionalEncoding(d_model=384), added over the 50 rows
    position = torch.arange(0, 5000, dtype=torch.float).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
    pe = torch.zeros(5000, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
    assert np.array_equal(positional_encoding(rows, d), pe[:rows].numpy())


def _copy(src, tmp_path):
    dst = tmp_path / "models"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("what", list(LAYOUT))
def test_a_missing_file_is_named(musetalk_dir, tmp_path, what):
    folder = _copy(musetalk_dir, tmp_path)
    for name in LAYOUT[what]:
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(UserError, match=LAYOUT[what][0].replace(".", r"\.")):
        load_engine(f"musetalk:{folder}", device="cpu")


def test_mismatched_files_get_one_clear_line(musetalk_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = _copy(musetalk_dir, tmp_path)
    state = torch.load(folder / "musetalkV15" / "unet.pth", weights_only=True)
    key = next(iter(state))
    torch.save({k: v for k, v in state.items() if k != key}, folder / "musetalkV15" / "unet.pth")
    with pytest.raises(UserError, match=f"unet.pth does not fit musetalk.json: keys 1 missing \\(e.g. {key}\\)"):
        load_engine(f"musetalk:{folder}", device="cpu")

    config = json.loads((folder / "musetalkV15" / "musetalk.json").read_text())
    config["cross_attention_dim"] = 48  # a consistent UNet that does not take whisper's 32-wide features
    torch.save(UNet2DConditionModel.from_config(config).state_dict(), folder / "musetalkV15" / "unet.pth")
    (folder / "musetalkV15" / "musetalk.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="cross_attention_dim is 48 but whisper's d_model is 32"):
        load_engine(f"musetalk:{folder}", device="cpu")

    (folder / "musetalkV15" / "musetalk.json").write_text("{not json")
    with pytest.raises(UserError, match="musetalk.json is not readable JSON"):
        load_engine(f"musetalk:{folder}", device="cpu")


def test_render_writes_an_mp4_and_bad_folders_fail_in_one_line(musetalk_dir, clip, tmp_path):
    wav = write_wav(tmp_path / "v.wav", np.concatenate([np.zeros(16000, np.float32), clip]), 16000)
    out = tmp_path / "out.mp4"
    args = ("render", "--audio", wav, "--avatars", tmp_path / "avatars", "-q", "--device", "cpu")
    for pe in ("on", "off"):
        proc = run_cli(*args, "--out", out, "--model", f"musetalk:{musetalk_dir}", "--audio-pe", pe, "--force",
                       check=True)
        assert "mouth animated in" in proc.stdout
        with av.open(str(out)) as c:
            frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
        assert len(frames) == round((16000 + clip.size) / 16000 * 25)
        moved = [np.abs(f.astype(int) - frames[0]).mean() for f in frames]
        assert max(moved[:20]) < 0.2 and max(moved) > 5 * max(moved[:20])  # still in the leading silence, not in speech

    proc = run_cli(*args, "--out", tmp_path / "x.mp4", "--model", f"musetalk:{tmp_path / 'nowhere'}")
    assert proc.returncode == 2 and not (tmp_path / "x.mp4").exists()
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_streams_longer_than_whisper_s_30_s_equal_offline_to_the_end(engine):
    """Past 30 s the encoder's input slides; the stream keeps what its last blocks read at the end."""
    rng = np.random.default_rng(3)
    audio = (0.1 * rng.standard_normal(24000 * 22 + 12320)).astype(np.float32)
    f = engine.features
    frames = -(-audio.size // 640)
    want = f.offline(audio, frames)
    stream = f.stream(background=False)
    edges = [0, *range(12320, audio.size + 1, 24000)]  # 0.77 s, then 1.5 s pushes (each trims) to the end
    assert edges[-1] == audio.size
    got = {}
    for a, b in itertools.pairwise(edges):
        got.update(stream.push(audio[a:b]))
    got.update(stream.flush())
    assert sorted(got) == list(range(frames))
    assert max(np.abs(got[i] - want[i]).max() for i in range(frames - 30, frames)) == 0


def test_the_latent_cache_evicts_without_losing_a_batchs_own_crops(musetalk_dir, monkeypatch):
    import streamer.lipsync.musetalk as mt

    monkeypatch.setattr(mt, "LATENT_CACHE", 4)
    e = MuseTalkInfer(musetalk_dir, device="cpu", warmup=False)
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8)
    windows = np.zeros((3, 50, 32), np.float32)
    first = e.predict_crops(windows, crops[[0, 1, 2]])
    e.predict_crops(windows, crops[[3, 4, 0]])  # 0 is the oldest entry, hit while misses come in
    again = e.predict_crops(windows, crops[[5, 6, 7]])  # evicts everything older
    assert len(e._latents) == 4 and again.shape == (3, 256, 256, 3)
    assert np.array_equal(e.predict_crops(windows, crops[[0, 1, 2]]), first)  # recomputed the same


def test_prepare_with_the_model_keeps_every_crops_latents_with_the_avatar(musetalk_dir, talk_video, tmp_path):
    """`streamer prepare --model musetalk:DIR`: 256 px crops and every crop's latents saved with the
    avatar; an engine that uses the avatar reads them and encodes no crop; they are the latents it would
    have encoded on demand."""
    from streamer.avatar.cache import Avatar

    avatars = tmp_path / "avatars"
    run_cli("prepare", "--video", talk_video, "--name", "v", "--avatars", avatars, "--model",
            f"musetalk:{musetalk_dir}", "--device", "cpu", "-q", check=True)
    avatar = Avatar.load(avatars, "v")
    assert avatar.crops.shape == (75, 256, 256, 3)
    assert len(list(avatar.path.glob("musetalk-latents-*.npz"))) == 1
    e = MuseTalkInfer(musetalk_dir, device="cpu", warmup=False)
    e.use_avatar(avatar)
    fresh = MuseTalkInfer(musetalk_dir, device="cpu", warmup=False)
    crops = np.asarray(avatar.crops[[0, 40, 74]])
    np.testing.assert_allclose(e.encode_crops(crops).numpy(), fresh.encode_crops(crops).numpy(), atol=1e-5)
    assert e.encoded == 0 and fresh.encoded == 3
    other = np.full((1, 256, 256, 3), 7, np.uint8)  # a crop not of the avatar: encoded on demand
    e.encode_crops(other)
    assert e.encoded == 1


def test_an_avatar_prepared_without_the_model_gets_its_latents_on_first_use(musetalk_dir, talk_video, clip, tmp_path):
    """Crops cut from the decoded frames at run time (a 96 px avatar) are the ones whose latents were
    saved: render encodes none. A damaged file is computed again, not a failure."""
    from streamer.avatar.cache import prepare
    from streamer.render import render

    avatar = prepare(talk_video, "v", tmp_path / "avatars", progress=False)
    assert avatar.crops.shape[1] == 96
    first = MuseTalkInfer(musetalk_dir, device="cpu", warmup=False)
    first.use_avatar(avatar)
    assert first.encoded == 75
    [saved] = avatar.path.glob("musetalk-latents-*.npz")
    e = MuseTalkInfer(musetalk_dir, device="cpu", warmup=False)
    e.use_avatar(avatar)
    wav = write_wav(tmp_path / "v.wav", clip, 16000)
    summary = render(avatar, wav, tmp_path / "out.mp4", e, progress=False)
    assert summary["speech_frames"] > 20 and e.encoded == 0
    with np.load(saved) as data:
        digests, latents = data["digests"].copy(), data["latents"]
    digests[37, 0] ^= 1  # the middle crop no longer matches (a folder copied from elsewhere)
    with open(saved, "wb") as f:
        np.savez(f, digests=digests, latents=latents)
    other = MuseTalkInfer(musetalk_dir, device="cpu", warmup=False)
    other.use_avatar(avatar)
    assert other.encoded == 75  # computed again, not a silent miss on every crop
    saved.write_bytes(b"not a zip")
    again = MuseTalkInfer(musetalk_dir, device="cpu", warmup=False)
    again.use_avatar(avatar)
    assert again.encoded == 75 and np.load(saved)["latents"].shape[0] == 75


def test_a_multi_process_server_gets_the_latents_before_its_service_starts(musetalk_dir, talk_video, tmp_path):
    """The front computes missing latents in a child process (the inference service has a start
    deadline); saved ones are only checked."""
    from streamer.avatar.cache import prepare
    from streamer.lipsync.musetalk import ensure_latents

    avatar = prepare(talk_video, "v", tmp_path / "avatars", progress=False)
    ensure_latents(musetalk_dir, avatar, "cpu")
    [saved] = avatar.path.glob("musetalk-latents-*.npz")
    stamp = saved.stat().st_mtime_ns
    ensure_latents(musetalk_dir, avatar, "cpu")
    assert saved.stat().st_mtime_ns == stamp
    e = MuseTalkInfer(musetalk_dir, device="cpu", warmup=False)
    e.use_avatar(avatar)
    assert e.encoded == 0


def test_an_inference_service_loads_no_whisper_encoder_and_gives_the_same_mouths(engine, musetalk_dir):
    """The service runs the UNet on windows its media workers make: whisper's config gives the windows'
    geometry, its weights stay on disk, and the mouths equal those of the whole engine."""
    service = load_engine(f"musetalk:{musetalk_dir}", device="cpu", audio=False)
    assert service.features.encoder is None and engine.features.encoder is not None
    assert service.features.shape == engine.features.shape
    assert service.features.lookahead_s == engine.features.lookahead_s
    rng = np.random.default_rng(0)
    windows = rng.standard_normal((2, *engine.features.shape)).astype(np.float32)
    crops = rng.integers(0, 256, (2, 256, 256, 3), np.uint8)
    np.testing.assert_array_equal(service.predict_crops(windows, crops), engine.predict_crops(windows, crops))


def test_a_folder_under_home_is_found_as_the_shell_would_not_expand_it(musetalk_dir, monkeypatch):
    from streamer.lipsync.engine import resolve_model

    monkeypatch.setenv("HOME", str(musetalk_dir.parent))
    assert resolve_model(f"musetalk:~/{musetalk_dir.name}") == musetalk_dir  # `musetalk:~/x`: bash keeps the ~


def test_the_auto_delay_leaves_room_for_whispers_encode_time(engine, tmp_path, monkeypatch):
    """A window exists only once its block is encoded: the auto delay counts that measured time on top
    of the lookahead (before: lookahead and inference only, so on a slow encoder every mouth came late)."""
    import streamer.live.channel as channel
    from streamer.avatar.cache import demo_avatar
    from streamer.live.worker import InferenceWorker

    monkeypatch.setattr(channel, "AUTO_MAX_S", 2.0)  # the cap would hide the sum
    assert engine.features.compute_s > 0  # timed at load, by a warm-up
    saved = list(engine.features._times)
    worker = InferenceWorker(engine)
    try:
        ch = channel.Channel("c", demo_avatar(tmp_path), worker, delay_s=None)
        engine.features._times.extend([0.1] * 25)  # a slower encoder, as on a CPU with the released sizes
        ch.attach_voice("s")
        front = engine.features.compute_s  # 0.1 for each stream open on the encoder, this voice's at least
        assert front >= 0.1
        assert ch.delay_s == pytest.approx(channel.auto_delay(worker, ch.min_delay_s + front))
        assert ch.delay_s > channel.auto_delay(worker, ch.min_delay_s) + 0.09
        ch.close()
    finally:
        engine.features._times.clear()
        engine.features._times.extend(saved)
        worker.close()


def test_a_clips_windows_made_as_render_asks_equal_offline_and_are_not_all_held(engine, clip):
    f = engine.features
    frames = round(clip.size / 16000 * 25) + 3  # a few past the audio's end, as render may ask
    want = f.offline(clip, frames)
    lazy = f.for_clip(clip, frames)
    assert len(lazy) == frames
    for a in range(0, frames, 16):  # render's batches, speech frames only: gaps between them
        idx = [i for i in range(a, min(a + 16, frames)) if i % 5 != 2]
        assert np.array_equal(lazy[idx], want[idx])
        assert len(lazy._done) <= -(-(16 * 2 + 10) // f.block) + 1  # the blocks of one batch, not the clip's
    rng = np.random.default_rng(5)
    for i in rng.integers(0, frames, 5):  # out of order still right (encoded again)
        assert np.array_equal(lazy[int(i)], want[i])


def test_whispers_warm_up_does_not_time_its_first_call(musetalk_dir):
    from streamer.lipsync.musetalk import load_features

    assert len(load_features(musetalk_dir, "cpu")._times) == 1  # the first call's set-up is not a block's time
    assert len(MuseTalkInfer(musetalk_dir, device="cpu", warmup=False).features._times) == 0


def test_the_features_time_counts_the_streams_sharing_the_encoder(musetalk_dir):
    """Every voice of a process queues its blocks on one encoder thread: a block may wait behind one
    of each other voice's, so the auto delay's room for the front end grows with the open streams."""
    from streamer.lipsync.musetalk import load_features

    f = load_features(musetalk_dir, "cpu")
    one = f.compute_s
    streams = [f.stream() for _ in range(3)]
    assert f.compute_s == pytest.approx(3 * one)
    streams[0].close()
    f.stream(background=False)  # encodes on its caller's thread: queues behind nobody
    assert f.compute_s == pytest.approx(2 * one)
    for s in streams:
        s.close()
    assert f.compute_s == pytest.approx(one)

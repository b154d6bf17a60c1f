import os

from streamer.config import describe, load_config
from tests.conftest import run_cli

ROOT = __import__("pathlib").Path(__file__).parents[1]


def test_help_lists_the_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("export", "bench"):
        assert command in proc.stdout


def test_default_config_file_lists_every_setting_and_loads():
    text = (ROOT / "configs" / "default.yaml").read_text()
    assert text.split("\n", 1)[1] == describe()
    assert load_config(ROOT / "configs" / "default.yaml") == load_config(None)


def test_bad_config_fails_with_one_line(tmp_path):
    import pytest

    from streamer.errors import UserError

    bad = tmp_path / "bad.yaml"
    for text, expect in (("model:\n  device: gpu\n", "model.device must be one of"),
                         ("audio:\n  vad_aggressiveness: 9\n", "at most 3"),
                         ("modle:\n  path: x\n", "unknown config section"),
                         ("model: [1, 2\n", "not valid YAML")):
        bad.write_text(text)
        with pytest.raises(UserError, match=expect):
            load_config(bad)
    bad.write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="not a text file"):
        load_config(bad)
    with pytest.raises(UserError, match="is a folder, not a file"):
        load_config(tmp_path)
    read, write = os.pipe()  # as `--config <(...)`: a pipe, read like a file
    os.write(write, b"live:\n  delay_ms: 300\n")
    os.close(write)
    try:
        assert load_config(f"/dev/fd/{read}").live.delay_ms == 300
    finally:
        os.close(read)


def test_serve_refuses_bad_starts_with_one_line(tmp_path):
    import socket

    avatars = tmp_path / "avatars"
    proc = run_cli("serve", "--model", "nope.onnx", "--avatars", avatars)
    assert proc.returncode == 2 and "model nope.onnx not found" in proc.stderr
    assert not avatars.exists()  # failed before any work
    proc = run_cli("serve", "--avatar", "../up", "--avatars", avatars)
    assert proc.returncode == 2 and "not allowed" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("live:\n  delay_ms: 100\n")
    proc = run_cli("serve", "--config", bad)
    assert proc.returncode == 2 and "live.delay_ms must be at least 214" in proc.stderr
    bad.write_text("live:\n  delay_ms: 250\n  fade_frames: 8\n")  # the fade into speech is cut ahead: 421 ms
    proc = run_cli("serve", "--config", bad, "--avatars", avatars)
    assert proc.returncode == 2 and "below this model's floor of 421 ms" in proc.stderr, proc.stderr
    assert not avatars.exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--port", port, "--avatars", avatars, "-q")
    assert proc.returncode == 2 and "cannot listen" in proc.stderr and "open http" not in proc.stdout
    assert "Traceback" not in proc.stderr


def test_bench_live_refuses_client_cores_that_leave_the_server_none():
    import os

    proc = run_cli("bench", "live", "--client-cores", len(os.sched_getaffinity(0)))
    assert proc.returncode == 2 and "--client-cores must leave the server a core" in proc.stderr
    assert "Traceback" not in proc.stderr

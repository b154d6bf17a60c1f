"""A non-editable install works from any directory: the built wheel carries the pages, the demo portrait
and the face detector, and `streamer serve` from it serves the pages and prepares the demo avatar."""

import os
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_serves_the_pages_from_another_directory(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("streamer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ("streamer/web/index.html", "streamer/web/viewer.html", "streamer/avatar/data/astronaut.png",
                 "streamer/avatar/data/retinaface_mobilenet025.onnx"):
        assert need in names, need
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not this source tree
    where = subprocess.run([sys.executable, "-c", "import streamer; print(streamer.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--port", "0", "--workers", "1",
                             "--avatars", str(tmp_path / "avatars")], cwd=elsewhere, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "open http://localhost:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("localhost:")[1].split("/")[0])
        for page, text in (("/", "<html"), ("/viewer.html", "<html"), ("/openapi.json", "openapi")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{page}", timeout=10) as r:
                assert r.status == 200 and text in r.read().decode().lower(), page
    finally:
        proc.terminate()
        proc.wait(timeout=30)

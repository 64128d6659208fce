"""The README's first path for someone with photos and no training: export an off-the-shelf CLIP by its
hub name into a bundle, `dsmd index sync` a photo folder, `dsmd serve` it. The same three commands as
processes, the hub a loopback stand-in serving a tiny random CLIP, the folder generated: sub-folders,
EXIF orientations, an unreadable file, a file deleted before a second sync, and a third sync while the
server runs, which it picks up."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import httpx
import numpy as np
from fake_hub import FakeHub
from PIL import Image
from serving import Server
from test_hf_teachers import _build_clip


def photo(path, seed: int, orientation: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    if orientation is None:
        img.save(path, "JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(path, "JPEG", quality=90, exif=exif.tobytes())


def dsmd(*args: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "dsmd.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_export_by_name_sync_a_folder_and_serve_it(tmp_path):
    photos = tmp_path / "Pictures"
    for i in range(6):
        photo(photos / ("2023" if i < 3 else "2024/june") / f"img{i}.jpg", i, orientation=(None, 6, 3, 8, None, 2)[i])
    (photos / "2024" / "notes.jpg").write_text("not a photo")
    with FakeHub() as hub:
        hub.add_repo("acme/tiny-clip", _build_clip(tmp_path / "clip"))
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf"), "DSMD_OFFLINE": "0",
               "DSMD_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1"}
        bundle, index = tmp_path / "clip-bundle", tmp_path / "photos-index"
        dsmd("export", "teacher", "acme/tiny-clip", "--teacher", "clip", "--out", str(bundle), env=env)
    out = dsmd("index", "sync", str(index), "--bundle", str(bundle), "--folder", str(photos), env=env)
    assert "6 embedded" in out and "1 unreadable" in out, out
    (photos / "2023" / "img0.jpg").unlink()
    out = dsmd("index", "sync", str(index), "--bundle", str(bundle), "--folder", str(photos), env=env)
    assert "0 embedded" in out and "1 removed" in out, out

    with Server(bundle, index) as s:
        found = httpx.get(f"{s.url}/search", params={"text": "a photo", "k": 10}).json()["results"]
        assert sorted(r["name"] for r in found) == [f"img{i}.jpg" for i in range(1, 6)]
        assert {r["folder"] for r in found} == {"2023", "2024/june"}
        turned = next(r for r in found if r["name"] == "img1.jpg")  # stored landscape, tagged to turn 90 degrees
        thumb = Image.open(io.BytesIO(httpx.get(f"{s.url}{turned['thumbnail_url']}").content))
        assert thumb.size[1] > thumb.size[0]  # shown as seen: portrait
        in_june = httpx.get(f"{s.url}/search", params={"text": "a photo", "folder": "2024/june"}).json()["results"]
        assert sorted(r["name"] for r in in_june) == ["img3.jpg", "img4.jpg", "img5.jpg"]

        # photos arrive and go while it serves: a sync in another process, picked up without a restart
        photo(photos / "2025" / "img6.jpg", 6)
        (photos / "2023" / "img1.jpg").unlink()
        out = dsmd("index", "sync", str(index), "--bundle", str(bundle), "--folder", str(photos), env=env)
        assert "1 embedded" in out and "1 removed" in out, out
        want = ["img2.jpg", "img3.jpg", "img4.jpg", "img5.jpg", "img6.jpg"]
        deadline = time.time() + 30  # the server looks for another process's rebuild every 2 s
        while time.time() < deadline:
            found = httpx.get(f"{s.url}/search", params={"text": "a photo", "k": 10}).json()["results"]
            if sorted(r["name"] for r in found) == want:
                break
            time.sleep(0.2)
        assert sorted(r["name"] for r in found) == want

"""The ImageNet sample's lookup and download: pinned bytes only, nothing partial, resumable.

A local HTTP server stands in for the upstream host, serving three small files pinned in place of
the 1,000 (`sample_pins` is patched), so every bad case runs without the network.
"""
from __future__ import annotations

import errno
import hashlib
import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from nd_utils import imagenet_sample as ims
from nd_utils.errors import OfflineError, ProbeError

FILES = {f"n0000000{i}_thing_{i}.JPEG": bytes([i]) * (3000 + i) for i in range(3)}
FILES["n00000009_carpenter's_kit.JPEG"] = b"quoted name" * 100   # an apostrophe, as upstream


class _Server:
    """Serves `content` (name -> bytes) over HTTP; `hits` counts requests per name;
    `truncate` names files whose body stops halfway (Content-Length promises all of it)."""

    def __init__(self, content: dict):
        self.content, self.hits, self.truncate = dict(content), {}, set()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                from urllib.parse import unquote
                name = unquote(self.path.rsplit("/", 1)[-1])
                outer.hits[name] = outer.hits.get(name, 0) + 1
                data = outer.content.get(name)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if name in outer.truncate else data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def sample(tmp_path, monkeypatch):
    """Three pinned files, no local copy, an empty cache and a mirror serving the files."""
    pins = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
    monkeypatch.setattr(ims, "sample_pins", lambda: dict(pins))
    monkeypatch.setenv("ND_SHARED_DIR", str(tmp_path / "no-shared"))
    cache = tmp_path / "cache"
    monkeypatch.setenv("ND_IMAGENET_SAMPLE_CACHE", str(cache))
    server = _Server(FILES)
    monkeypatch.setenv("ND_IMAGENET_SAMPLE_URL", server.url)
    yield server, cache
    server.close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and "tmp" in p.name)


def test_download_verifies_every_file_then_reuses_the_cache(sample):
    server, cache = sample
    assert ims.locate_imagenet_sample(progress=False) == cache
    assert {n: (cache / n).read_bytes() for n in FILES} == FILES
    assert set(server.hits) == set(FILES) and set(server.hits.values()) == {1}
    assert ims.locate_imagenet_sample(progress=False) == cache     # complete: no request at all
    assert set(server.hits.values()) == {1}
    assert _leftovers(cache) == []


def test_a_local_copy_comes_before_the_cache(sample, tmp_path, monkeypatch):
    server, _ = sample
    local = tmp_path / "shared" / "data" / "imagenet-sample-images"
    local.mkdir(parents=True)
    for name, data in FILES.items():
        (local / name).write_bytes(data)
    monkeypatch.setenv("ND_SHARED_DIR", str(tmp_path / "shared"))
    assert ims.locate_imagenet_sample(progress=False) == local and server.hits == {}
    assert ims.locate_imagenet_sample(local, download=False) == local.resolve()   # a path


def test_unreachable_host_fails_fast_with_what_to_do(sample, monkeypatch):
    with socket.socket() as s:   # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ND_IMAGENET_SAMPLE_URL", f"http://127.0.0.1:{port}/")
    t0 = time.monotonic()
    with pytest.raises(OfflineError, match="unreachable") as err:
        ims.locate_imagenet_sample(progress=False)
    assert time.monotonic() - t0 < 5
    text = str(err.value)
    assert "ND_IMAGENET_SAMPLE_URL" in text and "path=" in text
    assert "CI" not in text and "shared" not in text
    assert isinstance(err.value, ProbeError)    # so every stage that falls back on a probe does
    with pytest.raises(OfflineError, match="download is off"):
        ims.locate_imagenet_sample(download=False)


def test_a_truncated_download_keeps_nothing_and_a_rerun_resumes(sample):
    server, cache = sample
    names = list(FILES)
    server.truncate.add(names[1])
    with pytest.raises(ProbeError, match=f"{names[1]}.*cut off"):
        ims.locate_imagenet_sample(progress=False)
    assert (cache / names[0]).read_bytes() == FILES[names[0]]      # verified before: kept
    assert not (cache / names[1]).exists() and _leftovers(cache) == []
    server.truncate.clear()
    assert ims.locate_imagenet_sample(progress=False) == cache
    assert server.hits[names[0]] == 1 and server.hits[names[1]] == 2   # resumed, not restarted


def test_wrong_bytes_from_a_mirror_are_refused_by_name(sample):
    server, cache = sample
    bad = list(FILES)[2]
    server.content[bad] = b"not the pinned file"
    with pytest.raises(ProbeError, match=f"download of {bad}.*not the pinned"):
        ims.locate_imagenet_sample(progress=False)
    assert not (cache / bad).exists() and _leftovers(cache) == []


def test_a_tampered_copy_is_refused_by_name(sample, tmp_path):
    _, cache = sample
    ims.locate_imagenet_sample(progress=False)
    victim = cache / list(FILES)[0]
    victim.write_bytes(b"edited")
    with pytest.raises(ProbeError, match=f"{victim.name} has sha256 .*damaged or edited"):
        ims.locate_imagenet_sample(progress=False)
    folder = tmp_path / "mine"        # a configured folder: incomplete is an error, not a download
    folder.mkdir()
    (folder / list(FILES)[1]).write_bytes(FILES[list(FILES)[1]])
    with pytest.raises(ProbeError, match="lacks 3 of"):
        ims.locate_imagenet_sample(folder)


def test_a_full_disk_leaves_no_partial_file(sample, monkeypatch):
    _, cache = sample
    real = ims.atomic_write_bytes

    def full_after_one(path, data):
        if any(cache.glob("n*")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ims, "atomic_write_bytes", full_after_one)
    with pytest.raises(OfflineError, match="the disk is full.*rerun resumes"):
        ims.locate_imagenet_sample(progress=False)
    assert len(list(cache.glob("n*"))) == 1 and _leftovers(cache) == []
    monkeypatch.setattr(ims, "atomic_write_bytes", real)
    assert ims.locate_imagenet_sample(progress=False) == cache


def test_two_runs_at_once_download_each_file_once(sample):
    server, cache = sample
    results, errors = [], []

    def run():
        try:
            results.append(ims.locate_imagenet_sample(progress=False))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and results == [cache, cache]
    assert set(server.hits.values()) == {1}
    assert {n: (cache / n).read_bytes() for n in FILES} == FILES


def test_the_pins_are_the_upstream_list():
    pins = ims.sample_pins()
    assert len(pins) == 1000 and all(len(v) == 64 for v in pins.values())
    index = ims.sample_class_index()
    assert index["n01440764"] == 0 and index["n15075141"] == 999
    assert ims.DEFAULT_BASE_URL.endswith(f"/{ims.SAMPLE_COMMIT}/")

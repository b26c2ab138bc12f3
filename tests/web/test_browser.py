"""A real browser (headless Chromium) uses the links from a page on another origin.

The page shows an <img> from a token link, fetch()es with Range and reads the
exposed Content-Range and ETag, plays and seeks an <audio> WAV (the browser's
own Range requests), opens a signed link, and loads a sandboxed SVG whose
script must not run.  It writes its findings into the DOM; the test reads
them with ``--dump-dom``.  A second page, on the service's TLS port, loads
50 token ``<img>`` links and reads each one's ``nextHopProtocol`` (``h2``).
Skipped where no Chromium is installed (.ci/run installs Debian's
``chromium``, and under CI a missing Chromium fails).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import time
import wave
import zlib
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from couchtoken.access.links import sign_url
from couchtoken.web.accesslog import DownloadSite
from tests.http import service_url
from tests.tlscert import ssl_port

TOKEN = "browser-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCRIPTED_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b"<script>parent.postMessage('svg-script-ran', '*')</script></svg>"
)


def png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


def wav_tone(seconds: float = 3.0, rate: int = 22050) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(
            b"".join(
                struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
                for i in range(int(seconds * rate))
            )
        )
    return buffer.getvalue()


PAGE = """<!doctype html><html><body>
<img id="img"><audio id="audio" preload="auto"></audio>
<iframe id="svg"></iframe><iframe id="control"></iframe>
<pre id="results">pending</pre>
<script>
const found = {};
const links = %(links)s;
function report() { document.getElementById("results").textContent = JSON.stringify(found); }
window.addEventListener("message", (e) => { found[e.data + "-from-" + e.source.frameElement?.id] = true; });
const img = document.getElementById("img");
img.onload = () => { found.img = img.naturalWidth; report(); };
img.onerror = () => { found.img = "error"; report(); };
img.src = links.img;
fetch(links.range, {headers: {Range: "bytes=0-9"}}).then(async (r) => {
  found.range = {status: r.status, contentRange: r.headers.get("Content-Range"),
                 etag: r.headers.get("ETag"), length: (await r.arrayBuffer()).byteLength};
  report();
}).catch((e) => { found.range = String(e); report(); });
fetch(links.signed).then(async (r) => { found.signed = {status: r.status, body: await r.text()}; report(); });
const audio = document.getElementById("audio");
audio.onloadedmetadata = () => { found.duration = audio.duration; audio.currentTime = audio.duration / 2; };
audio.onseeked = () => { found.seeked = audio.currentTime; report(); };
audio.onerror = () => { found.audio = "error " + (audio.error && audio.error.code); report(); };
audio.src = links.audio;
document.getElementById("svg").src = links.svg;
document.getElementById("control").src = "/control.svg";
setTimeout(() => { found.done = true; report(); }, 3000);
</script></body></html>"""


def _chromium_command(tmp_path, url: str, *extra: str) -> list[str]:
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=8000",
        *extra,
        "--dump-dom",
        url,
    ]


def _results(result: subprocess.CompletedProcess) -> dict:
    """What the page wrote into ``<pre id="results">``."""
    match = re.search(r'<pre id="results">(.*?)</pre>', result.stdout, re.S)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture
def media(admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "pixel.png", png_1x1(), "image/png")
    admin.put_attachment(db, "doc", "tone.wav", wav_tone(), "audio/wav")
    admin.put_attachment(db, "doc", "note.txt", b"0123456789abcdef", "text/plain")
    admin.put_attachment(db, "doc", "drawing.svg", SCRIPTED_SVG, "image/svg+xml")
    return "doc"


@pytest_twisted.ensureDeferred
async def test_a_browser_on_another_origin_uses_the_links(service, db, media, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    links = {
        "img": service.url(db, media, "pixel.png", TOKEN),
        "range": service.url(db, media, "note.txt", TOKEN),
        "audio": service.url(db, media, "tone.wav", TOKEN),
        "signed": sign_url(service.base_url, db, media, "note.txt", TOKEN, int(time.time()) + 300),
        "svg": service.url(db, media, "drawing.svg", TOKEN),
    }
    root = Resource()
    root.putChild(b"", Data((PAGE % {"links": json.dumps(links)}).encode(), "text/html"))
    root.putChild(b"control.svg", Data(SCRIPTED_SVG, "image/svg+xml"))
    page = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        command = _chromium_command(tmp_path, f"http://127.0.0.1:{page.getHost().port}/")
        result = await threads.deferToThread(
            subprocess.run, command, capture_output=True, text=True, timeout=120
        )
    finally:
        await page.stopListening()
    found = _results(result)
    print("\n[browser]", json.dumps(found, sort_keys=True))
    assert found["img"] == 1, found
    assert found["range"] == {
        "status": 206,
        "contentRange": "bytes 0-9/16",
        "etag": found["range"]["etag"],
        "length": 10,
    }, found
    assert found["range"]["etag"], found
    assert found["signed"] == {"status": 200, "body": "0123456789abcdef"}, found
    assert found.get("seeked", 0) > 0.5, found
    assert found.get("svg-script-ran-from-control"), found  # scripts are detected...
    assert not found.get("svg-script-ran-from-svg"), found  # ...and the sandboxed one did not run
    ranged = [r for r in service.proxy.requests if "tone.wav" in r.target and "range" in r.headers]
    assert ranged, "the browser never asked for a byte range of the audio"


IMAGES_PAGE = """<!doctype html><html><body><pre id="results">pending</pre>
<script>
const links = %(links)s;
let loaded = 0, failed = 0;
function report() {
  const entries = performance.getEntriesByType("resource").filter((e) => e.name.includes("/pixel"));
  document.getElementById("results").textContent = JSON.stringify({
    loaded, failed, protocols: entries.map((e) => e.nextHopProtocol)});
}
for (const link of links) {
  const img = new Image();
  img.onload = () => { loaded += 1; if (loaded + failed === links.length) report(); };
  img.onerror = () => { failed += 1; if (loaded + failed === links.length) report(); };
  img.src = link;
  document.body.appendChild(img);
}
setTimeout(report, 8000);
</script></body></html>"""


class _PageBeside(Resource):
    """The download route, plus one page at ``/page.html`` on the same origin.

    Resource Timing shows ``nextHopProtocol`` to the page's own origin only
    (the service sends no ``Timing-Allow-Origin``), so the test page is
    served by the same TLS port as the images.
    """

    def __init__(self, downloads: Resource, page: bytes) -> None:
        super().__init__()
        self._downloads = downloads
        self.putChild(b"page.html", Data(page, "text/html"))

    def getChild(self, name: bytes, request: Any) -> Resource:
        request.postpath.insert(0, request.prepath.pop())  # the route reads the whole path
        return self._downloads


@pytest_twisted.ensureDeferred
async def test_a_browser_loads_50_token_images_over_http2(start_service, admin, db, tmp_path):
    """A page of 50 <img> token links on the TLS port: all load, each over h2 (one connection, not six)."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    admin.put(db, "doc", {"download_token": TOKEN})
    for i in range(50):
        admin.put_attachment(db, "doc", f"pixel{i}.png", png_1x1(), "image/png")
    service = await start_service()
    links = [service_url("", db, "doc", f"pixel{i}.png", TOKEN) for i in range(50)]
    page = (IMAGES_PAGE % {"links": json.dumps(links)}).encode()
    site = DownloadSite(
        _PageBeside(service.app.app.resource(), page), in_flight=service.app.app.in_flight, reactor=reactor
    )
    tls = await serverFromString(reactor, ssl_port(tmp_path)).listen(site)
    try:
        url = f"https://127.0.0.1:{tls.getHost().port}/page.html"
        result = await threads.deferToThread(
            subprocess.run,
            _chromium_command(tmp_path, url, "--ignore-certificate-errors"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        await tls.stopListening()
    found = _results(result)
    print("\n[browser h2]", found["loaded"], "loaded,", sorted(set(found["protocols"])))
    assert (found["loaded"], found["failed"]) == (50, 0), found
    assert found["protocols"] == ["h2"] * 50, found

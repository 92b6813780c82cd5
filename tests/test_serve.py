"""The HTTP service (eclip serve): endpoints, validation, limits, auth, the image file guard,
concurrent serving on loopback, and the web page in headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import shutil
import struct
import subprocess
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402

from eclip.data.transforms import load_rgb, normalize, to_uint8_tensor  # noqa: E402
from eclip.model.eclip import ECLIP  # noqa: E402
from eclip_app.search.serve import ServeSettings, create_app  # noqa: E402

from .conftest import micro_config  # noqa: E402
from .search_helpers import ServerThread, make_service  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ECLIP(micro_config()).eval()


@pytest.fixture(scope="module")
def service(model, tmp_path_factory):
    return make_service(model, tmp_path_factory.mktemp("serve_catalog") / "images")


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service, ServeSettings(max_upload_bytes=200_000, max_pixels=1_000_000)))


def png_bytes(size=(48, 48), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def error_field(response) -> str | None:
    return response.json()["error"]["field"]


# ----------------------------------------------------------------------------- endpoints


def test_health(client, service):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["products"] == len(service.index) == 18
    assert body["encoder"] == "torch"


def test_search_text_json_and_form_agree(client):
    a = client.post("/search", json={"text": "red shirt", "k": 5})
    b = client.post("/search", data={"text": "red shirt", "k": "5"})
    assert a.status_code == b.status_code == 200, a.text
    ra, rb = a.json()["results"], b.json()["results"]
    assert len(ra) == 5 and [r["product_id"] for r in ra] == [r["product_id"] for r in rb]
    first = ra[0]
    assert {"product_id", "score", "title", "category", "attributes", "image_url", "rank"} <= set(first)
    assert [r["score"] for r in ra] == sorted((r["score"] for r in ra), reverse=True)
    assert client.get(first["image_url"]).status_code == 200


def test_search_scores_match_the_model(client, service, model):
    results = client.post("/search", json={"text": "blue bag", "k": 18}).json()["results"]
    assert len(results) == 18
    with torch.inference_mode():
        query = model.encode_text(["blue bag"])[0].numpy()
        for result in results[:3]:
            # a product's score is its best photo's cosine to the query
            paths = service.index.metadata(result["product_id"])["image_paths"]
            batch = normalize(torch.stack([to_uint8_tensor(load_rgb(p), model.image_size) for p in paths]))
            expected = float((model.product_embedding(batch).numpy() @ query).max())
            assert abs(result["score"] - expected) < 1e-4


def test_search_image_and_both_with_ground(client):
    files = {"image": ("q.png", png_bytes(), "image/png")}
    r = client.post("/search", files=files, data={"k": "3"})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3
    r = client.post("/search", files=files, data={"text": "red shirt", "k": "4", "ground": "1"})
    assert r.status_code == 200, r.text
    for result in r.json()["results"]:
        x0, y0, x1, y1 = result["box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


def test_search_image_with_tiles_is_the_searchers_tiled_query(client, service):
    """tiles=2: the photo read as the whole plus 2 x 2 crops, ranked and scored as Searcher's
    tiled query, text-free and with a text."""
    photo = Image.new("RGB", (96, 64), (240, 240, 240))
    photo.paste(Image.new("RGB", (30, 24), (200, 30, 30)), (60, 36))  # a small red thing in a corner
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    files = {"image": ("q.png", buffer.getvalue(), "image/png")}
    r = client.post("/search", files=files, data={"k": "5", "tiles": "2"})
    assert r.status_code == 200, r.text
    assert r.json()["query"]["tiles"] == 2
    expected = service.searcher.search_image(photo, 5, tiles=2)
    assert [x["product_id"] for x in r.json()["results"]] == [row.product_id for row in expected]
    assert [x["score"] for x in r.json()["results"]] == pytest.approx([row.score for row in expected], abs=1e-5)
    hinted = client.post("/search", files=files, data={"text": "red shirt", "k": "5", "tiles": "2"})
    expected = service.searcher.search_image_text(photo, "red shirt", 5, tiles=2)
    assert [x["product_id"] for x in hinted.json()["results"]] == [row.product_id for row in expected]


def test_search_filters_modes_and_facets(client, service):
    """Filters in JSON (an object) and form data (key=value fields), BM25 and hybrid ranking,
    facet counts in every answer, and 400s that name the field."""
    body = client.post("/search", json={"text": "red shirt", "k": 10, "mode": "hybrid", "filters": {"category": "bag"}}).json()
    assert len(body["results"]) == 6 and {r["category"] for r in body["results"]} == {"bag"}
    assert body["query"]["mode"] == "hybrid" and body["query"]["filters"] == {"category": "bag"}
    # a facet's own filter is left out of its counts; the others' are applied
    assert body["facets"]["category"] == {"shirt": 6, "bag": 6, "shoe": 6}
    assert body["facets"]["colour"] == {c: 1 for c in ("red", "blue", "green", "yellow", "black", "orange")}
    # BM25: the title words decide; a form with repeated expressions (one key: any of them)
    form = client.post("/search", data={"text": "green shoe", "mode": "lexical", "k": "3",
                                        "filters": ["colour=green", "colour=red"]}).json()
    assert form["results"][0]["title"] == "green shoe"
    assert {r["attributes"]["colour"] for r in form["results"]} <= {"green", "red"}
    assert form["facets"]["category"] == {"shirt": 2, "bag": 2, "shoe": 2}
    # hybrid = reciprocal rank fusion of the dense and the lexical rankings, the dense one weighted
    dense = [r.product_id for r in service.searcher.search_text("yellow bag", 50)]
    lexical = [p for p, _ in service.index.search_lexical("yellow bag", 50)]
    hybrid = client.post("/search", json={"text": "yellow bag", "mode": "hybrid", "k": 5}).json()["results"]
    from eclip_app.search.lexical import reciprocal_rank_fusion
    from eclip_app.search.searcher import DENSE_WEIGHT

    assert [r["product_id"] for r in hybrid] == [p for p, _ in reciprocal_rank_fusion([dense, lexical], 5, weights=[DENSE_WEIGHT, 1.0])]
    for payload, field in [({"text": "x", "filters": {"brand": "nike"}}, "filters"), ({"text": "x", "filters": ["colour"]}, "filters"),
                           ({"text": "x", "mode": "fuzzy"}, "mode"), ({"image": base64.b64encode(png_bytes()).decode(), "mode": "lexical"}, "mode"),
                           ({"text": "x", "filters": {"colour": {"gte": "a"}}}, "filters"),
                           ({"text": "x", "filters": {"colour": [str(i) for i in range(65)]}}, "filters")]:
        response = client.post("/search", json=payload)
        assert response.status_code == 400 and error_field(response) == field, (payload, response.text)


def test_hybrid_dense_weight_moves_the_ranking_between_dense_and_lexical(client, service):
    """dense_weight scales the embedding's RRF term: huge, hybrid is the dense top k; tiny, it is
    BM25's top k; out of range or not a number, a 400 naming the field."""
    from eclip_app.search.searcher import DENSE_WEIGHT

    text, k = "green shoe", 8
    dense = [r.product_id for r in service.searcher.search_text(text, k)]
    lexical = [p for p, _ in service.index.search_lexical(text, k)]
    assert len(lexical) == k and dense != lexical  # the two rankings differ, so the weight decides

    def hybrid(**extra):
        body = client.post("/search", json={"text": text, "mode": "hybrid", "k": k, **extra}).json()
        return [r["product_id"] for r in body["results"]], body["query"]["dense_weight"]

    assert hybrid(dense_weight=100) == (dense, 100)
    assert hybrid(dense_weight=0.01) == (lexical, 0.01)
    assert hybrid()[1] == DENSE_WEIGHT
    assert [r.product_id for r in service.searcher.search_text(text, k, mode="hybrid", dense_weight=100)] == dense
    form = client.post("/search", data={"text": text, "mode": "hybrid", "k": str(k), "dense_weight": "0.01"}).json()
    assert [r["product_id"] for r in form["results"]] == lexical
    for bad in (0, -1, 1e9, 10**400, "abc", "nan", True, [1, 2], {"w": 1}):
        response = client.post("/search", json={"text": text, "mode": "hybrid", "dense_weight": bad})
        assert response.status_code == 400 and error_field(response) == "dense_weight", (bad, response.text)
    with pytest.raises(ValueError, match="dense_weight"):
        service.searcher.search_text(text, k, mode="hybrid", dense_weight=0)


def test_search_get_with_query_string(client):
    r = client.get("/search", params={"q": "green shoe", "k": 2})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_embed_text_and_image(client, model):
    r = client.post("/embed", json={"text": ["red shirt", "blue bag"]})
    assert r.status_code == 200, r.text
    emb = np.array(r.json()["text_embeddings"])
    with torch.inference_mode():
        expected = model.encode_text(["red shirt", "blue bag"]).numpy()
    assert emb.shape == (2, 16) and np.abs(emb - expected).max() < 1e-5
    r = client.post("/embed", files=[("image", ("a.png", png_bytes(), "image/png")),
                                     ("image", ("b.png", png_bytes(colour=(0, 0, 200)), "image/png"))])
    assert r.status_code == 200, r.text
    assert np.array(r.json()["image_embeddings"]).shape == (2, 16) and r.json()["dim"] == 16
    # an image as base64 in JSON is accepted too
    r = client.post("/embed", json={"image": base64.b64encode(png_bytes()).decode()})
    assert r.status_code == 200 and len(r.json()["image_embeddings"]) == 1


def test_classify(client):
    files = {"image": ("q.png", png_bytes(), "image/png")}
    r = client.post("/classify", files=files, data={"labels": "shirt, bag,shoe"})
    assert r.status_code == 200, r.text
    labels = r.json()["labels"]
    assert sorted(x["label"] for x in labels) == ["bag", "shirt", "shoe"]
    assert abs(sum(x["probability"] for x in labels) - 1) < 1e-5
    assert [x["score"] for x in labels] == sorted((x["score"] for x in labels), reverse=True)
    r = client.post("/classify", files=files, data={"labels": ["red", "blue"], "prompts": "a {} thing"})
    assert r.status_code == 200, r.text
    bad = client.post("/classify", files=files, data={"labels": "shirt"})
    assert bad.status_code == 400 and error_field(bad) == "labels"
    bad = client.post("/classify", files=files, data={"labels": "a,b", "prompts": "no placeholder"})
    assert bad.status_code == 400 and error_field(bad) == "prompts"


def test_ground_upload_and_product(client, service):
    r = client.post("/ground", files={"image": ("q.png", png_bytes((80, 60)), "image/png")}, data={"text": "red shirt"})
    assert r.status_code == 200, r.text
    body = r.json()
    x0, y0, x1, y1 = body["box"]
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    grid = np.array(body["grid"])
    assert grid.shape == (4, 4) and grid.min() >= 0 and grid.max() <= 1  # micro model: 4x4 tokens
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert heat.size == (32, 32) and body["image_size"] == [80, 60]
    r = client.post("/ground", json={"product_id": "p000", "text": "red shirt", "image_index": 1})
    assert r.status_code == 200, r.text
    r = client.post("/ground", json={"product_id": "nope", "text": "red shirt"})
    assert r.status_code == 404 and error_field(r) == "product_id"


def test_web_page_and_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert page.headers["x-content-type-options"] == "nosniff"


# ----------------------------------------------------------------------------- bad payloads


@pytest.mark.parametrize(
    ("kwargs", "status", "field"),
    [
        ({"json": {"text": "   "}}, 400, "text"),
        ({"json": {"text": ""}}, 400, "text"),
        ({"json": {"k": 3}}, 400, "text"),  # neither text nor image
        ({"json": {"text": "shirt", "k": 0}}, 400, "k"),
        ({"json": {"text": "shirt", "k": 1001}}, 400, "k"),
        ({"json": {"text": "shirt", "k": "many"}}, 400, "k"),
        ({"json": {"text": "shirt", "k": 2.5}}, 400, "k"),
        ({"json": {"text": "shirt", "colour": "red"}}, 400, "colour"),
        ({"json": {"text": 12}}, 400, "text"),
        ({"json": {"text": "x" * 1001}}, 400, "text"),
        ({"json": {"text": "shirt", "ground": "maybe"}}, 400, "ground"),
        ({"data": {"text": "shirt", "extra": "1"}}, 400, "extra"),
        ({"files": {"image": ("a.txt", b"hello, not an image", "text/plain")}}, 400, "image"),
        ({"files": {"image": ("a.png", b"", "image/png")}}, 400, "image"),
        ({"files": {"image": ("a.png", png_bytes()[:40], "image/png")}}, 400, "image"),  # truncated
        ({"json": {"image": "not base64!"}}, 400, "image"),
        ({"json": {"text": "shirt", "tiles": 2}}, 400, "tiles"),  # tiles need an image
        ({"files": {"image": ("a.png", png_bytes(), "image/png")}, "data": {"tiles": "9"}}, 400, "tiles"),
        ({"files": {"image": ("a.png", png_bytes(), "image/png")}, "data": {"tiles": "-1"}}, 400, "tiles"),
    ],
)
def test_search_rejects_bad_payloads(client, kwargs, status, field):
    r = client.post("/search", **kwargs)
    assert r.status_code == status, r.text
    assert error_field(r) == field
    assert r.json()["error"]["message"]


def test_bad_json_and_content_type(client):
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/search", content=b"text=shirt", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/search", json=["red shirt"])
    assert r.status_code == 400


def test_upload_size_limit(client):
    big = os.urandom(300_000)  # over the fixture's 200 kB limit
    r = client.post("/search", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413, r.text

    # no Content-Length (chunked): counted as it streams in, refused past the limit (the test
    # client buffers the body, so this checks the count, not how early the refusal comes)
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "exceeds" in r.json()["error"]["message"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (invalid) body: a bomb to PIL if
    it decoded it, a 400/413 to us because the size is checked from the header first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(2000, 2000), (100_000, 100_000)])
def test_pixel_limit_and_decompression_bomb(client, size):
    r = client.post("/search", files={"image": ("bomb.png", _png_header_only(*size), "image/png")})
    assert r.status_code == 413, r.text
    assert error_field(r) == "image"


def test_pixel_budget_per_request(service):
    client = TestClient(create_app(service, ServeSettings(max_pixels=10_000, max_request_pixels=15_000)))
    one = ("a.png", png_bytes((90, 90)), "image/png")
    assert client.post("/embed", files=[("image", one)]).status_code == 200
    r = client.post("/embed", files=[("image", one), ("image", one)])
    assert r.status_code == 413 and error_field(r) == "image"


# ----------------------------------------------------------------------------- auth


def test_api_key(service):
    client = TestClient(create_app(service, ServeSettings(api_key="s3cret-key")))
    assert client.get("/health").status_code == 200  # public: liveness probes carry no key
    assert client.get("/").status_code == 200  # the page asks for the key itself
    r = client.post("/search", json={"text": "red shirt"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.post("/search", json={"text": "red shirt"}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.post("/search", json={"text": "red shirt"}, headers={"X-API-Key": "s3cret-key"}).status_code == 200
    r = client.post("/search", json={"text": "red shirt"}, headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 200
    path = service.index.metadata("p000")["image_paths"][0]
    assert client.get("/image", params={"path": path}).status_code == 401


# ----------------------------------------------------------------------------- image files


def test_image_endpoint_refuses_paths_outside_the_catalog(client, service, tmp_path):
    good = service.index.metadata("p000")["image_paths"][0]
    root = os.path.dirname(good)
    assert client.get("/image", params={"path": good}).status_code == 200
    assert client.get("/image", params={"path": os.path.basename(good)}).status_code == 200  # relative to a root

    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    link = os.path.join(root, "link_out.png")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(secret, link)
    notes = os.path.join(root, "notes.txt")
    with open(notes, "w") as handle:
        handle.write("not an image")
    try:
        cases = [
            (f"{root}/../{os.path.basename(root)}/../../etc/passwd", {403}),
            ("../../../../etc/passwd", {403}),
            ("/etc/passwd", {403}),
            (str(secret), {403}),  # a real image, but outside the roots
            (link, {403}),  # a symlink inside a root pointing out of it
            ("link_out.png", {403}),
            (notes, {403}),  # inside, but not an image
            (os.path.join(root, "missing.png"), {404}),
            ("", {400}),
        ]
        for path, allowed in cases:
            r = client.get("/image", params={"path": path})
            assert r.status_code in allowed, (path, r.status_code, r.text)
            assert r.json()["error"]["field"] == "path"
        # encoded traversal in the raw query string
        r = client.get(f"/image?path={root}%2F..%2F..%2F..%2Fetc%2Fpasswd")
        assert r.status_code == 403
    finally:
        os.remove(link)
        os.remove(notes)


# ----------------------------------------------------------------------------- on loopback


def test_concurrent_clients_on_loopback(service):
    """A bounded load test: uvicorn on 127.0.0.1, 6 clients for ~2 s. All must succeed; the p95
    is printed, not asserted (the CPU is shared)."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    queries = ["red shirt", "blue bag", "green shoe", "black bag", "yellow shirt", "orange shoe"]
    with ServerThread(create_app(service, ServeSettings())) as server:
        stop = time.monotonic() + 2.0

        def worker(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                n = 0
                while time.monotonic() < stop:
                    start = time.perf_counter()
                    r = http.post("/search", json={"text": queries[(i + n) % len(queries)], "k": 10})
                    elapsed = time.perf_counter() - start
                    with lock:
                        latencies.append(elapsed)
                        if r.status_code != 200 or len(r.json()["results"]) != 10:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                    n += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert len(latencies) >= 6
    p95 = float(np.percentile(latencies, 95)) * 1000
    print(f"\nloopback /search: {len(latencies)} requests from 6 clients, p95 {p95:.1f} ms")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_web_page_screenshot_in_headless_chromium(service, tmp_path):
    """The page runs a filtered hybrid search from ?q=&mode=&filter=, draws each result's
    grounding box in magenta on a canvas and shows the facet counts as chips: the screenshot
    must be the right size, not blank, and contain magenta box pixels; the rendered page must
    hold only results that meet the filter and the chips with their counts, the chosen one active."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not found on the PATH: install it to run this test (README, Install: apt-get install chromium)")
    shot = tmp_path / "page.png"
    with ServerThread(create_app(service, ServeSettings())) as server:
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,900", "--virtual-time-budget=8000",
        ]
        url = f"{server.url}/?q=red+shirt&k=8&mode=hybrid&filter=category%3Dshirt"
        done = subprocess.run([*command, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=90)
        dom = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=90).stdout
    import html.parser

    class Page(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.cards, self.chips, self._chip = [], [], None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "article":
                self.cards.append(attrs.get("data-category"))
            if tag == "button" and "chip" in (attrs.get("class") or ""):
                self._chip = attrs

        def handle_data(self, data):
            if self._chip is not None:
                self.chips.append((data, "active" in self._chip["class"]))
                self._chip = None

    page = Page()
    page.feed(dom)
    assert page.cards == ["shirt"] * 6, dom[-3000:]  # 6 shirts in the catalog, all of them, nothing else
    assert ("shirt (6)", True) in page.chips and ("bag (6)", False) in page.chips and ("red (1)", False) in page.chips
    assert shot.exists(), done.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert image.shape == (900, 1200, 3)
    assert image.std() > 10, "blank screenshot"
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    magenta = int(((r > 220) & (g < 50) & (b > 220)).sum())
    assert magenta > 200, f"no grounding boxes drawn ({magenta} magenta pixels)"


def test_cli_serve_end_to_end(model, service, tmp_path):
    """`eclip serve` as a user runs it: saved model and index folders, the key from
    ECLIP_API_KEY, loopback only; stopped after a few requests."""
    import socket
    import sys

    import httpx

    from eclip.io import save_model

    save_model(model, tmp_path / "model")
    service.index.save(tmp_path / "index")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ECLIP_API_KEY": "k3y"}
    command = [sys.executable, "-m", "eclip_app.cli", "-q", "serve", "--model", str(tmp_path / "model"),
               "--index", str(tmp_path / "index"), "--port", str(port), "--max-upload-mb", "0.1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "eclip serve did not come up"
            time.sleep(0.2)
        assert httpx.post(f"{url}/search", json={"text": "red shirt"}).status_code == 401
        r = httpx.post(f"{url}/search", json={"text": "red shirt", "k": 3}, headers={"X-API-Key": "k3y"})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        big = httpx.post(f"{url}/search", content=b"x" * 200_000, headers={"X-API-Key": "k3y", "content-type": "application/json"})
        assert big.status_code == 413
    finally:
        process.terminate()
        process.wait(timeout=20)

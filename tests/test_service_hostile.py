"""The service under a hostile client (issue 12): every class of bad request is a 4xx in the
`{"error": {...}}` shape that names the field, never a 5xx, and the keep-alive connection it
came on answers the next request. Hand-written cases for each class, then Hypothesis fuzzing of
the JSON, multipart and query shapes of every endpoint; a real server fault is a 500 of the
same shape, logged once with its request id. Also: relative image paths (the README workflow)
and the serve-time warning when catalog images are missing."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import shutil
import socket
import string
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from eclip.io import save_model  # noqa: E402
from eclip.model.eclip import ECLIP  # noqa: E402
from eclip_app.cli import main  # noqa: E402
from eclip_app.search.embed import _absolute_image_paths, embed_catalog, index_embeddings  # noqa: E402
from eclip_app.search.searcher import Searcher  # noqa: E402
from eclip_app.search.serve import SearchService, ServeSettings, check_prompt, create_app  # noqa: E402

from .conftest import micro_config  # noqa: E402
from .search_helpers import ServerThread, build_index, make_catalog, make_service  # noqa: E402

SETTINGS = ServeSettings(max_upload_bytes=1_000_000, max_pixels=1_000_000, read_timeout_s=5.0)
FIELDS = {
    "/search": ["text", "q", "image", "k", "ground", "tiles"],
    "/embed": ["text", "image"],
    "/classify": ["image", "labels", "prompts"],
    "/ground": ["image", "text", "product_id", "image_index"],
}
CASES = {"json": 0, "multipart": 0, "query": 0}  # examples tried, printed for the README


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ECLIP(micro_config()).eval()


@pytest.fixture(scope="module")
def service(model, tmp_path_factory):
    return make_service(model, tmp_path_factory.mktemp("hostile") / "images")


@pytest.fixture(scope="module")
def server(service):
    with ServerThread(create_app(service, SETTINGS)) as running:
        yield running


def png_bytes(size=(40, 40), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


def odd_images() -> dict[str, bytes]:
    """Readable images in the modes and shapes a client may send: each must be served (200) or
    refused (4xx), never a 500."""
    out = {}
    # each mode in the first of these formats that holds it; F only in TIFF, which is refused
    for mode in ("1", "L", "LA", "P", "I", "I;16", "F", "RGBA", "CMYK"):
        for fmt in ("PNG", "JPEG", "TIFF"):
            buffer = io.BytesIO()
            try:
                Image.new(mode, (24, 16)).save(buffer, format=fmt)
            except (OSError, ValueError, KeyError):
                continue  # a mode the format cannot hold
            out[f"{mode}.{fmt.lower()}"] = buffer.getvalue()
            break
    for fmt in ("WEBP", "BMP"):
        buffer = io.BytesIO()
        Image.new("RGBA" if fmt == "WEBP" else "P", (24, 16)).save(buffer, format=fmt)
        out[f"other.{fmt.lower()}"] = buffer.getvalue()
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out["animated.gif"] = buffer.getvalue()
    out["1x1.png"] = png_bytes((1, 1))
    out["3000x1.png"] = png_bytes((3000, 1))
    out["1x3000.png"] = png_bytes((1, 3000))
    return out


ODD_IMAGES = odd_images()


class KeepAlive:
    """One HTTP/1.1 connection. `send` fails the test if the server closed it after answering."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.sock = None

    def send(self, method: str, url: str, body: bytes | None = None, headers: dict | None = None):
        self.conn.request(method, url, body=body, headers=headers or {})
        if self.sock is None:
            self.sock = self.conn.sock
        assert self.conn.sock is self.sock, "the server closed the keep-alive connection"
        response = self.conn.getresponse()
        data = response.read()
        assert not response.will_close, f"{method} {url} -> {response.status}: the server closes the connection"
        return response, data

    def check(self, method: str, url: str, body: bytes | None = None, headers: dict | None = None):
        """The invariant: no 5xx, a 4xx is the error shape naming a field, and the same
        connection answers /health next."""
        response, data = self.send(method, url, body, headers)
        assert response.status < 500, (method, url, body[:200] if body else None, data[:500])
        if response.status >= 400:
            error = json.loads(data)["error"]
            assert error["status"] == response.status and isinstance(error["message"], str) and error["message"]
            assert isinstance(error["field"], str) and error["field"], error
            assert "Traceback" not in error["message"]
        health, _ = self.send("GET", "/health")
        assert health.status == 200
        return response, data

    def close(self):
        self.conn.close()


@pytest.fixture()
def conn(server):
    connection = KeepAlive(server.port)
    yield connection
    connection.close()


def post_json(conn: KeepAlive, path: str, payload, status: int, field: str):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response, data = conn.check("POST", path, body, {"Content-Type": "application/json"})
    assert response.status == status, data[:300]
    if status >= 400:
        assert json.loads(data)["error"]["field"] == field, data[:300]
    return json.loads(data)


@contextmanager
def captured_logs():
    """Records of the service's and uvicorn's loggers (uvicorn's do not reach the root logger)."""
    records: list[logging.LogRecord] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = ListHandler(level=logging.INFO)
    loggers = [logging.getLogger(name) for name in ("eclip.serve", "uvicorn.error", "uvicorn")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield records
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


# ----------------------------------------------------------------------------- the classes


@pytest.mark.parametrize("path", ["a" * 300 + ".png", "x/" * 3000 + "a.png", "/" + "b" * 256 + "/c.png",
                                  "d" * 5000, "imgs/" + "e" * 255 + ".png", "\udcff.png", "%00.png"])
def test_image_paths_the_file_system_refuses(conn, path):
    response, data = conn.check("GET", "/image?path=" + quote(path, safe="", errors="surrogatepass"))
    assert response.status in (400, 403, 404) and json.loads(data)["error"]["field"] == "path"


@pytest.mark.parametrize("depth", [50, 5_000, 50_000, 200_000])
def test_deeply_nested_json(conn, depth):
    body = b'{"text": ' + b"[" * depth + b"]" * depth + b"}"
    status, field = (400, "text") if depth < 1000 else (400, "body")
    post_json(conn, "/search", body, status, field)


@pytest.mark.parametrize(("path", "payload", "field"), [
    ("/search", {"text": "\ud800 tee"}, "text"),
    ("/search", {"q": "red \udfff"}, "q"),
    ("/embed", {"text": ["ok", "\udbff"]}, "text"),
    ("/classify", {"image": base64.b64encode(PNG).decode(), "labels": ["a", "b\ud800"]}, "labels"),
    ("/classify", {"image": base64.b64encode(PNG).decode(), "labels": ["a", "b"], "prompts": ["{} \ud800"]}, "prompts"),
    ("/ground", {"product_id": "p0\ud800", "text": "red"}, "product_id"),
    ("/search", {"te\ud800xt": "red"}, "body"),
])
def test_lone_surrogates(conn, path, payload, field):
    post_json(conn, path, json.dumps(payload).encode(), 400, field)  # json.dumps writes \\ud800 escapes


@pytest.mark.parametrize("prompt", ["a photo of {} }", "{}}", "{0}", "{x}", "{", "}", "{{}}", "{} {}", "{!r}",
                                    "{:>10}", "{0.__class__}", "{[0]}", "{}{", "{{{}}", "no field"])
def test_classify_prompts_that_are_not_one_plain_field(conn, prompt):
    payload = {"image": base64.b64encode(PNG).decode(), "labels": ["shirt", "bag"], "prompts": [prompt]}
    post_json(conn, "/classify", payload, 400, "prompts")


def test_classify_prompt_with_literal_braces_works(conn):
    payload = {"image": base64.b64encode(PNG).decode(), "labels": ["shirt", "bag"], "prompts": ["a {{x}} {} }}"]}
    assert len(post_json(conn, "/classify", payload, 200, "")["labels"]) == 2
    check_prompt("{}")  # the rule, directly: one plain field, literal braces doubled
    for bad in ("{0}", "{} }"):
        with pytest.raises(Exception, match="prompt"):
            check_prompt(bad)


def test_classify_caps_labels_times_prompts(service):
    client_settings = ServeSettings(max_classify_texts=12)
    with ServerThread(create_app(service, client_settings)) as small:
        conn = KeepAlive(small.port)
        image = base64.b64encode(PNG).decode()
        post_json(conn, "/classify", {"image": image, "labels": ["a", "b", "c", "d"], "prompts": ["{}", "a {}", "b {}", "c {}"]}, 400, "prompts")
        post_json(conn, "/classify", {"image": image, "labels": ["a", "b", "c"]}, 400, "labels")  # x 5 default prompts
        assert len(post_json(conn, "/classify", {"image": image, "labels": ["a", "b"]}, 200, "")["labels"]) == 2
        conn.close()


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_odd_image_modes_and_shapes_at_every_image_endpoint(conn, name):
    data = ODD_IMAGES[name]
    statuses = []
    for path, fields in (("/search", {"k": "2"}), ("/embed", {}), ("/classify", {"labels": "shirt,bag"}),
                         ("/ground", {"text": "red"})):
        parts = [(key, None, None, value.encode()) for key, value in fields.items()] + [("image", name, "image/png", data)]
        response, _ = conn.check("POST", path, multipart(parts), {"Content-Type": "multipart/form-data; boundary=hostileboundary"})
        statuses.append(response.status)
    assert len(set(statuses)) == 1, statuses  # an image is usable everywhere or nowhere
    if name in ("L.png", "RGBA.png", "P.png", "CMYK.jpeg", "animated.gif", "other.webp", "other.bmp", "1x1.png", "3000x1.png"):
        assert statuses[0] == 200
    if name.endswith(".tiff"):
        assert statuses[0] == 400  # not one of the upload formats


def test_catalog_image_truncated_or_deleted_after_indexing(model, tmp_path):
    """/ground on such a product: 409 on product_id. /search ground=1: the result, box null and a
    warning; the other results keep their boxes."""
    rows = make_catalog(tmp_path / "images")
    service = SearchService(Searcher(model, build_index(model, rows)))
    first = service.index.metadata("p000")["image_paths"]
    second = service.index.metadata("p001")["image_paths"]
    data = Path(first[0]).read_bytes()
    Path(first[0]).write_bytes(data[: len(data) // 3])  # truncated
    os.remove(second[0])  # deleted
    Path(second[1]).write_bytes(b"not an image any more")
    with ServerThread(create_app(service, SETTINGS)) as running:
        conn = KeepAlive(running.port)
        for pid, index in (("p000", 0), ("p001", 0), ("p001", 1)):
            body = post_json(conn, "/ground", {"product_id": pid, "image_index": index, "text": "red"}, 409, "product_id")
            assert pid in body["error"]["message"]
        assert post_json(conn, "/ground", {"product_id": "p000", "image_index": 1, "text": "red"}, 200, "")["box"]
        results = post_json(conn, "/search", {"text": "red shirt", "k": 18, "ground": True}, 200, "")["results"]
        broken = {r["product_id"] for r in results if r["box"] is None}
        assert broken and broken <= {"p000", "p001"}
        assert all("warning" in r for r in results if r["box"] is None)
        assert all(len(r["box"]) == 4 and "warning" not in r for r in results if r["product_id"] not in broken)
        conn.close()


def test_aborted_uploads_are_one_line_each(server):
    with captured_logs() as records:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                head = ("POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        "Content-Length: 100000\r\n\r\n")
                sock.sendall(head.encode() + b'{"text": "' + b"x" * 500)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum("disconnected" in r.getMessage() for r in records) < 20:
            time.sleep(0.05)
    assert sum("disconnected" in r.getMessage() for r in records) == 20
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR]


def test_slow_upload_gets_408(service):
    with ServerThread(create_app(service, ServeSettings(read_timeout_s=0.5))) as running, \
            socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"text\": ")
        start = time.monotonic()
        chunks = []
        while chunk := sock.recv(65536):  # the reply says Connection: close, so it ends
            chunks.append(chunk)
        assert time.monotonic() - start < 5
        reply = b"".join(chunks).decode("latin-1")
    assert reply.startswith("HTTP/1.1 408") and '"field": "body"' in reply


def test_real_server_fault_is_a_500_logged_once_and_the_connection_survives(conn, service, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(service, "search", broken)
    with captured_logs() as records:
        response, data = conn.send("POST", "/search", json.dumps({"text": "red"}).encode(), {"Content-Type": "application/json"})
    assert response.status == 500
    error = json.loads(data)["error"]
    assert error["request_id"] == response.getheader("x-request-id") and "disk on fire" not in data.decode()
    logged = [r for r in records if r.exc_info]
    assert len(logged) == 1 and error["request_id"] in logged[0].getMessage()
    monkeypatch.undo()
    assert conn.send("POST", "/search", json.dumps({"text": "red"}).encode(), {"Content-Type": "application/json"})[0].status == 200


def test_framework_refusals_have_the_error_shape(conn):
    assert json.loads(conn.check("GET", "/nowhere")[1])["error"]["field"] == "url"
    assert json.loads(conn.check("DELETE", "/search")[1])["error"]["field"] == "method"
    response, data = conn.check("POST", "/search", b"--x\r\n", {"Content-Type": "multipart/form-data"})  # no boundary
    assert response.status == 400 and json.loads(data)["error"]["field"] == "body"


def test_host_allow_list_and_frame_ancestors(service):
    with ServerThread(create_app(service, ServeSettings(allowed_hosts=["localhost", "127.0.0.1", "::1"]))) as running:
        conn = KeepAlive(running.port)
        for host in ("evil.example", "localhost.evil.example", "127.0.0.1.nip.io"):
            response, data = conn.send("GET", "/health", headers={"Host": host})
            assert response.status == 400 and json.loads(data)["error"]["field"] == "Host"
        for host in ("localhost", f"localhost:{running.port}", "127.0.0.1", "[::1]:8000"):
            response, _ = conn.send("GET", "/health", headers={"Host": host})
            assert response.status == 200, host
            assert "frame-ancestors 'none'" in response.getheader("content-security-policy")
        conn.close()


# ----------------------------------------------------------------------------- fuzzing

HOSTILE_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["red shirt", "blue bag", "p000", "p017", "shirt, bag, shoe", "{}", "a {} photo", "{} }", "{0}",
                     "{x}", "{{}}", "\ud800 tee", "\udfff", "../../etc/passwd", "/etc/passwd", "x" * 1200, " ", "",
                     "0", "1", "-1", "99999999999999999999", "true", "nan", "\x00", "ünïcödé 🧥",
                     base64.b64encode(PNG).decode(), base64.b64encode(PNG[:50]).decode(), "aGVsbG8="]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), HOSTILE_TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT, inner, max_size=3),
                      max_leaves=10)
ALL_FIELDS = sorted({name for names in FIELDS.values() for name in names})
NAMES = st.one_of(st.sampled_from(ALL_FIELDS), st.text(max_size=8), st.just("\udc80"))
FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(path=st.sampled_from(list(FIELDS)), body=st.one_of(st.dictionaries(NAMES, VALUES, max_size=5), VALUES))
def test_fuzz_json_bodies(server, path, body):
    CASES["json"] += 1
    conn = KeepAlive(server.port)
    try:
        conn.check("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    finally:
        conn.close()


B64_PNG = base64.b64encode(PNG).decode()
# a request each endpoint answers with 200; the near-valid fuzzers change one field of it
VALID = {
    "/search": {"text": "red shirt", "k": 3, "ground": True},
    "/embed": {"text": ["red shirt"], "image": [B64_PNG]},
    "/classify": {"image": B64_PNG, "labels": ["shirt", "bag"]},
    "/ground": {"product_id": "p000", "text": "red shirt"},
}


@FUZZ
@given(data=st.data(), path=st.sampled_from(list(FIELDS)))
def test_fuzz_near_valid_json(server, data, path):
    CASES["json"] += 1
    body = dict(VALID[path])
    name = data.draw(st.sampled_from(FIELDS[path]), label="field")
    body[name] = data.draw(st.one_of(VALUES, st.lists(HOSTILE_TEXT, min_size=1, max_size=70)), label="value")
    conn = KeepAlive(server.port)
    try:
        conn.check("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    finally:
        conn.close()


@FUZZ
@given(path=st.sampled_from(list(FIELDS)), raw=st.binary(max_size=200),
       content_type=st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain", "",
                                     "application/x-www-form-urlencoded", "multipart/form-data; boundary=b"]))
def test_fuzz_raw_bodies(server, path, raw, content_type):
    CASES["json"] += 1
    conn = KeepAlive(server.port)
    try:
        conn.check("POST", path, raw, {"Content-Type": content_type} if content_type else {})
    finally:
        conn.close()


PART_DATA = st.one_of(st.sampled_from([PNG, PNG[:60], png_bytes((2000, 2000)), b"", b"GIF89a", b"\xff\xd8\xff", *ODD_IMAGES.values()]),
                      st.binary(max_size=64), HOSTILE_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")))
PART = st.tuples(NAMES, st.one_of(st.none(), st.text(max_size=10)), st.sampled_from(["image/png", "text/plain", None]), PART_DATA)


def multipart(parts, boundary: str = "hostileboundary", cut: int | None = None) -> bytes:
    chunks = []
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        chunks.append(head.encode("utf-8", "surrogatepass") + b"\r\n" + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body if cut is None else body[:cut]


def _valid_parts(path: str) -> list[tuple]:
    """VALID[path] as multipart parts: images as PNG uploads, lists as repeated fields."""
    parts = []
    for name, value in VALID[path].items():
        for item in value if isinstance(value, list) else [value]:
            if item == B64_PNG:
                parts.append((name, "q.png", "image/png", PNG))
            else:
                parts.append((name, None, None, str(int(item) if isinstance(item, bool) else item).encode()))
    return parts


@FUZZ
@given(path=st.sampled_from(list(FIELDS)), keep=st.booleans(), parts=st.lists(PART, max_size=4),
       cut=st.integers(-1200, 400).map(lambda c: c if c >= 0 else None),  # cut short a quarter of the time
       header_boundary=st.sampled_from(["hostileboundary", "hostileboundary", "hostileboundary", "other", ""]))
def test_fuzz_multipart_bodies(server, path, keep, parts, cut, header_boundary):
    """Random parts, on their own or after the endpoint's valid parts; cut short, or under
    another boundary than the header's, some of the time."""
    CASES["multipart"] += 1
    content_type = "multipart/form-data" + (f"; boundary={header_boundary}" if header_boundary else "")
    body = multipart((_valid_parts(path) if keep else []) + parts, cut=cut)
    conn = KeepAlive(server.port)
    try:
        conn.check("POST", path, body, {"Content-Type": content_type})
    finally:
        conn.close()


QUERY_TEXT = st.one_of(HOSTILE_TEXT, st.text(alphabet=string.printable, max_size=300), st.binary(max_size=40))


def _encode(value) -> str:
    return quote(value, safe="") if isinstance(value, bytes) else quote(value, safe="", errors="surrogatepass")


@FUZZ
@given(endpoint=st.sampled_from(["/search", "/image", "/health", "/", "/static/app.js", "/static/../index.html"]),
       params=st.lists(st.tuples(st.sampled_from(["q", "text", "k", "ground", "path", "image", "x"]), QUERY_TEXT), max_size=4),
       valid=st.booleans())
def test_fuzz_query_strings(server, endpoint, params, valid):
    CASES["query"] += 1
    if valid:  # a query that works, then the hostile parameters
        params = [("q", "red shirt"), ("path", "p000_0.png"), *params]
    query = "&".join(f"{_encode(name)}={_encode(value)}" for name, value in params)
    conn = KeepAlive(server.port)
    try:
        conn.check("GET", endpoint + ("?" + query if query else ""))
    finally:
        conn.close()


def test_zz_fuzz_case_count():
    """Runs after the fuzz tests (file order): the number of cases they tried, for the README."""
    total = sum(CASES.values())
    print(f"\nhostile fuzzing: {total} requests ({CASES}), no 5xx, every error named its field, every connection kept")
    assert total == 0 or total >= 6 * 100


# ----------------------------------------------------------------------------- relative image paths


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("hostile_model") / "model")


def _relative_catalog(shop) -> None:
    (shop / "imgs").mkdir(parents=True)
    with open(shop / "catalog.jsonl", "w") as handle:
        for i, colour in enumerate([(200, 30, 30), (30, 60, 200), (40, 160, 60), (230, 210, 40)]):
            Image.new("RGB", (48, 48), colour).save(shop / "imgs" / f"p{i}.png")
            handle.write(json.dumps({"product_id": f"p{i}", "title": f"product {i}", "images": [f"imgs/p{i}.png"]}) + "\n")


def test_readme_workflow_with_relative_paths(model_dir, tmp_path, monkeypatch):
    """`cd DIR; eclip embed --catalog catalog.jsonl; eclip index; eclip serve` from elsewhere:
    /image serves the photos and every result gets a box."""
    shop = tmp_path / "shop"
    _relative_catalog(shop)
    monkeypatch.chdir(shop)
    embed_catalog(model_dir, "catalog.jsonl", "emb", progress=False, rank=0, world_size=1)
    index_embeddings("emb", kind="flat").save("index")
    monkeypatch.chdir(tmp_path)
    service = SearchService.load(model_dir, shop / "index")
    assert service.missing_images() == (0, 4, [])
    with ServerThread(create_app(service, SETTINGS)) as running:
        conn = KeepAlive(running.port)
        results = post_json(conn, "/search", {"text": "product", "k": 4, "ground": True}, 200, "")["results"]
        assert len(results) == 4 and all(len(r["box"]) == 4 for r in results)
        for result in results:
            response, data = conn.check("GET", result["image_url"])
            assert response.status == 200 and data == (shop / "imgs" / f"{result['product_id']}.png").read_bytes()
        conn.close()


def test_old_index_with_relative_paths_resolves_against_the_catalog_folder(model, tmp_path, monkeypatch):
    shop = tmp_path / "shop"
    _relative_catalog(shop)
    # as an index folder built before paths were stored absolute: relative paths, the catalog in info
    monkeypatch.chdir(shop)
    old = build_index(model, [{"product_id": f"p{i}", "title": f"product {i}", "image_path": f"imgs/p{i}.png"} for i in range(4)])
    old.info["catalog"] = str(shop / "catalog.jsonl")
    monkeypatch.chdir(tmp_path)
    service = SearchService(Searcher(model, old))
    assert service.missing_images() == (0, 4, [])
    with ServerThread(create_app(service, SETTINGS)) as running:
        conn = KeepAlive(running.port)
        results = post_json(conn, "/search", {"text": "product", "k": 4, "ground": True}, 200, "")["results"]
        assert all(len(r["box"]) == 4 for r in results)
        assert conn.check("GET", results[0]["image_url"])[0].status == 200
        post_json(conn, "/ground", {"product_id": "p2", "text": "product"}, 200, "")
        conn.close()
    # an embeddings folder of that time: paths relative to the folder above the catalog's
    metadata = [{"image_path": "shop/imgs/p1.png"}, {"image_path": "shop/imgs/p2.png"}, {"image_path": "/abs/x.png"}]
    _absolute_image_paths(metadata, shop)
    assert [m["image_path"] for m in metadata] == [str(shop / "imgs/p1.png"), str(shop / "imgs/p2.png"), "/abs/x.png"]


def test_serve_warns_when_catalog_images_are_missing(model_dir, tmp_path, monkeypatch, capsys):
    shop = tmp_path / "shop"
    _relative_catalog(shop)
    embed_catalog(model_dir, shop / "catalog.jsonl", tmp_path / "emb", progress=False, rank=0, world_size=1)
    index_embeddings(tmp_path / "emb", kind="flat").save(tmp_path / "index")
    shutil.rmtree(shop / "imgs")
    served = []
    monkeypatch.setattr("eclip_app.search.serve.serve", lambda service, settings, host, port: served.append(settings))
    assert main(["-q", "serve", "--model", str(model_dir), "--index", str(tmp_path / "index")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: 4 of 4 catalog images checked cannot be found" in err and "--image-root" in err
    assert served[0].allowed_hosts == ["localhost", "127.0.0.1", "::1"]  # loopback: loopback names only

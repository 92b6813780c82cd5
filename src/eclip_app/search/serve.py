"""The HTTP service: `create_app(searcher, settings)` builds a FastAPI app over a `Searcher` (a
model, PyTorch `ECLIP` or `OnnxEncoder`, plus a `ProductIndex`), wrapped in a `SearchService`.

    GET  /health                 status, product count, encoder backend
    POST /search                 text and/or image (multipart or JSON), k, ground, filters, mode,
                                 dense_weight, tiles
                                 -> ranked products and facet counts
    POST /embed                  texts and/or images -> vectors
    POST /classify               image + labels (+ prompts) -> zero-shot scores
    POST /ground                 image (or product_id) + text -> box and heat map
    GET  /image?path=...         a catalog image; only files under the catalog's image folders
    GET  /                       the web page (search box, upload, result grid with boxes)

Safety: binds 127.0.0.1 unless told otherwise; an optional API key (X-API-Key or
Authorization: Bearer) compared in constant time; an optional Host allow-list (DNS rebinding);
request bodies are capped while they stream in (413 before the rest is read) and must arrive
within a read timeout (408); images are checked for their pixel count from the header before
decoding; every bad field gets a 4xx JSON error `{"error": {"status", "field", "message"}}`
that names it; anything else is a 500 of the same shape with a request id, logged once, and
the connection stays open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import logging
import math
import mimetypes
import os
import string
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from eclip.data.transforms import normalize, to_uint8_tensor
from eclip.evaluation import PROMPTS
from eclip.model.grounding import upsample_heatmap

from .filters import FilterError, parse_filters
from .index import ProductIndex
from .searcher import DENSE_WEIGHT, DENSE_WEIGHT_RANGE, Searcher

logger = logging.getLogger("eclip.serve")

WEB_DIR = Path(__file__).parent / "web"
MAX_PATH_CHARS, MAX_NAME_CHARS = 4096, 255  # Linux PATH_MAX and NAME_MAX
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
# formats PIL may try on an upload: the usual web formats, not every plugin PIL ships
UPLOAD_FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP"]
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = {"/", "/health", "/favicon.ico"}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
]


@dataclass
class ServeSettings:
    api_key: str | None = None
    max_upload_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 16_000_000  # width x height of an uploaded image, read from its header
    # all images of one request together: small compressed files can decode to large bitmaps
    max_request_pixels: int = 64_000_000
    max_k: int = 100
    max_text_chars: int = 1000
    max_items: int = 64  # texts or images per /embed request, labels per /classify
    # labels x prompts of one /classify request: each is a text encoding (64 labels x 5 prompts)
    max_classify_texts: int = 320
    max_ground: int = 24  # results grounded by /search?ground=1
    max_tiles: int = 4  # /search?tiles=N reads an image query as N x N crops too: 1 + N^2 encodings
    read_timeout_s: float = 60.0  # the whole request body must arrive within this (408 after)
    # Host header names answered (None: any); "*" any, "*.example.com" its subdomains
    allowed_hosts: list[str] | None = None
    image_roots: list[Path] = field(default_factory=list)  # extra allowed image folders


class ApiError(Exception):
    """A client error: status, the offending field and a message, sent as JSON."""

    def __init__(self, status: int, field_name: str | None, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field_name, message


# ----------------------------------------------------------------------------- the engine


def _metadata_images(meta: dict) -> list[str]:
    images = meta.get("images") or meta.get("image_paths") or []
    if isinstance(images, str):
        images = [images]
    return [img["path"] if isinstance(img, dict) else str(img) for img in images]


class SearchService:
    """A `Searcher` (model + index) plus what the endpoints add: batched embedding,
    classification, batched grounding with the token grid, and the image file guard."""

    def __init__(self, searcher: Searcher, image_roots: list[str | Path] | None = None):
        self.searcher = searcher
        self.model = searcher.model
        self.index = searcher.index
        self.image_size: int = self.model.image_size
        self.backend = getattr(self.model, "backend", "torch")
        # relative image paths (index folders written before paths were made absolute) are
        # relative to the catalog's folder: the index records it
        self.image_base = self.index.image_base()
        roots = [Path(r) for r in image_roots] if image_roots else self._catalog_roots(self.index, self.image_base)
        # resolved once: the check compares resolved paths, so a symlinked root still works
        self.image_roots = sorted({r.resolve() for r in roots if Path(r).is_dir()}, key=str)

    @classmethod
    def load(cls, model_folder: str | Path | None, index_folder: str | Path, onnx_folder: str | Path | None = None,
             image_roots: list[str | Path] | None = None, threads: int | None = None,
             device: str | None = None) -> SearchService:
        """`threads`: intra-op threads per request (PyTorch or onnxruntime). Requests already run
        in parallel, so 1 avoids oversubscribing the cores; None keeps the runtime's default.
        `device`: the PyTorch model's (None: CUDA when present, else the CPU)."""
        if onnx_folder is not None:
            from .export import OnnxEncoder

            index = ProductIndex.load(index_folder)
            return cls(Searcher(OnnxEncoder.load(onnx_folder, threads=threads), index), image_roots)
        if threads:
            torch.set_num_threads(threads)
        if model_folder is None:
            raise ValueError("give a model folder or an ONNX export folder")
        return cls(Searcher.load(model_folder, index_folder, device=device), image_roots)

    @staticmethod
    def _catalog_roots(index: Any, base: Path | None = None) -> list[Path]:
        """The folders of every image the index knows: the only places /image serves from."""
        roots: set[Path] = set()
        for pid in index.product_ids():
            for path in _metadata_images(index.metadata(pid)):
                if os.path.isabs(path):
                    roots.add(Path(path).parent)
                elif base is not None:
                    roots.add((base / path).parent)
        return sorted(roots, key=str)

    def missing_images(self, sample: int = 256) -> tuple[int, int, list[str]]:
        """(missing, checked, a few missing paths) over the first photo of up to `sample`
        products spread over the index: `eclip serve` warns at start when the photos moved."""
        pids = self.index.product_ids()
        if len(pids) > sample:  # products first: no pass over a million products' metadata
            pids = [pids[i] for i in np.linspace(0, len(pids) - 1, sample).astype(int)]
        paths = [images[0] for pid in pids if (images := _metadata_images(self.index.metadata(pid)))]
        missing = []
        for path in paths:
            try:
                self.resolve_image(path)
            except ApiError:
                missing.append(path)
        return len(missing), len(paths), missing[:3]

    # ---- encoders

    def _batch(self, images: list[Image.Image]) -> torch.Tensor:
        return normalize(torch.stack([to_uint8_tensor(im, self.image_size) for im in images]))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return self.model.encode_text(texts).float().cpu().numpy()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """One vector per image in the index's space (product or global embedding)."""
        with torch.inference_mode():
            encoding = self.model.encode_image(self._batch(images))
            if self.searcher.field == "global":
                return encoding.global_embedding.float().cpu().numpy()
            return self.model.product_embedding_from(encoding).float().cpu().numpy()

    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        if isinstance(scale, (int, float)):
            return float(scale)
        return float(self.model.logit_scales["global"]().item())

    # ---- search

    def search(self, text: str | None, image: Image.Image | None, k: int, filters=None, mode: str = "dense",
               dense_weight: float = DENSE_WEIGHT, tiles: int = 0) -> list[dict]:
        if text is not None and image is not None:
            rows = self.searcher.search_image_text(image, text, k, filters=filters, mode=mode, dense_weight=dense_weight,
                                                   tiles=tiles)
        elif text is not None:
            rows = self.searcher.search_text(text, k, filters=filters, mode=mode, dense_weight=dense_weight)
        else:
            rows = self.searcher.search_image(image, k, filters=filters, tiles=tiles)
        results = []
        for row in rows:
            meta = self.index.metadata(row.product_id)
            results.append({
                "rank": row.rank,
                "product_id": row.product_id,
                "score": float(row.score),
                "title": row.title,
                "category": meta.get("category"),
                "attributes": meta.get("attributes") or {},
                "images": _metadata_images(meta),
                "image": row.image_path,  # the photo that matched best
                "image_url": f"/image?path={_quote(row.image_path)}" if row.image_path else None,
            })
        return results

    # ---- grounding and classification

    def resolve_image(self, path: str) -> Path:
        """An image path from the catalog (or a client) -> a real file under an allowed root.
        Raises ApiError 403 outside the roots (after resolving `..` and symlinks), 404 if missing,
        400 for a path the file system refuses (too long, bad bytes)."""
        if not path or "\x00" in path:
            raise ApiError(400, "path", "path must be a non-empty file path")
        if len(path) > MAX_PATH_CHARS or any(len(part) > MAX_NAME_CHARS for part in path.split("/")):
            raise ApiError(400, "path", f"path longer than {MAX_PATH_CHARS} characters or a name longer than {MAX_NAME_CHARS}")
        if os.path.isabs(path):
            candidates = [Path(path)]
        else:
            bases = ([self.image_base] if self.image_base is not None else []) + self.image_roots
            candidates = [base / path for base in bases]
        outside = True
        for candidate in candidates:
            try:
                resolved = candidate.resolve(strict=False)
                if not any(resolved.is_relative_to(root) for root in self.image_roots):
                    continue
                outside = False
                if resolved.suffix.lower() not in IMAGE_SUFFIXES:
                    raise ApiError(403, "path", "only image files are served")
                if resolved.is_file():
                    return resolved
            except (OSError, RuntimeError, ValueError):  # too long, symlink loops, bad bytes
                continue
        if outside:
            raise ApiError(403, "path", "path is outside the catalog's image folders")
        raise ApiError(404, "path", "no such image")

    def catalog_image(self, path: str, max_pixels: int) -> Image.Image:
        """A catalog photo, decoded under the same guards as an upload (pixel count from the
        header first). ApiError (field `path`) when it is gone, unreadable or too large."""
        resolved = self.resolve_image(path)
        try:
            data = resolved.read_bytes()
        except OSError as error:
            raise ApiError(404, "path", f"cannot read the image: {error.strerror or error}") from error
        return decode_image(data, max_pixels, "path")

    def ground_many(self, images: list[Image.Image], texts: list[str]) -> list[dict]:
        """Box (fractions of width and height) and heat map of text i in image i."""
        batch = self._batch(images)
        with torch.inference_mode():
            encoding = self.model.encode_image(batch)
            maps, index = self.model.heatmaps_from(encoding, self.model.encode_text(texts))
            heat = upsample_heatmap(maps.float(), (self.image_size, self.image_size)).cpu()
            maps = maps.float().cpu()
        out = []
        for i, h in enumerate(heat.numpy()):
            grid = maps[i].numpy()
            grid = (grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-12)
            out.append({
                "box": [round(v, 4) for v in self.model.box_from_heatmap(h)],
                "query_index": None if index is None else int(index[i]),
                "grid": np.round(grid, 3).tolist(),
                "heatmap": h,
            })
        return out

    def classify(self, image: Image.Image, labels: list[str], prompts: list[str]) -> list[dict]:
        """Zero-shot scores of `labels`; each prompt holds one `{}` (`check_prompt`)."""
        with torch.inference_mode():
            encoding = self.model.encode_image(self._batch([image]))
            # as evaluation.encode_labels: each label's prompts embedded, averaged, renormalised
            texts = self.model.encode_text([p.format(label) for label in labels for p in prompts])
            label_emb = F.normalize(texts.float().view(len(labels), len(prompts), -1).mean(dim=1), dim=-1)
            scores = self.model.image_text_scores(encoding, label_emb)[0].float().cpu()
            probs = (scores * self.logit_scale()).softmax(dim=-1)
        ranked = sorted(zip(labels, scores.tolist(), probs.tolist()), key=lambda r: -r[1])
        return [{"label": label, "score": s, "probability": p} for label, s, p in ranked]


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def heatmap_png(heatmap: np.ndarray) -> str:
    image = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- request parsing


def check_prompt(prompt: str) -> None:
    """A classification prompt is a `str.format` template with exactly one replacement field,
    the plain `{}` (literal braces written `{{` `}}`); anything else is ApiError on `prompts`."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(prompt)
                  if name is not None]
    except ValueError as error:  # a lone `{` or `}`
        raise ApiError(400, "prompts", f"prompt {prompt!r} is not a valid template ({error}); write a literal brace as {{{{ or }}}}") from None
    if fields != [("", "", None)]:
        raise ApiError(400, "prompts", f"each prompt needs exactly one {{}} for the label and no other field: {prompt!r}")


def _has_surrogate(text: str) -> bool:
    """A lone UTF-16 surrogate (JSON allows `\\ud800`): no UTF-8 form, so no tokenizer or reply can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def decode_image(data: bytes, max_pixels: int, field_name: str = "image", request_left: int | None = None) -> Image.Image:
    """Bytes -> RGB image. The pixel count is read from the header before decoding, so a
    decompression bomb costs a header parse, not gigabytes."""
    if not data:
        raise ApiError(400, field_name, "empty file")
    try:
        # open() parses the header only (and refuses PIL's own bomb limit); decoding is load()
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise ApiError(413, field_name, f"image is {width}x{height} pixels; at most {max_pixels} pixels allowed")
        if request_left is not None and width * height > request_left:
            raise ApiError(413, field_name, "the request's images together have too many pixels; send fewer")
        image.load()
        return image.convert("RGB")
    except ApiError:
        raise
    except Image.DecompressionBombError as error:
        raise ApiError(413, field_name, f"image too large: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise ApiError(400, field_name, "not a readable image (JPEG, PNG, WebP, GIF or BMP)") from error


class Payload:
    """The fields of a JSON or form request, with typed getters that raise ApiError by name."""

    def __init__(self, fields: dict[str, list[Any]], settings: ServeSettings):
        self.fields = fields
        self.settings = settings

    @classmethod
    async def read(cls, request, settings: ServeSettings, allowed: set[str]) -> Payload:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict[str, list[Any]] = {}
        if content_type == "application/json":
            try:
                data = json.loads(await request.body() or b"null")
            except RecursionError:
                raise ApiError(400, "body", "JSON nested too deeply") from None
            except (ValueError, UnicodeDecodeError) as error:
                raise ApiError(400, "body", f"body is not valid JSON: {error}") from error
            if not isinstance(data, dict):
                raise ApiError(400, "body", "JSON body must be an object")
            for name, value in data.items():
                if _has_surrogate(name):
                    raise ApiError(400, "body", f"field name {name!r} holds a lone surrogate (not valid Unicode text)")
                fields[name] = value if isinstance(value, list) else [value]
        elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await request.form(max_files=settings.max_items, max_fields=4 * settings.max_items)
            for name, value in form.multi_items():
                fields.setdefault(name, []).append(value)
        elif content_type == "" and request.method == "GET":
            for name, value in request.query_params.multi_items():
                fields.setdefault(name, []).append(value)
        else:
            raise ApiError(415, "content-type", "send application/json or multipart/form-data")
        for name in fields:
            if not name:
                raise ApiError(400, "body", f"a field with an empty name; allowed: {', '.join(sorted(allowed))}")
            if name not in allowed:
                raise ApiError(400, name, f"unknown field {name!r}; allowed: {', '.join(sorted(allowed))}")
        return cls(fields, settings)

    def has(self, name: str) -> bool:
        return bool(self.fields.get(name))

    def _one(self, name: str) -> Any:
        values = self.fields.get(name) or []
        if len(values) > 1:
            raise ApiError(400, name, f"{name} given {len(values)} times; give it once")
        return values[0] if values else None

    def text(self, name: str, required: bool = False) -> str | None:
        value = self._one(name)
        if value is None:
            if required:
                raise ApiError(400, name, f"{name} is required")
            return None
        return self._check_text(name, value)

    def texts(self, name: str) -> list[str]:
        values = self.fields.get(name) or []
        if len(values) > self.settings.max_items:
            raise ApiError(400, name, f"at most {self.settings.max_items} values in {name}")
        return [self._check_text(name, v) for v in values]

    def _check_text(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ApiError(400, name, f"{name} must be a string")
        if _has_surrogate(value):
            raise ApiError(400, name, f"{name} holds a lone surrogate (not valid Unicode text)")
        value = value.strip()
        if not value:
            raise ApiError(400, name, f"{name} must not be empty")
        if len(value) > self.settings.max_text_chars:
            raise ApiError(400, name, f"{name} is longer than {self.settings.max_text_chars} characters")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self._one(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ApiError(400, name, f"{name} must be an integer")
        try:
            number = int(value)
        except ValueError as error:
            raise ApiError(400, name, f"{name} must be an integer") from error
        if not low <= number <= high:
            raise ApiError(400, name, f"{name} must be between {low} and {high}, got {number}")
        return number

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self._one(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ApiError(400, name, f"{name} must be a number")
        try:
            number = float(value)
        except (ValueError, OverflowError) as error:  # OverflowError: a JSON integer past float's range
            raise ApiError(400, name, f"{name} must be a number") from error
        if not math.isfinite(number) or not low <= number <= high:
            raise ApiError(400, name, f"{name} must be between {low:g} and {high:g}, got {value!r}")
        return number

    def flag(self, name: str) -> bool:
        value = self._one(name)
        if value is None or isinstance(value, bool):
            return bool(value)
        if not isinstance(value, (int, str)):
            raise ApiError(400, name, f"{name} must be a boolean (0/1, true/false)")
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off", ""):
            return False
        raise ApiError(400, name, f"{name} must be a boolean (0/1, true/false)")

    async def images(self, name: str) -> list[Image.Image]:
        values = self.fields.get(name) or []
        if len(values) > self.settings.max_items:
            raise ApiError(400, name, f"at most {self.settings.max_items} images in {name}")
        out = []
        left = self.settings.max_request_pixels
        for value in values:
            if isinstance(value, str):  # JSON: base64, so that a JSON client can send images too
                try:
                    data = base64.b64decode(value, validate=True)
                except ValueError as error:
                    raise ApiError(400, name, f"{name} must be an uploaded file or base64 image data") from error
            elif hasattr(value, "read"):
                data = await value.read()
            else:
                raise ApiError(400, name, f"{name} must be an uploaded file")
            # decoding is CPU work: off the event loop, so other requests keep being served
            image = await run_in_threadpool(decode_image, data, self.settings.max_pixels, name, left)
            left -= image.width * image.height
            out.append(image)
        return out

    async def image(self, name: str, required: bool = False) -> Image.Image | None:
        images = await self.images(name)
        if len(images) > 1:
            raise ApiError(400, name, f"{name} given {len(images)} times; give one image")
        if not images and required:
            raise ApiError(400, name, f"{name} is required")
        return images[0] if images else None


# ----------------------------------------------------------------------------- ASGI guard


class RequestGuard:
    """Outermost layer: Host allow-list, API key and body size, checked before any body byte
    is parsed; the body's read timeout; a request id; and the last catch of any exception.

    A declared Content-Length over the limit is refused at once; a body without one (chunked)
    is counted as it streams in and the request fails with 413 at the first byte past the limit.
    An exception that escapes the app was already answered (500, JSON, logged once by the
    app's handler): it is not raised further, so the server keeps the connection open.
    """

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.settings = settings
        self.key = settings.api_key.encode() if settings.api_key else None
        self.hosts = None if settings.allowed_hosts is None else [h.strip().lower() for h in settings.allowed_hosts]

    def host_allowed(self, host_header: str) -> bool:
        if self.hosts is None or "*" in self.hosts:
            return True
        host = host_header.strip().lower()
        if host.startswith("["):  # [::1]:8000
            host = host[1:].split("]", 1)[0]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:16]
        scope["eclip.request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.host_allowed(headers.get("host", "")):
            return await _send_error(send, 400, "Host", f"host {headers.get('host', '')!r} is not served here "
                                     "(eclip serve --allowed-hosts)", [id_header])
        if self.key is not None and scope["path"] not in PUBLIC_PATHS and not scope["path"].startswith("/static/"):
            given = headers.get("x-api-key")
            auth = headers.get("authorization", "")
            if given is None and auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            # compare_digest: the time taken does not depend on how much of the key matched
            if given is None or not hmac.compare_digest(given.encode("utf-8", "replace"), self.key):
                return await _send_error(send, 401, "X-API-Key", "missing or wrong API key (X-API-Key or Authorization: Bearer)",
                                         [(b"www-authenticate", b"Bearer"), id_header])
        limit = self.settings.max_upload_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_error(send, 400, "Content-Length", "bad Content-Length", [id_header])
            if int(length) > limit:
                return await _send_error(send, 413, "body", f"request body is {int(length)} bytes; at most {limit} allowed",
                                         [id_header])
        received = 0
        body_done = False
        timeout = self.settings.read_timeout_s
        deadline = time.monotonic() + timeout

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # later receives wait for a disconnect, which may come at any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError(408, "body", f"the request body did not arrive within {timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, "body", f"request body exceeds {limit} bytes")
                body_done = not message.get("more_body", False)
            return message

        start = time.perf_counter()
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                elapsed = f"app;dur={(time.perf_counter() - start) * 1000:.1f}"
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS, id_header,
                                      (b"server-timing", elapsed.encode())]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except Exception as error:
            if getattr(error, "_eclip_logged", False) and started:
                return  # answered and logged by the app's handler
            logger.error("request %s %s %s failed", request_id, scope.get("method"), scope.get("path"), exc_info=error)
            if not started:
                await _send_error(send, 500, None, f"internal error (request id {request_id})", [id_header])


def _error_body(status: int, field_name: str | None, message: str, request_id: str | None = None) -> bytes:
    error: dict[str, Any] = {"status": status, "field": field_name, "message": message}
    if request_id:
        error["request_id"] = request_id
    # ASCII escapes: a message that quotes the client's text can always be encoded
    return json.dumps({"error": error}).encode()


def error_response(status: int, field_name: str | None, message: str, request_id: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(_error_body(status, field_name, message, request_id), status_code=status,
                    media_type="application/json", headers=headers)


async def _send_error(send, status: int, field_name: str | None, message: str, extra_headers=()) -> None:
    body = _error_body(status, field_name, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *SECURITY_HEADERS, *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- the app


def create_app(service: SearchService | Searcher, settings: ServeSettings | None = None) -> RequestGuard:
    if isinstance(service, Searcher):
        service = SearchService(service)
    settings = settings or ServeSettings()
    if settings.image_roots:
        service.image_roots = sorted({*service.image_roots, *(Path(r).resolve() for r in settings.image_roots)}, key=str)
    app = FastAPI(title="eclip search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        # a body that did not arrive in time is abandoned half-read: the connection cannot be reused
        headers = {"Connection": "close"} if error.status == 408 else None
        return error_response(error.status, error.field, error.message, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        # the framework's own refusals (unknown route, wrong method, malformed multipart)
        field_name = {404: "url", 405: "method"}.get(error.status_code, "body")
        return error_response(error.status_code, field_name, str(error.detail), headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, error: RequestValidationError):
        first = (error.errors() or [{}])[0]
        location = [str(part) for part in first.get("loc", ()) if part not in ("query", "body", "path")]
        return error_response(400, location[-1] if location else "query", str(first.get("msg", "invalid request")))

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, _error: ClientDisconnect):
        # an aborted upload is the client's doing: one line, no traceback; nobody reads the reply
        logger.info("request %s: client disconnected before its body was read", request.scope.get("eclip.request_id"))
        return error_response(400, "body", "client disconnected")

    @app.exception_handler(Exception)
    async def server_fault(request: Request, error: Exception):
        # a real server fault: logged once here with its request id (RequestGuard then drops the
        # re-raised exception so the server keeps the connection), never a traceback to the client
        request_id = request.scope.get("eclip.request_id")
        logger.error("request %s %s %s failed", request_id, request.method, request.url.path, exc_info=error)
        with contextlib.suppress(AttributeError):
            error._eclip_logged = True  # type: ignore[attr-defined]
        return error_response(500, None, f"internal error (request id {request_id})", request_id)

    @app.get("/health")
    async def health():
        return {"status": "ok", "products": len(service.index), "encoder": service.backend,
                "device": str(service.model.device), "image_size": service.image_size, "auth": settings.api_key is not None}

    @app.api_route("/search", methods=["GET", "POST"])
    async def search(request: Request):
        payload = await Payload.read(request, settings, {"text", "q", "image", "k", "ground", "filters", "mode", "dense_weight",
                                                         "tiles"})
        text = payload.text("text") if payload.has("text") else payload.text("q")
        image = await payload.image("image")
        if text is None and image is None:
            raise ApiError(400, "text", "give a text, an image or both")
        k = payload.integer("k", 10, 1, settings.max_k)
        ground = payload.flag("ground")
        mode = payload.text("mode") or "dense"
        if mode not in ("dense", "lexical", "hybrid"):
            raise ApiError(400, "mode", f"mode must be dense, lexical or hybrid, got {mode!r}")
        if mode != "dense" and text is None:
            raise ApiError(400, "mode", f"mode {mode} needs a text")
        dense_weight = payload.number("dense_weight", DENSE_WEIGHT, *DENSE_WEIGHT_RANGE)
        filters = _filters(payload, settings)
        tiles = payload.integer("tiles", 0, 0, settings.max_tiles)
        if tiles >= 2 and image is None:
            raise ApiError(400, "tiles", "tiles reads an image query: give an image")

        def run():
            start = time.perf_counter()
            try:
                results = service.search(text, image, k, filters, mode, dense_weight, tiles)
                facets = service.searcher.facets(filters)
            except FilterError as error:
                raise ApiError(400, "filters", str(error)) from error
            if ground:
                _ground_results(service, results, text, settings.max_ground, settings.max_pixels)
            return {"query": {"text": text, "image": image is not None, "k": k, "mode": mode, "dense_weight": dense_weight,
                              "filters": filters, "tiles": tiles},
                    "results": results, "facets": facets, "took_ms": round((time.perf_counter() - start) * 1000, 2)}

        return await run_in_threadpool(run)

    @app.post("/embed")
    async def embed(request: Request):
        payload = await Payload.read(request, settings, {"text", "image"})
        texts = payload.texts("text")
        images = await payload.images("image")
        if not texts and not images:
            raise ApiError(400, "text", "give at least one text or image")

        def run():
            out: dict[str, Any] = {}
            if texts:
                out["text_embeddings"] = service.embed_texts(texts).tolist()
            if images:
                out["image_embeddings"] = service.embed_images(images).tolist()
            out["dim"] = len((out.get("text_embeddings") or out["image_embeddings"])[0])
            return out

        return await run_in_threadpool(run)

    @app.post("/classify")
    async def classify(request: Request):
        payload = await Payload.read(request, settings, {"image", "labels", "prompts"})
        image = await payload.image("image", required=True)
        labels = [label for value in payload.texts("labels") for label in _split_labels(value)]
        if len(labels) < 2:
            raise ApiError(400, "labels", "give at least two labels (a list, repeated fields or comma-separated)")
        if len(labels) > settings.max_items or len(set(labels)) != len(labels):
            raise ApiError(400, "labels", f"labels must be distinct, at most {settings.max_items}")
        prompts = payload.texts("prompts") or PROMPTS
        for prompt in prompts:
            check_prompt(prompt)
        if len(labels) * len(prompts) > settings.max_classify_texts:
            raise ApiError(400, "prompts" if payload.has("prompts") else "labels",
                           f"{len(labels)} labels x {len(prompts)} prompts = {len(labels) * len(prompts)} texts to "
                           f"encode; at most {settings.max_classify_texts}")
        return {"labels": await run_in_threadpool(service.classify, image, labels, prompts)}

    @app.post("/ground")
    async def ground(request: Request):
        payload = await Payload.read(request, settings, {"image", "text", "product_id", "image_index"})
        text = payload.text("text", required=True)
        uploaded = await payload.image("image")
        pid = payload.text("product_id")
        image_index = payload.integer("image_index", 0, 0, 1000)
        if uploaded is None and pid is None:
            raise ApiError(400, "image", "give an image or a product_id")

        def run():
            image = uploaded if uploaded is not None else _product_image(service, pid, image_index, settings.max_pixels)
            g = service.ground_many([image], [text])[0]
            heat = g.pop("heatmap")
            return {**g, "heatmap_png": heatmap_png(heat), "image_size": [image.width, image.height]}

        return await run_in_threadpool(run)

    @app.get("/image")
    async def image_file(path: str = ""):
        resolved = await run_in_threadpool(service.resolve_image, path)
        try:
            # read here, not streamed: a file that vanishes or shrinks now is a 404, not a reply cut short
            data = await run_in_threadpool(resolved.read_bytes)
        except OSError as error:
            raise ApiError(404, "path", f"cannot read the image: {error.strerror or error}") from error
        media_type = mimetypes.guess_type(resolved.name)[0] or "application/octet-stream"
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/")
    async def page():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return RequestGuard(app, settings)


def _filters(payload: Payload, settings: ServeSettings) -> dict | list[str] | None:
    """`filters`: a JSON object ({key: value | [values] | {"gte", "lte"}}), or `key=value` /
    `key>=x` / `key<=y` expressions (a JSON list, or repeated form fields)."""
    values = payload.fields.get("filters") or []
    if len(values) == 1 and isinstance(values[0], dict):
        spec: dict | list[str] = values[0]
        size = sum(len(v) if isinstance(v, list) else 1 for v in spec.values())
    elif len(values) == 1 and isinstance(values[0], str) and values[0].lstrip().startswith("{"):
        try:  # a form field holding a JSON object
            spec = json.loads(values[0])
        except ValueError as error:
            raise ApiError(400, "filters", f"filters is not valid JSON: {error}") from error
        size = sum(len(v) if isinstance(v, list) else 1 for v in spec.values()) if isinstance(spec, dict) else 0
    else:
        spec = [payload._check_text("filters", v) for v in values]
        size = len(spec)
    if size > settings.max_items:
        raise ApiError(400, "filters", f"at most {settings.max_items} filters")
    try:
        parse_filters(spec)
    except FilterError as error:
        raise ApiError(400, "filters", str(error)) from error
    return spec or None


def _split_labels(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _product_image(service: SearchService, pid: str, index: int, max_pixels: int) -> Image.Image:
    """A product's catalog photo for /ground. A photo deleted, truncated or replaced since
    indexing is 409 Conflict on `product_id`: the index and the files disagree."""
    try:
        meta = service.index.metadata(pid)
    except (KeyError, IndexError) as error:
        raise ApiError(404, "product_id", f"unknown product {pid!r}") from error
    images = _metadata_images(meta)
    if index >= len(images):
        raise ApiError(400, "image_index", f"product {pid!r} has {len(images)} images")
    try:
        return service.catalog_image(images[index], max_pixels)
    except ApiError as error:
        raise ApiError(409, "product_id", f"image {index} of product {pid!r} ({images[index]}) cannot be used: "
                       f"{error.message}; the catalog changed since indexing (re-embed and re-index it)") from error


def _ground_results(service: SearchService, results: list[dict], text: str | None, limit: int, max_pixels: int) -> None:
    """Adds `box` to the first `limit` results: where the query text (or, for an image query,
    the product's own title) is in the result's shown image. A result whose photo is missing
    or unreadable gets `box: null` and a `warning` saying why."""
    todo, images, texts = [], [], []
    for result in results[:limit]:
        result["box"] = None
        if not result["image"]:
            result["warning"] = "no box: the product has no image"
            continue
        try:
            image = service.catalog_image(result["image"], max_pixels)
        except ApiError as error:
            logger.warning("cannot ground %s: %s", result["product_id"], error.message)
            result["warning"] = f"no box: its image cannot be used ({error.message})"
            continue
        todo.append(result)
        images.append(image)
        texts.append(text or result["title"] or "product")
    if not todo:
        return
    for result, g in zip(todo, service.ground_many(images, texts)):
        result["box"] = g["box"]


# ----------------------------------------------------------------------------- running it


def serve(service: SearchService, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    if host not in LOOPBACK_HOSTS and settings.api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach it can query it", host)
    uvicorn.run(create_app(service, settings), host=host, port=port, log_level="info", access_log=False)

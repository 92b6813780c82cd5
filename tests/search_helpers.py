"""Shared by test_serve.py and test_export.py: a tiny catalog on disk, an index over it, and a
uvicorn server on a free loopback port in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from eclip.data.transforms import normalize, to_uint8_tensor
from eclip_app.search.index import ProductIndex
from eclip_app.search.searcher import Searcher
from eclip_app.search.serve import SearchService

# no magenta anywhere: the page draws its boxes in #ff00ff and the screenshot test counts them
COLOURS = {"red": (200, 30, 30), "blue": (30, 60, 200), "green": (40, 160, 60), "yellow": (230, 210, 40),
           "black": (20, 20, 20), "orange": (240, 140, 20)}
KINDS = ["shirt", "bag", "shoe"]


def make_catalog(folder: Path) -> list[dict]:
    """Products with two 64 px images each (a coloured shape on a grey background); returns
    one metadata row per image, with absolute `image_path`s, as `ProductIndex.build` takes."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    n = 0
    for colour, rgb in COLOURS.items():
        for kind in KINDS:
            pid = f"p{n:03d}"
            for view in range(2):
                image = Image.new("RGB", (64, 64), (180, 180, 180))
                draw = ImageDraw.Draw(image)
                x0, y0 = 8 + 12 * view, 10 + 4 * (n % 4)
                draw.rectangle([x0, y0, x0 + 30, y0 + 36], fill=rgb)
                path = folder / f"{pid}_{view}.png"
                image.save(path)
                rows.append({"product_id": pid, "title": f"{colour} {kind}", "category": kind,
                             "attributes": {"colour": colour}, "image_path": str(path)})
            n += 1
    return rows


def build_index(model, rows: list[dict]) -> ProductIndex:
    images = [Image.open(r["image_path"]).convert("RGB") for r in rows]
    batch = normalize(torch.stack([to_uint8_tensor(im, model.image_size) for im in images]))
    with torch.inference_mode():
        vectors = model.product_embedding(batch).float().numpy()
    meta = [{k: v for k, v in r.items() if k != "product_id"} for r in rows]
    return ProductIndex.build(np.ascontiguousarray(vectors), [r["product_id"] for r in rows], meta, kind="flat")


def make_service(model, folder: Path) -> SearchService:
    return SearchService(Searcher(model, build_index(model, make_catalog(folder))))


class ServerThread:
    """uvicorn on 127.0.0.1, a port the OS picks (the bound socket is handed over: no race)."""

    def __init__(self, app):
        import uvicorn

        # IPPROTO_TCP given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
        # and without it every keep-alive response waits ~40 ms (Nagle + delayed ACK)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

"""Hostile and broken inputs: folder replaces killed at every step, catalogs and CSV tables with
bad bytes and bad records, decompression bombs, bad training configs and interrupted runs."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eclip.atomic import atomic_folder, recover_folder, recover_leftovers

# ----------------------------------------------------------------------------- folder replace

# The child writes `new` over `old` with atomic_folder and SIGKILLs itself before filesystem
# operation number KILL_AT (renames and removals, counted across the whole replace), or, with
# DURING, in the middle of it (a removal that deleted one file, a write that wrote one file).
_CHILD = textwrap.dedent("""
    import importlib.util, os, shutil, signal, sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("atomic", sys.argv[4])  # without the package: no torch import
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    target, kill_at, during = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    count = 0

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def counted(real, partial):
        def op(*args, **kwargs):
            global count
            count += 1
            if count == kill_at:
                if during:
                    partial(*args)
                die()
            return real(*args, **kwargs)
        return op

    def remove_one(path, *_):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
        if files:
            files[0].unlink()

    os.replace = counted(os.replace, lambda *a: None)
    shutil.rmtree = counted(shutil.rmtree, remove_one)
    with atomic.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("new")
        if kill_at == 0:  # killed while the new content is half written
            die()
        (tmp / "b.txt").write_text("new")
    print("ops", count)
""")


def _run_child(target: Path, kill_at: int, during: bool = False) -> subprocess.CompletedProcess:
    import eclip.atomic

    return subprocess.run([sys.executable, "-c", _CHILD, str(target), str(kill_at), "1" if during else "0", eclip.atomic.__file__],
                          capture_output=True, text=True)


def _content(folder: Path) -> str:
    texts = {p.name: p.read_text() for p in folder.iterdir()}
    assert sorted(texts) == ["a.txt", "b.txt"], texts  # whole: nothing missing, nothing extra
    assert len(set(texts.values())) == 1, texts  # never a mix of old and new
    return texts["a.txt"]


def _old_folder(parent: Path) -> Path:
    target = parent / "model"
    target.mkdir(parents=True)
    (target / "a.txt").write_text("old")
    (target / "b.txt").write_text("old")
    return target


def test_folder_replace_killed_at_every_step_loads_old_or_new(tmp_path):
    """SIGKILL before (and in the middle of) each rename and removal of a folder replace: the
    next load finds the old or the new folder, whole, and no leftover stays behind."""
    clean = _run_child(_old_folder(tmp_path / "clean"), kill_at=-1)
    assert clean.returncode == 0, clean.stderr
    ops = int(clean.stdout.split()[-1])
    assert ops >= 4  # the renames and removals of a replace
    assert _content(tmp_path / "clean" / "model") == "new"
    seen = []
    for kill_at in range(0, ops + 1):
        for during in (False, True):
            target = _old_folder(tmp_path / f"k{kill_at}{'d' if during else ''}")
            result = _run_child(target, kill_at, during)
            assert result.returncode == -signal.SIGKILL, (kill_at, result.stderr)
            recover_folder(target)
            seen.append(_content(target))
            assert sorted(p.name for p in target.parent.iterdir()) == ["model"], (kill_at, during)
    assert {"old", "new"} == set(seen)  # some kills come before the new content is complete, some after


def test_model_folder_survives_a_kill_between_the_renames(tmp_path):
    """The case the issue saw: `model` renamed away, the new one not yet in place; loading the
    model finishes the swap."""
    import torch

    from eclip.io import load_model, save_model
    from eclip.model import ECLIP

    from .conftest import micro_config

    torch.manual_seed(0)
    first, second = ECLIP(micro_config()), ECLIP(micro_config())
    folder = save_model(first, tmp_path / "model")
    save_model(second, tmp_path / "staged")
    os.replace(tmp_path / "staged", tmp_path / ".model.new")  # step 2 done
    os.replace(folder, tmp_path / ".model.old")  # step 3 done, killed before step 4
    loaded = load_model(folder)
    torch.testing.assert_close(loaded.state_dict()["decoder.queries"], second.state_dict()["decoder.queries"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_recovery_restores_old_and_spares_a_live_writer(tmp_path):
    target = _old_folder(tmp_path)
    os.replace(target, tmp_path / ".model.old")  # a replace of an earlier version killed mid-swap
    dead = tmp_path / ".model.tmpabcd1234"  # its unfinished temporary folder (no pid: dead)
    dead.mkdir()
    live = tmp_path / f".model.tmp{os.getpid()}.abcd1234"  # a writer at work in this process
    live.mkdir()
    assert recover_leftovers(tmp_path) == [target]
    assert _content(target) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model"]


def test_atomic_folder_that_raises_leaves_the_target(tmp_path):
    target = _old_folder(tmp_path)
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("half-way")
    assert _content(target) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ----------------------------------------------------------------------------- catalogs


def _png(path: Path, size=(16, 12)) -> str:
    from PIL import Image

    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path.name


def _bomb(path: Path, width: int = 11_000, height: int = 11_000) -> Path:
    """A PNG whose header says width x height (121 megapixels) with only a few rows of data: if
    anything decoded it, it would fail as truncated, not as too large."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def _record(pid, **fields) -> str:
    import json

    return json.dumps({"product_id": pid, "title": f"Acme item {pid}", "images": ["a.png"], **fields})


def test_catalog_bad_bytes_cost_one_line_and_a_bom_costs_nothing(tmp_path):
    from eclip.data import load_catalog

    _png(tmp_path / "a.png")
    good = [_record(f"p{i}") for i in range(4)]
    data = ("\ufeff" + good[0] + "\n").encode() + good[1].encode() + b"\n"
    latin1 = b'{"product_id": "p9", "title": "Caf\xe9 latin-1 tee", "images": ["a.png"]}\n'  # one latin-1 byte
    data += latin1
    data += b'{"product_id": \n'  # not JSON
    data += (good[2] + "\r\n" + good[3] + "\n").encode()
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(data)
    products, report = load_catalog(path)
    assert [p.product_id for p in products] == ["p0", "p1", "p2", "p3"]  # the BOM did not cost p0
    assert dict(report.skipped) == {"undecodable line": 1, "malformed line": 1}
    column = latin1.index(bytes([0xE9])) + 1
    assert report.problems[0] == f"{path}:3: not utf-8 (byte 0xe9 at column {column}); a catalog is UTF-8"
    assert report.problems[1].startswith(f"{path}:4: malformed JSON")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_catalog_in_utf16_is_read_and_without_a_mark_refused(tmp_path, encoding):
    from eclip.data import CatalogError, load_catalog

    _png(tmp_path / "a.png")
    text = "\n".join([_record("p1"), _record("p2", title="Théâtre tee ✓")]) + "\n"
    path = tmp_path / "catalog.jsonl"
    bom = {"utf-16-be": b"\xfe\xff"}.get(encoding, b"")  # utf-16 and utf-32 write their own mark
    path.write_bytes(bom + text.encode(encoding))
    products, report = load_catalog(path)
    assert [p.title for p in products] == ["Acme item p1", "Théâtre tee ✓"] and not report.skipped
    path.write_bytes(text.encode("utf-16-le"))  # no byte-order mark
    with pytest.raises(CatalogError, match=r"catalog .*catalog.jsonl: NUL bytes .*UTF-16 without a byte-order mark.*UTF-8"):
        load_catalog(path)


# each breaks the record schema in its own way: (fields, reason, words of the message); a bad
# image entry also costs the product its only image ("no usable image")
WRONG_RECORDS = {
    "box of booleans": ({"images": [{"path": "a.png", "box": [True, False, True, True]}]}, "bad box", "four numbers"),
    "box with NaN": ({"images": [{"path": "a.png", "box": [0, 0, float("nan"), 4]}]}, "bad box", "four numbers"),
    "attributes as a list": ({"attributes": ["red", "cotton"]}, "wrong type", "'attributes' must be an object"),
    "nested attribute": ({"attributes": {"colour": {"r": 1}}}, "wrong type", "'attributes' must be an object"),
    "null id": ({"product_id": None}, "wrong type", "'product_id' must be a string or an integer, not null"),
    "object as id": ({"product_id": {"sku": 1}}, "wrong type", "'product_id' must be a string or an integer"),
    "boolean id": ({"product_id": True}, "wrong type", "'product_id' must be a string or an integer, not true"),
    "list as title": ({"title": ["tee"]}, "wrong type", "'title' must be a string"),
    "images as a string": ({"images": "a.png"}, "wrong type", "'images' must be a non-empty list"),
    "category as an object": ({"category": {"a": 1}}, "wrong type", "'category' must be a string or null"),
    "a list as the line": (None, "malformed line", "a line must be a JSON object, not list"),
    "path with a NUL byte": ({"images": ["a\u0000.png"]}, "unreadable image", "not found"),
}


@pytest.mark.parametrize("case", sorted(WRONG_RECORDS))
def test_records_of_the_wrong_type_are_reported_by_line(tmp_path, case):
    import json

    from eclip.data import load_catalog

    _png(tmp_path / "a.png")
    fields, reason, words = WRONG_RECORDS[case]
    bad = json.dumps([1, 2]) if fields is None else json.dumps({**json.loads(_record("bad")), **fields})
    path = tmp_path / "catalog.jsonl"
    path.write_text("\n".join([_record("p1"), bad, _record(7, category=3, attributes={"size": 42, "sale": True})]) + "\n")
    products, report = load_catalog(path)
    assert [p.product_id for p in products] == ["p1", "7"]  # an integer id is fine, and read as text
    assert products[1].category == "3" and products[1].attributes == {"size": 42, "sale": True}
    image_level = reason in ("bad box", "unreadable image")
    assert report.skipped == ({reason: 1, "no usable image": 1} if image_level else {reason: 1})
    assert any(p.startswith(f"{path}:2: ") and words in p for p in report.problems), report.problems


def test_cli_catalog_validate_reads_a_bad_byte_and_a_bom(tmp_path, capsys):
    from eclip_app.cli import main

    _png(tmp_path / "a.png")
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(("\ufeff" + _record("p1") + "\n").encode() + b'{"product_id": "p2", "title": "\xff"}\n')
    assert main(["-q", "catalog", "validate", str(path)]) == 0
    out = capsys.readouterr()
    assert "1 products, 1 images kept; skipped: 1 undecodable line" in out.out and "Traceback" not in out.err


# ----------------------------------------------------------------------------- decompression bombs


def test_a_121_megapixel_png_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from eclip.data import ImageStore, load_catalog
    from eclip.data.shards import decode_image
    from eclip.data.transforms import ImageTooLarge, load_rgb, open_image

    bomb = _bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 500_000

    def no_decoding(self, *args):
        raise AssertionError("an image over the limit was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLarge, match="11000x11000 pixels is over the limit of 64,000,000"):
        load_rgb(str(bomb))
    with pytest.raises(ImageTooLarge):
        decode_image(bomb.read_bytes(), 32)  # the shard reader's path
    _png(tmp_path / "small.png", (20, 20))
    with pytest.raises(ImageTooLarge, match="20x20 pixels is over the limit of 100"), open_image(tmp_path / "small.png", max_pixels=100):
        pass
    monkeypatch.undo()

    _png(tmp_path / "a.png")
    path = tmp_path / "catalog.jsonl"
    path.write_text(_record("p1") + "\n" + _record("p2", images=["bomb.png", "a.png"]) + "\n" + _record("p3", images=["bomb.png"]) + "\n")
    products, report = load_catalog(path)  # what training reads: the bomb is a counted, skipped image
    assert [len(p.images) for p in products] == [1, 1]
    assert report.skipped == {"image too large": 2, "no usable image": 1}
    store = ImageStore(products, 16)
    assert store.get(1, 0).shape == (3, 16, 16) and not store.failed


def test_every_image_is_opened_through_the_pixel_check():
    """`Image.open` appears only in the helper (and in the service's upload decoder, which
    checks its own, configurable limit before decoding)."""
    src = Path(__file__).resolve().parents[1] / "src"
    openers = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "Image.open(" in p.read_text())
    assert openers == ["eclip/data/transforms.py", "eclip_app/search/serve.py"]


# ----------------------------------------------------------------------------- CSV tables


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "images"
    folder.mkdir(parents=True)
    for i in range(1, 8):
        _png(folder / f"{i}.jpg")
    (tmp_path / "secret.jpg").write_bytes((folder / "1.jpg").read_bytes())  # outside the image root
    return folder


def _table(images: Path, rows: list[str], encoding: str = "utf-8") -> Path:
    path = images.parent / "styles.csv"
    path.write_bytes(("id,productDisplayName\n" + "".join(r + "\n" for r in rows)).encode(encoding))
    return path


def test_csv_in_latin1_costs_its_rows_unless_the_encoding_is_given(images, tmp_path):
    from eclip.data.csv_import import csv_to_catalog

    table = _table(images, ["1,Acme tee", "2,Café tee", "3,Acme cap"], encoding="latin-1")
    report = csv_to_catalog(table, tmp_path / "c.jsonl")
    assert report.products == 2 and report.lines == 3 and dict(report.skipped) == {"undecodable row": 1}
    assert report.problems == [f"{table}:3: not utf-8 (byte 0xe9 at column 6); give the file's encoding if it is not utf-8"]
    report = csv_to_catalog(table, tmp_path / "c.jsonl", encoding="latin-1")
    assert report.products == 3 and not report.skipped
    assert '"Café tee"' in (tmp_path / "c.jsonl").read_text(encoding="utf-8")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_csv_with_a_byte_order_mark_keeps_its_first_column(images, tmp_path, encoding):
    from eclip.data.csv_import import csv_to_catalog

    table = _table(images, ["1,Acme tee", "2,Thé tee"], encoding=encoding)
    report = csv_to_catalog(table, tmp_path / "c.jsonl")
    assert report.products == 2 and not report.skipped


def test_csv_unterminated_quote_is_reported_and_the_rows_after_it_kept(images, tmp_path):
    from eclip.data import load_catalog
    from eclip.data.csv_import import csv_to_catalog

    rows = ['1,Acme tee', '2,"Acme tee, left open', '3,Acme cap', '4,Acme bag']  # open to the end of the file
    report = csv_to_catalog(_table(images, rows), tmp_path / "c.jsonl")
    assert report.lines == 4 and dict(report.skipped) == {"unterminated quote": 1}
    assert report.problems == [f"{images.parent / 'styles.csv'}:3: a quote opened on this line runs over lines 4-5 "
                               "(unexpected end of data); the row is skipped and those lines are read again"]
    products, _ = load_catalog(tmp_path / "c.jsonl")
    assert [p.product_id for p in products] == ["1", "3", "4"]

    # closed two lines later (every swallowed line a row of its own), and a quoted line break
    rows = ['1,Acme tee', '2,"Acme tee', '3,Acme cap', '4,Acme bag"', '5,"Two-line', 'title"', '6,Acme hat']
    report = csv_to_catalog(_table(images, rows), tmp_path / "c.jsonl")
    assert dict(report.skipped) == {"unterminated quote": 1}
    products, _ = load_catalog(tmp_path / "c.jsonl")
    assert [(p.product_id, p.title) for p in products] == [
        ("1", "Acme tee"), ("3", "Acme cap"), ("4", 'Acme bag"'), ("5", "Two-line\ntitle"), ("6", "Acme hat")]


def test_csv_ids_that_leave_the_image_root_are_refused(images, tmp_path):
    from eclip.data.csv_import import csv_to_catalog

    table = _table(images, ["1,Acme tee", "../../secret,Sneaky", "/etc/passwd,Absolute", "a/../../../secret,Deeper"])
    report = csv_to_catalog(table, tmp_path / "c.jsonl", image_template="{id}.jpg", image_root=images)
    assert report.products == 1 and dict(report.skipped) == {"bad image path": 3}
    assert all("leaves" in p and "(refused)" in p for p in report.problems)
    absolute = csv_to_catalog(table, tmp_path / "c.jsonl", image_template=f"{images}/{{id}}.jpg")
    assert absolute.products == 1  # /etc/passwd becomes images/etc/passwd.jpg here: inside, and missing
    assert dict(absolute.skipped) == {"bad image path": 2, "missing image": 1}


@pytest.mark.parametrize(("args", "words"), [
    (["--limit", "-1"], "argument --limit: '-1' is not a positive integer"),
    (["--limit", "many"], "argument --limit: 'many' is not a positive integer"),
    (["--delimiter", ";;"], "argument --delimiter: ';;' is not one character"),
    (["--image-template", "{id!r:>{x}}"], "--image-template: image template '{id!r:>{x}}': a field inside a format spec"),
    (["--image-template", "images/{0}.jpg"], "--image-template: image template 'images/{0}.jpg' uses {0}, but"),
    (["--image-template", "{id:d}.jpg"], "--image-template: image template '{id:d}.jpg': ValueError"),
    (["--image-template", "{id"], "--image-template: image template '{id': expected '}'"),
    (["--encoding", "klingon"], "--encoding: unknown encoding 'klingon'"),
    (["--category-column", "kind"], "--category-column: "),
])
def test_csv_command_mistakes_are_one_line_naming_the_argument(images, tmp_path, capsys, args, words):
    from eclip_app.cli import main

    table = _table(images, ["1,Acme tee"])
    try:
        code = main(["-q", "catalog", "from-csv", str(table), "--out", str(tmp_path / "c.jsonl"), *args])
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    assert "Traceback" not in err and not (tmp_path / "c.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_csv_unwritable_out_is_one_line(images, tmp_path, capsys):
    from eclip_app.cli import main

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["-q", "catalog", "from-csv", str(_table(images, ["1,Acme tee"])), "--out", str(locked / "c.jsonl")]) == 2
    assert "eclip catalog from-csv: --out: cannot write to" in capsys.readouterr().err


def test_csv_out_that_cannot_be_a_file_is_one_line(images, tmp_path, capsys):
    from eclip_app.cli import main

    table = _table(images, ["1,Acme tee"])
    (tmp_path / "file").write_text("")
    for out, words in [(tmp_path, "is a folder"), (tmp_path / "file" / "c.jsonl", "cannot create the folder of")]:
        assert main(["-q", "catalog", "from-csv", str(table), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("eclip catalog from-csv: --out: ") and words in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- eclip train

MICRO = ["--set", "model.vision.image_size=32", "--set", "model.vision.width=32", "--set", "model.vision.depth=1",
         "--set", "model.text.width=32", "--set", "model.text.depth=1", "--set", "model.decoder.width=32",
         "--set", "model.embed_dim=16", "--set", "model.decoder.memory_level=-1", "--set", "products_per_batch=4",
         "--set", "images_per_product=2",
         "--set", "warmup_steps=1", "--set", "log_every=1", "--set", "tensorboard=false"]


@pytest.mark.parametrize(("assignment", "words"), [
    ("steps=0", "TrainConfig.steps must be an integer >= 1, not 0"),
    ("steps=-5", "TrainConfig.steps must be an integer >= 1, not -5"),
    ("checkpoint_every=0", "TrainConfig.checkpoint_every must be an integer >= 1, not 0"),
    ("steps=abc", "TrainConfig.steps must be an integer >= 1, not 'abc'"),
    ("lr=fast", "TrainConfig.lr must be a number > 0, not 'fast'"),
    ("lr=NaN", "TrainConfig.lr must be a number > 0, not nan"),
    ("min_lr_ratio=1.5", "TrainConfig.min_lr_ratio must be a number in [0, 1], not 1.5"),
    ("precision=fp8", "TrainConfig.precision must be one of ('fp32', 'bf16'), not 'fp8'"),
    ("stepz=10", "no field 'stepz'; did you mean steps?"),
    ("model.decoder.depht=1", "no field 'model.decoder.depht'; did you mean depth?"),
    ("steps.every=1", "steps is a value, not a group of fields"),
    ("model_preset=huge", "unknown model preset 'huge'; choose from ['base', 'eclip-lite',"),
    ("objective=siglip", "unknown objective 'siglip'; choose from ['clip', 'eclip']"),
    ("optim.layer_decay=0", "OptimConfig.layer_decay must be a number in (0, 1], not 0"),
    ("optim.unfreeze_last_text_blocks=2", "unfreeze_last_text_blocks=2 needs freeze_text=true"),
])
def test_train_config_mistakes_are_one_line_before_any_work(tmp_path, capsys, assignment, words):
    from eclip_app.cli import main

    out = tmp_path / "run"
    code = main(["-q", "train", "--catalog", str(tmp_path / "missing.jsonl"), "--out", str(out), "--set", assignment])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing ran: the catalog was not even looked for


def test_train_config_file_mistakes_are_one_line(tmp_path, capsys):
    from eclip_app.cli import main

    for text, words in [("steps = 0\n", "TrainConfig.steps must be an integer >= 1, not 0"),
                        ("steps = \n", "config file"), ("[optim]\nlayer_decay = 2\n", "OptimConfig.layer_decay")]:
        (tmp_path / "c.toml").write_text(text)
        assert main(["-q", "train", "--catalog", "x.jsonl", "--config", str(tmp_path / "c.toml")]) == 2
        assert words in capsys.readouterr().err
    assert main(["-q", "train", "--catalog", "x.jsonl", "--config", str(tmp_path / "none.json")]) == 2
    assert "config file" in capsys.readouterr().err


def test_train_on_a_catalog_with_nothing_usable_is_one_line(tmp_path, capsys):
    from eclip_app.cli import main

    (tmp_path / "c.jsonl").write_bytes(b'\xff\xfe{\x00')  # UTF-16 with one character: nothing usable
    assert main(["-q", "train", "--catalog", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "run"), *MICRO]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eclip train: catalog ") and "no usable product left" in err and "Traceback" not in err


def test_sigterm_saves_a_checkpoint_and_exits_143_with_the_resume_command(synth_catalog, tmp_path):
    import time

    import eclip

    out = tmp_path / "run"
    args = ["train", "--catalog", str(synth_catalog["train"]), "--out", str(out), "--no-progress", *MICRO,
            "--set", "steps=100000", "--set", "checkpoint_every=100000"]
    env = {**os.environ, "PYTHONPATH": str(Path(eclip.__file__).parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "eclip_app.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr
    steps = [int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] >= 2
    assert "model saved" not in stdout and not (out / "model").exists()
    assert f"stopped by SIGTERM at step {steps[0]} of 100000" in stderr
    resume = stderr.split("Resume with: ")[1].strip()
    assert resume.startswith("eclip train --catalog ") and resume.endswith("--resume")


def test_truncated_checkpoint_falls_back_and_stale_temporaries_go(synth_catalog, tmp_path, capsys, caplog):
    from eclip_app.cli import main

    out = tmp_path / "run"
    args = ["-q", "train", "--catalog", str(synth_catalog["train"]), "--out", str(out), "--no-progress", *MICRO,
            "--set", "checkpoint_every=2", "--set", "keep_checkpoints=3"]
    assert main([*args, "--set", "steps=4"]) == 0
    checkpoints = out / "checkpoints"
    latest = checkpoints / "step_00000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a disk that filled up
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [checkpoints / f".step_00000006.tmp{dead.stdout.strip()}.abcd1234", checkpoints / ".step_00000006.tmpabcd1234",
             checkpoints / ".tmp_step_x1y2z3"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    assert main([*args, "--set", "steps=6", "--resume"]) == 0
    assert "step_00000004" in caplog.text and "does not read whole" in caplog.text
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    import json
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at step 2: steps 3 and 4 were trained again

    for folder in checkpoints.iterdir():  # every checkpoint damaged: one line, exit 1
        (folder / "train_state.pt").write_bytes(b"")
    capsys.readouterr()
    assert main([*args, "--set", "steps=8", "--resume"]) == 1
    assert "reads whole" in capsys.readouterr().err


def test_train_help_documents_the_exit_codes(capsys):
    from eclip_app.cli import TRAIN_EXIT_CODES, main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text and all(f"  {code} " in text for code in TRAIN_EXIT_CODES)
    assert "143" in text and "SIGTERM" in text

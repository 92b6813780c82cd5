import json
import os
from pathlib import Path

import pytest
from PIL import Image

from eclip.data import CatalogError, load_catalog
from eclip.data.csv_import import csv_to_catalog
from eclip_app.cli import main

# the Myntra sample is read where it lies (a shared/ folder beside the checkout); ECLIP_MYNTRA points elsewhere
MYNTRA = Path(os.environ.get("ECLIP_MYNTRA", Path(__file__).resolve().parents[2] / "shared" / "data" / "myntra"))

# line 1 is the header; every bad row's reason is in its title or id
CSV = """id,gender,subCategory,baseColour,productDisplayName
1,Men,Topwear,Red,Acme Men Red Tee
,Men,Topwear,Blue,no id here
3,Women,Shoes,Black,
4,Women,Shoes,White,"bad "quote
5,Men,Topwear,Green,Acme, Green Tee with a comma
1,Men,Topwear,Red,Acme duplicate of 1
7,Men,Bags,Brown,Acme bag without its image file
"8",Women,"Bags","","Acme Women ""Quoted"" Tote"

9,Unisex,Watches,Silver,Acme Watch
"""


@pytest.fixture()
def table(tmp_path: Path) -> Path:
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i in (1, 3, 4, 5, 8, 9):  # 7 has no image
        Image.new("RGB", (8, 8), (200, 10, 10)).save(images / f"{i}.jpg")
    path = tmp_path / "data" / "styles.csv"
    path.write_text(CSV, encoding="utf-8")
    return path


def test_bad_rows_are_reported_skipped_and_counted(table, tmp_path):
    out = tmp_path / "out" / "catalog.jsonl"
    report = csv_to_catalog(table, out, category_column="subCategory", attribute_columns=["baseColour", "gender"])
    assert report.products == 3 and report.lines == 9
    assert dict(report.skipped) == {
        "missing id": 1, "empty title": 1, "unparseable row": 1, "wrong column count": 1,
        "duplicate id": 1, "missing image": 1,
    }
    lines = {int(p.split(":")[1]) for p in report.problems}
    assert lines == {3, 4, 5, 6, 7, 8}
    assert all(p.startswith(f"{table}:") for p in report.problems)
    assert "3 products written" in report.summary() and "1 duplicate id" in report.summary()

    products, catalog_report = load_catalog(out)
    assert [p.product_id for p in products] == ["1", "8", "9"]
    assert products[0].category == "Topwear" and products[0].attributes == {"baseColour": "Red", "gender": "Men"}
    assert products[1].title == 'Acme Women "Quoted" Tote' and "baseColour" not in products[1].attributes  # empty value dropped
    assert Path(products[2].images[0].path) == (table.parent / "images" / "9.jpg").resolve()
    assert catalog_report.skipped == {}


def test_unknown_column_names_it_and_lists_the_columns(table, tmp_path):
    with pytest.raises(CatalogError, match=r"no column 'colour'.*id, gender, subCategory, baseColour, productDisplayName"):
        csv_to_catalog(table, tmp_path / "c.jsonl", attribute_columns=["colour"])
    with pytest.raises(CatalogError, match=r"uses \{sku\}.*columns are: id, gender"):
        csv_to_catalog(table, tmp_path / "c.jsonl", image_template="images/{sku}.jpg")


def test_relative_paths_limit_and_image_root(table, tmp_path):
    out = tmp_path / "elsewhere" / "deep" / "catalog.jsonl"
    report = csv_to_catalog(table, out, relative_paths=True, limit=2)
    assert report.lines == 2 and report.products == 1
    record = json.loads(out.read_text().splitlines()[0])
    assert not Path(record["images"][0]).is_absolute()
    products, _ = load_catalog(out)  # relative to the catalog's folder, as load_catalog reads it
    assert Path(products[0].images[0].path).resolve() == (table.parent / "images" / "1.jpg").resolve()

    report = csv_to_catalog(table, tmp_path / "r.jsonl", image_template="{id}.jpg", image_root=table.parent / "images")
    assert report.products == 3


def test_cli_from_csv(table, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    code = main(["-q", "catalog", "from-csv", str(table), "--out", str(out), "--category-column", "subCategory",
                 "--attribute-columns", "baseColour,gender"])
    assert code == 0 and "3 products written" in capsys.readouterr().out
    code = main(["-q", "catalog", "from-csv", str(table), "--out", str(out), "--title-column", "name"])
    assert code == 2 and "--id-column/--title-column: " in (err := capsys.readouterr().err) and "no column 'name'" in err


def test_myntra_sample_converts(tmp_path):
    if not (MYNTRA / "styles.csv").is_file():
        pytest.skip(f"Myntra sample not found at {MYNTRA} (styles.csv + images/): nothing to convert")
    out = tmp_path / "myntra.jsonl"
    report = csv_to_catalog(MYNTRA / "styles.csv", out, category_column="subCategory",
                            attribute_columns=["baseColour", "gender", "usage"], limit=50)
    assert report.lines == 50 and report.products + sum(report.skipped.values()) == 50
    assert report.products >= 45
    products, catalog_report = load_catalog(out)  # decodes every image
    assert len(products) == report.products and not catalog_report.skipped
    assert all(p.category and "baseColour" in p.attributes for p in products)

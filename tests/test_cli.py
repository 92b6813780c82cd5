import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from eclip_app.cli import build_parser, main


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple = ()) -> list[tuple[str, ...]]:
    """Every subcommand path the parser knows, e.g. ("catalog", "from-csv")."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*prefix, name), *_subcommands(sub, (*prefix, name))]
    return found


SUBCOMMANDS = _subcommands(build_parser())


def test_the_documented_subcommands_exist():
    expected = {"demo", "train", "eval", "synth", "catalog", "compose", "eval-scenes", "shard",
                "embed", "index", "search", "serve", "export", "push"}
    assert expected <= {words[0] for words in SUBCOMMANDS}
    assert {("catalog", "validate"), ("catalog", "from-csv")} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: eclip " + " ".join(words) in capsys.readouterr().out


def _installed_script(name: str) -> str | None:
    """The console script pip installed next to this interpreter (the venv's bin/ or Scripts/)."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        found = shutil.which(name, path=folder)
        if found:
            return found
    return None


def test_console_script_runs():
    script = _installed_script("eclip")
    if script is None:
        pytest.skip("the package is not installed in this interpreter's environment (pip install -e .)")
    out = subprocess.run([script, "shard", "--help"], capture_output=True, text=True, check=True)
    assert "usage: eclip shard" in out.stdout and "--workers" in out.stdout  # this checkout's code, through the entry point
    out = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "train" in out.stdout


def test_catalog_validate_reports_and_fails_on_empty(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["catalog", "validate", str(bad)]) == 1
    assert "no usable product" in capsys.readouterr().err


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    """The whole demo at a toy size: train both, evaluate, write the report and results."""
    out = tmp_path / "demo"
    busier = ["distractors=[2,4]", "product_scale=[0.3,0.5]"]  # ShopSynth overrides reach the generator
    assert main(["-q", "demo", "--out", str(out), "--products", "40", "--steps", "4", "--no-progress", "--device", "cpu",
                 *[f"--synth={s}" for s in busier]]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("eclip", "clip"):
        for key in ("classification_top1", "text_to_product_r10", "same_product_map_r", "grounding_acc50",
                    "linear_probe_category_top1"):
            assert 0.0 <= results[name][key] <= 1.0
    assert 0 < results["meta"]["peak_memory_gib"] < 4 and results["meta"]["device"] == "cpu"
    # each model folder carries its evaluation and a card with the table and the training run
    model_dir = out / "eclip" / "model"
    assert json.loads((model_dir / "eval_results.json").read_text()) == results["eclip"]
    card = (model_dir / "README.md").read_text()
    assert f"| same_product_map_r | {results['eclip']['same_product_map_r']:.3f} |" in card and "4 steps of" in card
    assert results["meta"]["synth"] == busier
    synth_config = json.loads((out / "data" / "shopsynth.json").read_text())
    assert synth_config["distractors"] == [2, 4] and synth_config["product_scale"] == [0.3, 0.5]
    report = (out / "report.md").read_text()
    assert "| same-product mAP@R |" in report and "grounding.png" in report
    assert "| category linear probe top-1 |" in report and "distractors=[2,4]" in report
    for picture in ("loss_curves.png", "grounding.png"):
        assert (out / picture).stat().st_size > 10_000
    assert "ECLIP - CLIP" in capsys.readouterr().out

    # eval --json on the saved ECLIP model prints the same headline keys
    assert main(["-q", "eval", "--model", str(out / "eclip" / "model"), "--catalog", str(out / "data" / "heldout.jsonl"), "--json", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["same_product_map_r"] == pytest.approx(results["eclip"]["same_product_map_r"])
    # --readout global reads ECLIP's global head: other product embeddings, other numbers
    assert main(["-q", "eval", "--model", str(out / "eclip" / "model"), "--catalog", str(out / "data" / "heldout.jsonl"),
                 "--json", "--no-progress", "--readout", "global"]) == 0
    global_metrics = json.loads(capsys.readouterr().out)
    readout_dependent = ["same_product_map_r", "same_product_r1", "text_to_product_map10", "linear_probe_category_top1"]
    assert any(global_metrics[k] != pytest.approx(metrics[k], abs=1e-9) for k in readout_dependent)
    # grounding reads the attention whatever the readout
    assert global_metrics["grounding_acc50"] == pytest.approx(metrics["grounding_acc50"])
    # --grounding-map changes the map (and its box rule), not the embeddings
    assert main(["-q", "eval", "--model", str(out / "eclip" / "model"), "--catalog", str(out / "data" / "heldout.jsonl"),
                 "--json", "--no-progress", "--grounding-map", "similarity"]) == 0
    similarity_metrics = json.loads(capsys.readouterr().out)
    assert similarity_metrics["same_product_map_r"] == pytest.approx(metrics["same_product_map_r"])
    assert similarity_metrics["grounding_mean_iou"] != pytest.approx(metrics["grounding_mean_iou"], abs=1e-9)


def test_eval_readout_choices_are_the_library_readouts():
    from eclip.config import READOUTS

    eval_parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    readout = next(a for a in eval_parser._actions if a.dest == "readout")
    assert tuple(readout.choices) == READOUTS


def test_train_command_and_resume(tmp_path, synth_catalog, capsys):
    out = tmp_path / "run"
    args = ["-q", "train", "--catalog", str(synth_catalog["train"]), "--out", str(out), "--no-progress",
            "--set", "steps=4", "--set", "checkpoint_every=2", "--set", "products_per_batch=4",
            "--set", "model.vision.image_size=32", "--set", "model.vision.width=32", "--set", "model.text.width=32",
            "--set", "model.decoder.width=32", "--set", "model.embed_dim=16"]
    assert main(args) == 0
    assert (out / "model" / "model.safetensors").is_file()
    assert main([*args, "--resume"]) == 0  # already finished: resumes at step 4, trains nothing
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines][-1] == 4
    assert main(["-q", "train", "--no-progress"]) == 2
    capsys.readouterr()
    assert main(["-q", "train", "--catalog", str(synth_catalog["train"]), "--set", "model.grounding_map=bad"]) == 2
    assert "ModelConfig.grounding_map must be one of ('attention', 'similarity', 'contribution'), not 'bad'" in capsys.readouterr().err


def test_cli_works_without_the_search_extra():
    """faiss is optional (the search extra): training and the rest of the CLI must not need it."""
    code = "import sys; sys.modules['faiss'] = None\nfrom eclip_app.cli import main\nsys.exit(main(['train', '--help']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: eclip train" in out.stdout
    code = "import sys; sys.modules['faiss'] = None\nfrom eclip_app.search import ProductIndex"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "pip install 'eclip[search]'" in out.stderr

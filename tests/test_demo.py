"""The demo's time budget: steps sized from what the machine measures at start."""

import json

import pytest

from eclip_app import demo
from eclip_app.demo import DemoSize, plan_steps, run_demo


def test_plan_steps_keeps_the_default_when_it_fits_and_shrinks_when_not():
    step = {"eclip": 0.2, "clip": 0.1}  # 0.3 s for a step of both arms
    roomy = plan_steps(900, spent_seconds=30, step_seconds=step, eval_seconds=20, default_steps=1800, min_steps=900)
    assert roomy.steps == 1800 and roomy.fits
    assert roomy.expected_seconds == pytest.approx(30 + 2 * 20 + demo.REPORT_SECONDS + 1800 * 0.3)

    tight = plan_steps(600, spent_seconds=30, step_seconds=step, eval_seconds=20, default_steps=1800, min_steps=900)
    assert 900 <= tight.steps < 1800 and tight.fits
    assert tight.expected_seconds <= 600 < tight.expected_seconds + 0.3  # one more step would not fit

    hopeless = plan_steps(100, spent_seconds=30, step_seconds=step, eval_seconds=20, default_steps=1800, min_steps=900)
    assert hopeless.steps == 900 and not hopeless.fits and hopeless.expected_seconds > 100


@pytest.fixture
def toy_demo(monkeypatch):
    """The quick demo at a toy size, with a short probe."""
    monkeypatch.setitem(demo.SIZES, "quick", DemoSize(products=40, steps=12, warmup=2))
    monkeypatch.setattr(demo, "PROBE_STEPS", 6)
    monkeypatch.setattr(demo, "PROBE_LOG_EVERY", 2)
    monkeypatch.setattr(demo, "PROBE_EVAL_PRODUCTS", 4)

    def run(out, budget):
        return run_demo(out, quick=True, progress=False, device="cpu", time_budget_minutes=budget)
    return run


def metrics(results: dict) -> dict:
    return {arm: {k: v for k, v in results[arm].items() if k != "train_seconds"} for arm in ("eclip", "clip")}


def test_a_budget_that_fits_changes_nothing_but_the_time(tmp_path, toy_demo):
    """Timing the steps at start must not move the run: same steps, same metrics and losses."""
    unsized = toy_demo(tmp_path / "unsized", budget=0)
    sized = toy_demo(tmp_path / "sized", budget=60)
    assert unsized["meta"]["time_plan"] is None
    plan = sized["meta"]["time_plan"]
    assert plan["steps"] == plan["default_steps"] == 12 and plan["fits"]
    assert set(plan["step_seconds"]) == {"eclip", "clip"} and all(v > 0 for v in plan["step_seconds"].values())
    assert plan["eval_seconds"] > 0
    assert metrics(sized) == metrics(unsized)
    assert sized["meta"]["steps"] == 12
    assert "budget" in (tmp_path / "sized" / "report.md").read_text()


def test_a_budget_too_small_trains_the_floor_and_says_so(tmp_path, toy_demo, caplog):
    results = toy_demo(tmp_path / "tight", budget=0.001)
    plan = results["meta"]["time_plan"]
    assert plan["steps"] == 6 and not plan["fits"]  # half the default, never fewer
    assert results["meta"]["steps"] == 6
    for arm in ("eclip", "clip"):
        history = [json.loads(line) for line in (tmp_path / "tight" / arm / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in history) == 6
    assert "over the 0.001 min budget" in caplog.text


@pytest.mark.parametrize("budget", [-1.0, float("nan")])
def test_a_bad_budget_is_refused_before_anything_runs(tmp_path, budget):
    with pytest.raises(ValueError, match="time budget"):
        run_demo(tmp_path / "bad", quick=True, progress=False, time_budget_minutes=budget)
    assert not (tmp_path / "bad").exists()

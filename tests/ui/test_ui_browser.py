"""`lorakit ui` driven as a person would, in a real headless Chromium (Debian's chromium + chromium-driver, through
Selenium): launch a run from the form, watch its curve grow, stop it (Ctrl-C semantics), open an adapter, and read
two adapters' answers in the playground, which equal `lorakit generate`'s greedy output.

Screenshots of each page go to the test's tmp folder; with LORAKIT_UI_SCREENSHOTS=1 also to docs/ui/ (the README
shows one), so an ordinary test run leaves the checkout unchanged."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from ui_workspace import make_workspace, running_ui

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "ui"
PROMPT = "the cat and the dog"
MAX_TOKENS = 12


def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        reason = f"no browser: {missing} missing (make setup installs Debian's chromium and chromium-driver)"
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    try:
        import selenium  # noqa: F401
    except ImportError:
        reason = "selenium is not installed (make setup installs it from requirements.lock)"
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)


@pytest.fixture
def browser(tmp_path):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no Selenium Manager download
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout: float = 60.0, every: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # an element not there yet, or replaced while we read it
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(path))
    if os.environ.get("LORAKIT_UI_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS / path.name)
    return path


def lorakit_generate(model: Path, adapters: Path, adapter: str | None) -> str:
    """`lorakit generate PROMPT` (greedy: the default temperature 0), in process."""
    from typer.testing import CliRunner

    from lorakit.cli.main import app

    args = ["generate", PROMPT, "--model", str(model), "--max-new-tokens", str(MAX_TOKENS)]
    if adapter:
        args += ["--adapter", adapter, "--adapters-dir", str(adapters)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_a_person_watches_launches_compares(tmp_path, browser):
    from lorakit.train import TrainConfig, train
    from selenium.webdriver.common.by import By

    ws = make_workspace(tmp_path)
    train(TrainConfig.from_dict({  # a finished run beside the live one, for the overlay and the runs' adapters
        "model": str(ws["model"]), "output_dir": str(ws["runs"] / "short"), "tensorboard": False, "progress": False,
        "data": {"train_file": str(ws["data"]), "eval_fraction": 0.25}, "eval_every": 2, "lora": {"r": 4},
        "optim": {"max_steps": 6, "batch_size": 4, "lr": 1e-2}}))
    d = browser
    find = lambda css: d.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    with running_ui("--runs-dir", str(ws["runs"]), "--adapters-dir", str(ws["adapters"]), "--model", str(ws["model"]),
                    env={"OMP_NUM_THREADS": "1"}) as url:  # the trainer it launches leaves a core to the browser
        # -- Launch: a bad value gets the CLI's message; a good form starts `python -m lorakit train --config`
        d.get(f"{url}/#launch")
        wait_for(lambda: find("#launch-form"), what="the launch form")
        find("input[name=name]").send_keys("live")
        find("input[name='model']").send_keys(str(ws["model"]))
        find("input[name='data.train_file']").send_keys(str(ws["data"]))
        find("input[name='optim.lr']").send_keys("-1")
        find("#launch-form button[type=submit]").click()
        error = wait_for(lambda: find("#launch-error").text, what="the launch error")
        assert "Invalid training config" in error and "optim.lr must be a positive number, got -1" in error, error
        assert not (ws["runs"] / "live").exists()  # nothing written for a rejected form
        screenshot(d, tmp_path, "launch-error")
        find("input[name='optim.lr']").clear()
        find("input[name='optim.lr']").send_keys("0.01")
        find("input[name='optim.max_steps']").send_keys("100000")
        find("input[name='optim.batch_size']").send_keys("2")
        find("textarea[name=more]").send_keys("tensorboard=false\nsave_every=25\nprogress=false")
        find("#launch-form button[type=submit]").click()
        started = wait_for(lambda: find("#launch-result .ok").text, what="the run to start")
        assert "lorakit train --config" in started
        screenshot(d, tmp_path, "launch")
        assert (ws["runs"] / "live" / "launch.yaml").is_file()

        # -- Runs: the live run's curve grows while it trains; several runs overlaid on the overview
        d.get(f"{url}/#runs/live")
        points = lambda: int(find("#charts").get_attribute("data-points") or 0)  # noqa: E731
        first = wait_for(lambda: points() >= 3 and points(), timeout=120, what="the first points of the curve")
        time.sleep(5)
        second = wait_for(lambda: points() > first and points(), timeout=60, what="the curve to grow")
        assert second > first
        assert find("#charts .chart[data-panel=loss] canvas")
        assert "running" in find("#run-head .badge").text
        screenshot(d, tmp_path, "run")
        d.get(f"{url}/#runs")
        wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#charts .chart")) >= 4, what="the overlaid charts")
        rows = {r.get_attribute("data-run"): r.get_attribute("data-status")
                for r in d.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")}
        assert rows == {"live": "running", "short": "finished"}, rows
        legend = find("#charts .chart[data-panel=loss]").text
        assert "live loss" in legend and "short loss" in legend and "short eval_loss" in legend, legend
        screenshot(d, tmp_path, "runs")

        # -- Stop: SIGINT, the trainer checkpoints and exits; the page shows the resume command
        d.get(f"{url}/#runs/live")
        wait_for(lambda: find("#stop"), what="the stop button").click()
        resume = wait_for(lambda: find("#resume-cmd").text, timeout=90, what="the resume command")
        assert resume == f"lorakit train --resume {ws['runs'].resolve() / 'live'}"
        assert "stopped" in find("#run-head .badge").text
        assert list((ws["runs"] / "live" / "checkpoints").iterdir())
        screenshot(d, tmp_path, "run-stopped")

        # -- Adapters: config, base check against the loaded base, per-layer ΔW analysis
        d.get(f"{url}/#adapters")
        ids = wait_for(lambda: [r.get_attribute("data-adapter")
                                for r in d.find_elements(By.CSS_SELECTOR, "#adapters-table tbody tr")],
                       what="the adapters table")
        assert ids == ["alpha", "beta", "run:short/adapter", "run:short/best"], ids
        find("#adapters-table a").click()
        wait_for(lambda: find("#base-match").get_attribute("data-match") == "yes", what="the base check")
        layers = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#layers-table tbody tr"), what="the ΔW table")
        assert len(layers) == 4  # q_proj and v_proj in both layers
        assert find("#adapter-title").text == "alpha"
        screenshot(d, tmp_path, "adapter")

        # -- Playground: base and two adapters side by side, streamed through lorakit serve's engine
        d.get(f"{url}/#playground")
        wait_for(lambda: find("#prompt"), what="the playground")
        find("#prompt").send_keys(PROMPT)
        find("#max_tokens").clear()
        find("#max_tokens").send_keys(str(MAX_TOKENS))
        find("#run").click()
        cards = wait_for(lambda: (c := d.find_elements(By.CSS_SELECTOR, ".answer")) and len(c) == 3
                         and all(x.get_attribute("data-done") == "1" for x in c) and c, what="three answers")
        answers = {c.get_attribute("data-model"): c.find_element(By.CSS_SELECTOR, ".text").text for c in cards}
        screenshot(d, tmp_path, "playground")

        def generate_again() -> dict[str, str]:
            find("#run").click()
            cards = wait_for(lambda: (c := d.find_elements(By.CSS_SELECTOR, ".answer")) and len(c) == 3
                             and all(x.get_attribute("data-done") == "1" for x in c) and c, what="three answers")
            texts = {c.get_attribute("data-model"): c.find_element(By.CSS_SELECTOR, ".text").text for c in cards}
            assert not d.find_elements(By.CSS_SELECTOR, ".answer .error"), texts
            return texts

        find("input[name=mode][value=sample]").click()  # sampled with a seed: the same answers twice
        assert generate_again() == generate_again()
        find("input[name=mode][value=greedy]").click()
        find("#chat").click()  # a conversation: each column keeps its own turns
        assert generate_again() == answers
        generate_again()  # the second turn (the first answer is in the prompt now)
    assert answers["alpha"] and answers["beta"] and answers["alpha"] != answers["beta"], answers
    assert answers["alpha"] == lorakit_generate(ws["model"], ws["adapters"], "alpha")
    assert answers["beta"] == lorakit_generate(ws["model"], ws["adapters"], "beta")
    assert answers["tiny-llama"] == lorakit_generate(ws["model"], ws["adapters"], None)

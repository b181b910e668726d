"""The two pages a person uses, in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by .ci/system-deps.sh; driven with selenium):

- `--ui`: the MLflow UI of a real sqlite store shows the sweep's runs, their
  `val/worst_group_acc` charts, and the compare-runs view of two runs; the URL it prints opens
  on the comparison (the parents' `report/*` metrics and method/target/bias tags as columns,
  sorted by test WGA, trial runs filtered out), and a study's run shows the comparison table
  whole, as its description and as its `report.md`;
- `--annotate`: the SLIM annotation page on a tiny synthetic request, answered by clicks and
  keys, reloaded mid-way, every answer checked in the CSV, the final CSV read back by
  `read_annotations`.

Screenshots go to tests/artifacts/ (or $DEBIAS_TEST_ARTIFACTS); their paths are printed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("DEBIAS_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
INSTALL_HINT = ("run .ci/system-deps.sh (as root or with sudo: it installs Debian's `chromium` "
                "and `chromium-driver`)")


def _find(names: tuple[str, ...], paths: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in paths if os.access(p, os.X_OK)), None)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium under selenium, quit however the test ends. A missing browser
    fails the test (it never skips): the browser is a declared system dependency."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    binary = _find(("chromium", "chromium-browser"), ("/usr/bin/chromium",))
    driver_path = _find(("chromedriver",), ("/usr/bin/chromedriver",
                                            "/usr/lib/chromium/chromedriver"))
    if binary is None or driver_path is None:
        missing = " and ".join(n for n, p in (("chromium", binary),
                                              ("chromedriver", driver_path)) if p is None)
        pytest.fail(f"{missing} not found: the browser tests need a real Chromium; "
                    f"{INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1920,1080", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


@contextlib.contextmanager
def shot_on_failure(driver: Any, name: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            screenshot(driver, f"{name}_failure")
        raise


def wait_until(driver: Any, condition: Callable[[Any], Any], what: str,
               timeout: float = 60) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        condition, f"timed out after {timeout}s waiting for {what}")


def body_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port`` (Linux /proc)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(OSError), open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].split(":")
                if int(hex_port, 16) == port and fields[3] == "0A" and len(address) == width:
                    if width == 8:
                        found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
                    else:
                        found.add(f"ipv6:{address}")
    return found


# ------------------------------------------------------------------------ MLflow UI

RUNS = {"Odd-trial-a": 0.41, "Odd-trial-b": 0.57, "Odd-trial-c": 0.63}


def test_mlflow_ui_shows_runs_and_compare_view(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from debias.ui import experiment_url, start_ui, stop_ui

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(
        "browser_sweep", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_ids = {}
    for name, final in RUNS.items():
        run = client.create_run(experiment_id, run_name=name,
                                tags={"phase": "search", "target_attribute": "Odd"})
        run_ids[name] = run.info.run_id
        client.log_param(run.info.run_id, "train.lr", f"{final / 10:.3f}")
        for step in (1, 2, 3):
            client.log_metric(run.info.run_id, "val/worst_group_acc",
                              final - 0.1 * (3 - step), step=step)
        client.set_terminated(run.info.run_id)

    started = time.monotonic()
    url, handle = start_ui(uri, "browser_sweep", port=0)
    print(f"mlflow server answered after {time.monotonic() - started:.1f}s: {url}")
    pgid = handle.process.pid
    try:
        assert url.startswith(f"http://127.0.0.1:{handle.port}/#/experiments/{experiment_id}")
        assert listening_addresses(handle.port) == {"127.0.0.1"}
        # These runs are MLflow's alone (no debias.role tag, which the comparison view that
        # `url` opens on filters by): the plain runs table.
        url = experiment_url(handle.base_url, experiment_id)
        with chromium() as browser, shot_on_failure(browser, "mlflow_ui"):
            # The runs table of the experiment: every run by name.
            browser.get(url)
            wait_until(browser, lambda d: all(n in body_text(d) for n in RUNS),
                       f"the runs table to list {list(RUNS)}")
            screenshot(browser, "mlflow_runs")

            # Its chart view: one val/worst_group_acc chart with a line per run.
            browser.get(url + "&compareRunsMode=CHART")
            wait_until(browser, lambda d: "val/worst_group_acc" in body_text(d)
                       and all(n in body_text(d) for n in RUNS),
                       "the chart view to show val/worst_group_acc for every run")
            screenshot(browser, "mlflow_charts")

            # The compare-runs view of two runs: names, metric and both final values.
            pair = ["Odd-trial-a", "Odd-trial-c"]
            query = urllib.parse.urlencode(
                {"runs": json.dumps([run_ids[n] for n in pair]),
                 "experiments": json.dumps([experiment_id])}, quote_via=urllib.parse.quote)
            browser.get(f"{handle.base_url}/#/compare-runs?{query}")

            def compared(d: Any) -> bool:
                text = body_text(d)
                return ("val/worst_group_acc" in text and all(n in text for n in pair)
                        and all(f"{RUNS[n]:.2f}" in text for n in pair))

            wait_until(browser, compared, "the compare-runs view of two runs")
            text = body_text(browser)
            assert "Odd-trial-b" not in text.split("Run details", 1)[-1]
            screenshot(browser, "mlflow_compare")
    finally:
        stop_ui(handle)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # the server and its uvicorn workers are all gone


STUDY = {"erm": 0.35, "jtt": 0.60, "groupdro": 0.72}  # test WGA of seed 0, per method


def _study_store(tmp_path: Path) -> tuple[str, str, str]:
    """A study's record as a sweep leaves it: a parent per method with its seeds' runs, the
    report's numbers on the parents, the study run described (the code the sweep runs)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from debias.report import collect, row_metrics
    from debias.tables import describe_study
    from debias.tracking import ROLE_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("study", artifact_location=(tmp_path / "art").as_uri())
    for method, wga in STUDY.items():
        parent = client.create_run(exp, run_name=f"{method}/Odd", tags={
            ROLE_TAG: "parent", "method": method, "target_attribute": "Odd",
            "bias_attribute": "Background", "bias_labels": "none",
            "selection_metric": "val/worst_group_acc"}).info.run_id
        client.log_param(parent, "best.train.lr", "0.048071425018349025")
        for seed in (0, 1, 2):
            run = client.create_run(exp, run_name=f"seeds-{seed}", tags={
                "mlflow.parentRunId": parent, ROLE_TAG: "trial", "phase": "seeds",
                "seed": str(seed)}).info.run_id
            client.log_batch(run, metrics=[Metric("test/worst_group_acc", wga + 0.02 * seed,
                                                  0, 0),
                                           Metric("test/avg_acc", 0.8 + 0.01 * seed, 0, 0)])
            client.set_terminated(run)
        client.set_terminated(parent)
    tracker = Tracker(uri, "study", create=False)
    rows = collect(tracker)
    for row in rows:
        tracker.log_metrics(row.parent_id, row_metrics(row))
    study = tracker.open_study({"sweep": "study"})
    describe_study(tracker, study, rows, ["selection: val/worst_group_acc"], tmp_path)
    return uri, exp, study


def _fully_visible(driver: Any, element: Any) -> bool:
    """The element's box lies inside every scrolling/clipping ancestor's box (not cut off)."""
    return bool(driver.execute_script("""
        const el = arguments[0], box = el.getBoundingClientRect();
        for (let p = el.parentElement; p; p = p.parentElement) {
          const s = getComputedStyle(p);
          if (['auto', 'scroll', 'hidden'].includes(s.overflowX)) {
            const r = p.getBoundingClientRect();
            if (box.left < r.left - 1 || box.right > r.right + 1) return false;
          }
        }
        // Its text fits too (no "..." where it was cut).
        return box.width > 0 && box.right <= window.innerWidth
               && el.scrollWidth <= el.clientWidth + 1;""", element))


def test_mlflow_ui_opens_on_the_comparison(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from debias.ui import COMPARISON_COLUMNS, server_comparison_url, start_ui, stop_ui

    uri, exp, study = _study_store(tmp_path)
    url, handle = start_ui(uri, "study", port=0)
    try:
        assert "viewStateShareKey=" in url
        # A tracking server (here the one just started) gets the same view, saved through
        # its REST API: what `--ui` and the sweep's last line print for an http(s) store.
        assert server_comparison_url(handle.base_url, "study") == url
        with chromium() as browser, shot_on_failure(browser, "mlflow_comparison"):
            browser.set_window_size(2600, 1200)  # the grid renders only the columns in view
            browser.get(url)
            wait_until(browser, lambda d: all(f"{m}/Odd" in body_text(d) for m in STUDY),
                       "the parents in the runs table")

            def headers(d: Any) -> list[str]:
                """The column ids in the order a person sees them (the grid positions its
                header cells absolutely: DOM order is not display order)."""
                cells = d.find_elements(By.CSS_SELECTOR, ".ag-header-cell[col-id]")
                cells.sort(key=lambda c: int(c.get_attribute("aria-colindex") or 0))
                return [c.get_attribute("col-id") for c in cells]

            wait_until(browser, lambda d: set(COMPARISON_COLUMNS) <= set(headers(d)),
                       f"the columns {COMPARISON_COLUMNS}")
            shown = [h for h in headers(browser) if h in COMPARISON_COLUMNS]
            assert shown == list(COMPARISON_COLUMNS)  # in this order: what, then numbers
            rows = [e.text for e in browser.find_elements(
                By.CSS_SELECTOR, ".ag-pinned-left-cols-container .ag-row, "
                                 ".ag-center-cols-container .ag-row")]
            names = [n for n in re.findall(r"\w+/Odd|study|seeds-\d", "\n".join(rows))]
            ordered = [n for n in dict.fromkeys(names) if n.endswith("/Odd")]
            assert ordered == ["groupdro/Odd", "jtt/Odd", "erm/Odd"], names  # best WGA first
            assert not [n for n in names if n.startswith("seeds-")], names  # trials hidden
            screenshot(browser, "mlflow_comparison")

            # The study run: its description is the comparison table, every column shown,
            # on a laptop's screen.
            browser.set_window_size(1366, 900)
            browser.get(f"{handle.base_url}/#/experiments/{exp}/runs/{study}")
            wait_until(browser, lambda d: "Comparison of sweep" in body_text(d),
                       "the study run's description")
            for more in browser.find_elements(By.XPATH, "//*[text()='Show more']"):
                more.click()
            heads = wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "th"),
                               "the description's table")
            texts = [h.text.replace("\n", " ") for h in heads]
            assert texts == ["method", "test WGA %", "test acc %", "Δ WGA", "bias labels"], texts
            assert all(_fully_visible(browser, h) for h in heads), texts
            screenshot(browser, "mlflow_study_description")

            # Its report.md in the artifact viewer: whole, not cut off after a few columns.
            browser.get(f"{handle.base_url}/#/experiments/{exp}/runs/{study}/artifacts/"
                        "report.md")
            heads = wait_until(browser, lambda d: d.find_elements(
                By.CSS_SELECTOR, "th, [role='columnheader']"), "report.md rendered")
            assert [h.text for h in heads] == texts
            assert all(_fully_visible(browser, h) for h in heads), [h.text for h in heads]
            screenshot(browser, "mlflow_study_report")
    finally:
        stop_ui(handle)


# ------------------------------------------------------------------ annotation page

def _read_column(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [row["annotation"] for row in csv.DictReader(handle)]


def _read_ids(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [row["id"] for row in csv.DictReader(handle)]


def _wait_for_url(proc: subprocess.Popen[bytes], log: Path, timeout: float = 420) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = re.search(r"http://127\.0\.0\.1:\d+/", text)
        if found:
            return found.group(0)
        if proc.poll() is not None:
            pytest.fail(f"launch.py --annotate exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"launch.py --annotate printed no URL in {timeout}s:\n"
                f"{log.read_text(errors='replace')[-3000:]}")


def _status(url: str, method: str = "GET", data: bytes | None = None,
            headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_annotation_page_answers_resumes_and_yields_a_valid_csv(tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from debias.slim.annotations import read_annotations
    from debias.spec import load_spec

    csv_path = tmp_path / "ann.csv"
    overrides = ["dataset.image_size=16", "reference.epochs=1", "slim.budget_per_class=3",
                 "slim.annotator=csv", f"slim.annotations={csv_path}", f"storage={tmp_path}",
                 "targets=[Odd]", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    sweep = "sweeps/slim_synthetic.yaml"
    set_args = [a for o in overrides for a in ("--set", o)]
    log = tmp_path / "annotate.log"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "launch.py", sweep, "--annotate", "--port", "0", *set_args],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # As a background job of a non-interactive shell (nohup, `cmd &`) starts it:
            # SIGINT ignored. Ctrl-C (SIGINT below) must still stop the page.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        url = _wait_for_url(proc, log)
        print(f"request built and page served after {time.monotonic() - started:.1f}s: {url}")
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert listening_addresses(port) == {"127.0.0.1"}
        ids = _read_ids(csv_path)
        assert len(ids) == 6 and _read_column(csv_path) == [""] * 6  # 3 per class, unanswered

        # The server refuses what the page never sends.
        assert _status(f"{url}overlay/0") == 200
        assert _status(f"{url}overlay/6") == 404
        assert _status(f"{url}overlay/..%2F..%2F..%2Fetc%2Fpasswd") == 404
        assert _status(f"{url}overlay/../../ann.csv") == 404
        assert _status(f"{url}api/answer", "POST", b"index=0&annotation=1") == 415
        assert _status(f"{url}api/state", headers={"Host": "evil.example"}) == 403
        assert _read_column(csv_path) == [""] * 6

        expected = [""] * 6
        with chromium() as browser, shot_on_failure(browser, "annotate"):

            def page() -> tuple[int, int]:
                body = browser.find_element(By.TAG_NAME, "body")
                return (int(body.get_attribute("data-index")),
                        int(body.get_attribute("data-answered")))

            def load() -> None:
                browser.get(url)
                wait_until(browser, lambda d: d.find_element(By.TAG_NAME, "body")
                           .get_attribute("data-ready") == "1", "the page to load", 30)
                wait_until(browser, lambda d: d.execute_script(
                    "const i = document.getElementById('overlay');"
                    "return i.complete && i.naturalWidth > 0;"), "the overlay image", 30)

            def answer(action: Callable[[], None], index: int, label: int,
                       then: int) -> None:
                """Answer item ``index`` with ``action`` and check the page and the CSV."""
                assert page()[0] == index
                before = page()[1]
                action()
                grows = expected[index] == ""
                expected[index] = str(label)
                n = before + 1 if grows else before
                wait_until(browser, lambda d: page() == (then, n),
                           f"item {index} answered {label}, then item {then}", 30)
                assert _read_column(csv_path) == expected
                assert f"{n} of 6 answered" in browser.find_element(By.ID, "progress").text

            def click(button: str) -> Callable[[], None]:
                return lambda: browser.find_element(By.ID, button).click()

            def key(k: str) -> Callable[[], None]:
                return lambda: ActionChains(browser).send_keys(k).perform()

            load()
            assert page() == (0, 0)
            assert "1 of 6" in browser.find_element(By.ID, "position").text
            assert "core object" in body_text(browser)
            assert not browser.find_element(By.ID, "done").is_displayed()

            answer(click("btn-yes"), 0, 1, then=1)
            answer(key("0"), 1, 0, then=2)
            answer(key("u"), 2, -1, then=3)

            # A closed tab loses nothing: reopening resumes at the first unanswered item.
            load()
            assert page() == (3, 3)
            assert "4 of 6" in browser.find_element(By.ID, "position").text

            # Back to item 2 (its answer is shown), change it; then on to item 3 again.
            key(Keys.ARROW_LEFT)()
            wait_until(browser, lambda d: page() == (2, 3), "the previous item", 10)
            chosen = browser.find_element(By.CSS_SELECTOR, ".answers button.chosen")
            assert chosen.get_attribute("id") == "btn-unsure"
            answer(click("btn-yes"), 2, 1, then=3)

            # Arrows move without answering.
            key(Keys.ARROW_RIGHT)()
            wait_until(browser, lambda d: page() == (4, 3), "the next item", 10)
            key(Keys.ARROW_LEFT)()
            wait_until(browser, lambda d: page() == (3, 3), "the previous item", 10)

            answer(click("btn-no"), 3, 0, then=4)
            screenshot(browser, "annotate_item")
            answer(key("1"), 4, 1, then=5)
            answer(click("btn-unsure"), 5, -1, then=5)

            # All answered: the command that runs the sweep with these annotations.
            wait_until(browser, lambda d: d.find_element(By.ID, "done").is_displayed(),
                       "the final command", 10)
            command = browser.find_element(By.ID, "command").text.strip()
            python, _, rest = command.partition(" launch.py ")
            assert python.endswith("python") and rest == shlex.join([sweep, *set_args])
            screenshot(browser, "annotate_done")
            load()  # reopened when finished: still done, nothing reset
            assert browser.find_element(By.ID, "done").is_displayed() and page()[1] == 6

        labels = read_annotations(csv_path, ids)
        assert labels == dict(zip(ids, [1, 0, 1, 0, 1, -1], strict=True))
        assert not list(tmp_path.glob(".ann.csv.*"))  # no temp file left by the rewrites
        argv = shlex.split(command)[2:]
        spec = load_spec(argv[0], argv[2::2], cwd=REPO)
        assert spec.config["slim"]["annotations"] == str(csv_path)

        proc.send_signal(signal.SIGINT)  # Ctrl-C stops the page cleanly
        assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")[-3000:]
        assert "stopping the annotation page" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

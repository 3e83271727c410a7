"""The web UI in real Chromium (Debian's, headless, driven by Playwright) against ``loraforge webui`` on
127.0.0.1. The scenarios run in order on one server and one runs folder: a bad config and a bad data line
shown at their fields; a tiny-model run whose loss chart grows; a reload and a server restart that find
it still running; stop (a checkpoint) and resume; a finished run chatted with beside the base and
exported. A screenshot of each tab is saved under ``$LORAFORGE_UI_ARTIFACTS`` (default: pytest's temp dir).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from references import require

sync_api = require("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LONG_RUN, SHORT_RUN = "long", "short"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``loraforge webui`` as its own process, so the test can kill it and start it again."""

    def __init__(self, runs: Path, port: int, log: Path):
        self.runs, self.port, self.log = runs, port, log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "loraforge.cli.main", "webui", "--port", str(self.port), "--runs-dir",
                 str(self.runs)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"the web UI did not answer on {self.url}:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("webui")


@pytest.fixture(scope="module")
def artifacts(workdir) -> Path:
    path = Path(os.environ.get("LORAFORGE_UI_ARTIFACTS", workdir / "screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def data(workdir) -> dict[str, Path]:
    good = workdir / "good.jsonl"
    rows = [{"instruction": f"Say {w}", "input": "", "output": f"{w} {w} {w}"} for w in
            ("red", "green", "blue", "cyan", "amber", "olive", "ivory", "coral")]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = workdir / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n{\"instruction\": \"oops\",\n")
    typo = workdir / "typo.yaml"
    typo.write_text("model:\n  source: tiny-llama\ntrain:\n  learnig_rate: 1e-4\n")
    return {"good": good, "bad": bad, "typo": typo}


@pytest.fixture(scope="module")
def server(workdir):
    server = Server(workdir / "runs", free_port(), workdir / "server.log")
    server.start()
    yield server
    if server.process.poll() is None:
        server.kill()
    for launch in (workdir / "runs" / ".launches").glob("*/process.json"):
        pid = json.loads(launch.read_text())["pid"]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (bash scripts/setup.sh test)", pytrace=False)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    open_app(page, server)
    yield page
    page.close()


def open_app(page, server: Server) -> None:
    page.goto(server.url)
    page.wait_for_selector("#start")


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.blur()


def choose(page, elem_id: str, option: str) -> None:
    """Pick ``option`` in a dropdown, in its own options list (the one its input controls)."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    listbox = page.locator(f"[id='{box.get_attribute('aria-controls')}']")
    listbox.get_by_role("option", name=option, exact=True).click()


def text_of(page, elem_id: str) -> str:
    element = page.locator(f"#{elem_id}")
    boxes = element.locator("textarea, input")
    return boxes.first.input_value() if boxes.count() else element.inner_text()


def wait_text(page, elem_id: str, pattern: str, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = text_of(page, elem_id)
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"#{elem_id} never matched {pattern!r}; it reads: {text!r}")


def shot(page, artifacts: Path, name: str) -> None:
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def loss_points(page) -> int:
    return int(re.search(r"(\d+) loss points", wait_text(page, "watch-chart-caption", r"\d+ loss points")).group(1))


def start_run(page, name: str, data: Path, max_steps: int, lr: float) -> None:
    tab(page, "Train")
    choose(page, "model-kind", "tiny-llama")
    fill(page, "data-path", data)
    fill(page, "max-steps", max_steps)
    fill(page, "lr", lr)
    fill(page, "batch-size", 2)
    fill(page, "run-name", name)
    page.click("#start")
    wait_text(page, "train-status", f"Started run {name}")


def run_pid(server: Server, name: str) -> int:
    return json.loads((server.runs / ".launches" / name / "process.json").read_text())["pid"]


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_bad_config_and_bad_data_line_are_shown_at_their_fields(page, data, artifacts):
    page.get_by_text("YAML and CLI").click()
    page.locator("#load-yaml input[type=file]").set_input_files(str(data["typo"]))
    error = wait_text(page, "error-yaml", "learnig_rate")
    assert "typo.yaml:4" in error and "did you mean 'train.lr'" in error

    fill(page, "data-path", data["bad"])
    error = wait_text(page, "error-data", "bad.jsonl:3")
    assert "invalid JSON" in error

    choose(page, "model-kind", "folder")
    fill(page, "model-path", "/no/such/model")
    page.click("#estimate")
    assert "/no/such/model" in wait_text(page, "error-model", "no such model folder")
    for area in ("yaml", "data", "model"):  # each problem stays beside its own field
        assert page.locator(f"#error-{area}").is_visible()
    assert "bad.jsonl:3" in text_of(page, "error-data") and "learnig_rate" in text_of(page, "error-yaml")
    shot(page, artifacts, "train-errors")

    fill(page, "data-path", data["good"])
    wait_text(page, "data-preview", "Say red")
    assert not page.locator("#error-data").is_visible()


def test_estimate_and_yaml_preview(page, data, artifacts):
    choose(page, "model-kind", "tiny-llama")
    page.click("#estimate")
    report = wait_text(page, "estimate-out", "fits", timeout=180)
    assert all(part in report for part in ("weights", "adapter", "optimizer", "activations", "logits"))
    assert not page.locator("#error-model").is_visible()
    assert "source: tiny-llama" in wait_text(page, "yaml-preview", "tiny-llama")
    assert "loraforge train" in text_of(page, "cli-preview")
    shot(page, artifacts, "train")


def test_started_run_draws_a_growing_loss_chart(page, server, data, artifacts):
    start_run(page, LONG_RUN, data["good"], max_steps=100_000, lr=1e-3)
    tab(page, "Watch")
    wait_text(page, "watch-status", f"{LONG_RUN}.*running")
    first = loss_points(page)
    deadline = time.time() + 120
    while loss_points(page) <= first + 2 and time.time() < deadline:
        time.sleep(1)
    assert loss_points(page) > first + 2
    assert re.search(r"step \d+/100000", text_of(page, "watch-status"))
    shot(page, artifacts, "watch")


def test_reload_and_server_restart_reattach_to_the_running_run(page, server, browser):
    pid = run_pid(server, LONG_RUN)
    page.reload()
    page.wait_for_selector("#start")
    tab(page, "Watch")
    wait_text(page, "watch-status", f"{LONG_RUN}.*running")

    server.kill()
    assert alive(pid), "the run died with the web server"
    server.start()
    open_app(page, server)
    tab(page, "Watch")
    wait_text(page, "watch-status", f"{LONG_RUN}.*running.*pid {pid}")
    before = loss_points(page)
    deadline = time.time() + 60
    while loss_points(page) <= before and time.time() < deadline:
        time.sleep(1)
    assert loss_points(page) > before


def test_stop_checkpoints_and_resume_continues(page, server):
    tab(page, "Watch")
    page.click("#stop")
    status = wait_text(page, "watch-status", f"{LONG_RUN}: stopped", timeout=120)
    checkpoint = re.search(r"checkpoint: (checkpoint-(\d+))", status)
    assert checkpoint, status
    folder = server.runs / LONG_RUN / "checkpoints" / checkpoint.group(1)
    assert (folder / "adapter_model.safetensors").is_file() or any(folder.glob("*.safetensors"))
    stopped_at = int(checkpoint.group(2))

    page.click("#resume")
    wait_text(page, "watch-status", f"{LONG_RUN}: running")
    wait_text(page, "watch-log", f"resumed from .*checkpoint-{stopped_at}")
    # stop once the resumed run has stepped (a Ctrl-C while it loads ends it before any new checkpoint)
    deadline = time.time() + 120
    while time.time() < deadline:
        caption = wait_text(page, "watch-chart-caption", r"last at step \d+")
        if int(re.search(r"last at step (\d+)", caption).group(1)) > stopped_at:
            break
        time.sleep(0.5)
    page.click("#stop")
    status = wait_text(page, "watch-status", f"{LONG_RUN}: stopped", timeout=120)
    assert int(re.search(r"checkpoint-(\d+)", status).group(1)) > stopped_at


def test_runs_tab_compares_configs_and_curves(page, server, data, artifacts):
    start_run(page, SHORT_RUN, data["good"], max_steps=12, lr=0.05)
    tab(page, "Watch")
    choose(page, "watch-run", SHORT_RUN)
    wait_text(page, "watch-status", f"{SHORT_RUN}: finished", timeout=240)
    page.reload()
    page.wait_for_selector("#start")
    tab(page, "Runs")
    choose(page, "compare-a", LONG_RUN)
    choose(page, "compare-b", SHORT_RUN)
    diff = wait_text(page, "config-diff", "keys differ")
    differing = page.locator("#config-diff tr.differs").all_inner_texts()
    assert any("train.max_steps" in row for row in differing)
    assert any("train.lr" in row for row in differing)
    assert not any(row.startswith("model.source") for row in differing), diff
    shot(page, artifacts, "runs")


def test_chat_shows_the_adapter_beside_the_base(page, server, artifacts):
    import torch

    from loraforge.adapters import load_adapter
    from loraforge.data.tokenize import prompt_ids
    from loraforge.models import load_model

    tab(page, "Chat")
    choose(page, "chat-a1", SHORT_RUN)
    wait_text(page, "chat-base", "tiny-llama")
    prompt = "Say red"
    fill(page, "chat-prompt", prompt)
    page.click("#chat-send")
    # reference: transformers' greedy generate on the same base, with and without the trained adapter
    model, tokenizer = load_model("tiny-llama")
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": prompt}], "auto")])

    def greedy() -> str:
        out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    base = greedy()
    load_adapter(model, server.runs / SHORT_RUN / "adapter")
    tuned = greedy()
    assert base != tuned, "the adapter should change this greedy reply"
    wait_text(page, "chat-out-1", re.escape(tuned.strip()[:20]) or ".", timeout=180)
    deadline = time.time() + 60
    while (text_of(page, "chat-out-0"), text_of(page, "chat-out-1")) != (base, tuned) and time.time() < deadline:
        time.sleep(0.5)
    assert (text_of(page, "chat-out-0"), text_of(page, "chat-out-1")) == (base, tuned)
    shot(page, artifacts, "chat")


def test_export_writes_a_model_transformers_loads(page, server, workdir, artifacts):
    from transformers import AutoModelForCausalLM

    tab(page, "Export")
    choose(page, "export-run", SHORT_RUN)
    out = workdir / "exported"
    fill(page, "export-out", out)
    page.click("#export-button")
    wait_text(page, "export-result", "Exported to", timeout=240)
    assert "wrote" in text_of(page, "export-progress")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.model_type == "llama"
    shot(page, artifacts, "export")

"""The web UI in real Chromium (Debian's, headless, driven by Playwright) against ``loraforge webui`` on
127.0.0.1: a bad config and a bad data line shown at their fields; the memory estimate; a tiny-model run
started from the page whose loss chart grows; a reload and a server restart that find a run still
running; stop (a checkpoint) and resume; two runs compared; a QLoRA run chatted with beside its base; HF
and GGUF export. Every test builds what it needs (its own run, a fresh page); module-scoped fixtures
train the finished runs once. A screenshot of each tab is saved under ``$LORAFORGE_UI_ARTIFACTS``
(default: pytest's temp dir).
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``loraforge webui`` as its own process, so a test can kill it and start it again."""

    def __init__(self, runs: Path, port: int, log: Path):
        self.runs, self.port, self.log = runs, port, log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

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
def runs_root(workdir) -> Path:
    root = workdir / "runs"
    yield root
    for launch in (root / ".launches").glob("*/process.json"):  # no training process outlives the module
        kill_run(json.loads(launch.read_text())["pid"])


@pytest.fixture(scope="module")
def server(runs_root, workdir):
    server = Server(runs_root, free_port(), workdir / "server.log")
    server.start()
    yield server
    if server.running():
        server.kill()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (bash scripts/setup.sh test)", pytrace=False)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app (the server started again if an earlier test left it down). Ask for it after
    the runs a test needs, so that the page lists them."""
    if not server.running():
        server.start()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    open_app(page, server)
    yield page
    page.close()


def run_config(data: Path, **sections) -> dict:
    config = {"model": {"source": "tiny-llama"}, "data": {"train_files": [str(data)]},
              "train": {"batch_size": 2, "lr": 0.05, "max_steps": 12}}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def launch(runs_root: Path, name: str, config: dict):
    """Start ``loraforge train`` detached, as the Train tab does (``train.runs.start_run``)."""
    from loraforge.config import Config
    from loraforge.train.runs import start_run

    return start_run(Config.from_dict(config), runs_root, name)


def wait_status(runs_root: Path, name: str, status: str, timeout: float = 300):
    from loraforge.train.runs import run_info

    deadline = time.time() + timeout
    while time.time() < deadline:
        info = run_info(runs_root / name)
        if info.status == status:
            return info
        if info.status == "failed":
            break
        time.sleep(0.5)
    raise AssertionError(f"run {name} is {info.status}, not {status}:\n{info.log_tail()}")


def wait_for_steps(runs_root: Path, name: str, steps: int, timeout: float = 180) -> None:
    from loraforge.train.runlog import read_metrics

    deadline = time.time() + timeout
    while time.time() < deadline:
        if sum("loss" in r for r in read_metrics(runs_root / name)) >= steps:
            return
        time.sleep(0.5)
    raise AssertionError(f"run {name} logged fewer than {steps} losses in {timeout} s")


def kill_run(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def running(runs_root, data, request):
    """A long tiny-model run of this test's own, running (killed at the end of the test)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:60]
    info = launch(runs_root, name, run_config(data["good"], train={"max_steps": 100_000, "lr": 1e-3}))
    wait_for_steps(runs_root, name, 1)
    yield name
    from loraforge.train.runs import run_info

    current = run_info(runs_root / name)
    kill_run(current.pid or info.pid)


@pytest.fixture(scope="module")
def lora_run(runs_root, data) -> str:
    launch(runs_root, "lora", run_config(data["good"]))
    wait_status(runs_root, "lora", "finished")
    return "lora"


@pytest.fixture(scope="module")
def qlora_run(runs_root, data) -> str:
    launch(runs_root, "qlora", run_config(data["good"], model={"quantization": {"type": "nf4"}},
                                          train={"lr": 0.02, "max_steps": 10}))
    wait_status(runs_root, "qlora", "finished")
    return "qlora"


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


def watch(page, name: str, status: str) -> None:
    tab(page, "Watch")
    choose(page, "watch-run", name)
    wait_text(page, "watch-status", f"{name}: {status}")


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
    from loraforge.config import Config
    from loraforge.train.memory import estimate_memory

    choose(page, "model-kind", "tiny-llama")
    fill(page, "data-path", data["good"])
    page.click("#estimate")  # before the accordion below opens: a fresh run once found the button moving for 60 s
    report = wait_text(page, "estimate-out", "fits", timeout=180)
    assert all(part in report for part in ("weights", "adapter", "optimizer", "activations", "logits"))
    assert not page.locator("#error-model").is_visible()
    page.get_by_text("YAML and CLI").click()
    wait_text(page, "yaml-preview", "source: tiny-llama")
    assert "loraforge train" in text_of(page, "cli-preview")
    # the page shows the library's estimate of its config: the form's defaults are the schema's
    expected = estimate_memory(Config.from_dict({"model": {"source": "tiny-llama"}}, check_files=False)).report()
    for part in ("weights", "adapter", "activations", "logits"):
        line = next(line for line in expected.splitlines() if line.strip().startswith(part))
        assert line in report.splitlines(), (line, report)
    shot(page, artifacts, "train")


def test_started_run_draws_a_growing_loss_chart(page, server, runs_root, data, artifacts):
    tab(page, "Train")
    choose(page, "model-kind", "tiny-llama")
    fill(page, "data-path", data["good"])
    fill(page, "max-steps", 100_000)
    fill(page, "lr", 1e-3)
    fill(page, "batch-size", 2)
    fill(page, "run-name", "from-the-page")
    page.click("#start")
    wait_text(page, "train-status", "Started run from-the-page")
    try:
        watch(page, "from-the-page", "running")
        first = loss_points(page)
        deadline = time.time() + 120
        while loss_points(page) <= first + 2 and time.time() < deadline:
            time.sleep(1)
        assert loss_points(page) > first + 2
        assert re.search(r"step \d+/100000", text_of(page, "watch-status"))
        shot(page, artifacts, "watch")
    finally:
        kill_run(json.loads((runs_root / ".launches" / "from-the-page" / "process.json").read_text())["pid"])


def test_reload_and_server_restart_reattach_to_the_running_run(running, page, server, runs_root):
    from loraforge.train.runs import run_info

    pid = run_info(runs_root / running).pid
    page.reload()
    page.wait_for_selector("#start")
    watch(page, running, "running")

    server.kill()
    assert alive(pid), "the run died with the web server"
    server.start()
    open_app(page, server)
    watch(page, running, f"running.*pid {pid}")
    before = loss_points(page)
    deadline = time.time() + 60
    while loss_points(page) <= before and time.time() < deadline:
        time.sleep(1)
    assert loss_points(page) > before


def test_stop_checkpoints_and_resume_continues(running, page, runs_root):
    watch(page, running, "running")
    page.click("#stop")
    status = wait_text(page, "watch-status", f"{running}: stopped", timeout=120)
    checkpoint = re.search(r"checkpoint: (checkpoint-(\d+))", status)
    assert checkpoint, status
    folder = runs_root / running / "checkpoints" / checkpoint.group(1)
    assert (folder / "adapter_model.safetensors").is_file() or any(folder.glob("*.safetensors"))
    stopped_at = int(checkpoint.group(2))

    page.click("#resume")
    wait_text(page, "watch-status", f"{running}: running")
    wait_text(page, "watch-log", f"resumed from .*checkpoint-{stopped_at}")
    # stop once the resumed run has stepped (a Ctrl-C while it loads ends it before any new checkpoint)
    deadline = time.time() + 120
    while time.time() < deadline:
        caption = wait_text(page, "watch-chart-caption", r"last at step \d+")
        if int(re.search(r"last at step (\d+)", caption).group(1)) > stopped_at:
            break
        time.sleep(0.5)
    page.click("#stop")
    status = wait_text(page, "watch-status", f"{running}: stopped", timeout=120)
    assert int(re.search(r"checkpoint-(\d+)", status).group(1)) > stopped_at


def test_runs_tab_compares_configs_and_curves(lora_run, qlora_run, page, artifacts):
    tab(page, "Runs")
    choose(page, "compare-a", lora_run)
    choose(page, "compare-b", qlora_run)
    diff = wait_text(page, "config-diff", "keys differ")
    differing = page.locator("#config-diff tr.differs").all_inner_texts()
    for key in ("train.max_steps", "train.lr", "model.quantization"):
        assert any(row.startswith(key) for row in differing), (key, diff)
    assert not any(row.startswith("model.source") for row in differing), diff
    page.wait_for_selector("#compare-chart img")
    shot(page, artifacts, "runs")


def test_chat_shows_a_qlora_adapter_beside_its_base_as_trained(qlora_run, page, runs_root, artifacts):
    import torch

    from loraforge.adapters import load_adapter
    from loraforge.config import Config
    from loraforge.data.tokenize import prompt_ids
    from loraforge.models import load_model
    from loraforge.models.prepare import load_base
    from loraforge.train.runs import run_info

    tab(page, "Chat")
    choose(page, "chat-a1", qlora_run)
    wait_text(page, "chat-base", "tiny-llama")
    prompt = "Say blue"
    fill(page, "chat-prompt", prompt)
    page.click("#chat-send")
    # reference: transformers' greedy generate on the base as the run trained it (nf4), with and without
    # the trained adapter; the dense base answers this prompt differently
    model_config = Config.from_dict(run_info(runs_root / qlora_run).config(), check_files=False).model
    assert model_config.quantization.type == "nf4"
    model, tokenizer = load_base(model_config, torch.device("cpu"))
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": prompt}], "auto")])

    def greedy(model) -> str:
        out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    base = greedy(model)
    load_adapter(model, runs_root / qlora_run / "adapter")
    tuned = greedy(model)
    dense = greedy(load_model("tiny-llama")[0])
    assert base != dense and tuned != base, "the quantization and the adapter should each change this reply"
    deadline = time.time() + 180
    while (text_of(page, "chat-out-0"), text_of(page, "chat-out-1")) != (base, tuned) and time.time() < deadline:
        time.sleep(0.5)
    assert (text_of(page, "chat-out-0"), text_of(page, "chat-out-1")) == (base, tuned)
    assert "nf4" in page.locator("#chat-out-0").inner_text()  # the column says which base answered
    shot(page, artifacts, "chat")


def export_from_the_page(page, run: str, fmt: str, out: Path, gguf_type: str | None = None) -> None:
    tab(page, "Export")
    choose(page, "export-run", run)
    page.locator("#export-format").get_by_text(fmt, exact=True).click()
    # choosing a run or a format fills in that run's default output; wait for it, or it lands after ours
    wait_text(page, "export-out", re.escape("merged.gguf" if fmt == "gguf" else "merged") + "$")
    if gguf_type:
        choose(page, "export-type", gguf_type)
    fill(page, "export-out", out)
    wait_text(page, "export-out", re.escape(str(out)) + "$")
    page.click("#export-button")
    wait_text(page, "export-result", re.escape(f"Exported to {out}") + "$", timeout=240)
    assert "wrote" in text_of(page, "export-progress")


def test_hf_export_writes_a_model_transformers_loads(lora_run, page, workdir, artifacts):
    from transformers import AutoModelForCausalLM

    out = workdir / "exported-hf"
    export_from_the_page(page, lora_run, "hf", out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.model_type == "llama"
    shot(page, artifacts, "export")


def test_gguf_export_writes_a_file_the_gguf_reader_loads(lora_run, page, workdir, runs_root):
    import numpy as np

    gguf = require("gguf")
    peft = require("peft")
    from loraforge.models import tiny_model

    out = workdir / "exported.gguf"
    export_from_the_page(page, lora_run, "gguf", out, gguf_type="f16")
    reader = gguf.GGUFReader(str(out))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    # the merged weights: a projection the adapter trained equals PEFT's merge of the run's adapter, in f16
    merged = peft.PeftModel.from_pretrained(tiny_model("tiny-llama"), runs_root / lora_run / "adapter")
    merged = merged.merge_and_unload()
    value = tensors["blk.0.attn_v.weight"]
    assert value.tensor_type == gguf.GGMLQuantizationType.F16
    expected = merged.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    original = tiny_model("tiny-llama").model.layers[0].self_attn.v_proj.weight.detach().numpy()
    got = np.asarray(value.data, dtype=np.float32).reshape(expected.shape)
    assert np.abs(got - expected).max() < 2e-3 < np.abs(expected - original).max()

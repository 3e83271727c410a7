"""The Chat tab (base and up to two trained adapters answering one prompt side by side, streamed) and the
Export tab (``loraforge export`` of a run as a subprocess, its output streamed as progress)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gradio as gr

from loraforge.adapters.peft_format import AdapterFormatError
from loraforge.config import Config, ModelConfig
from loraforge.export import FORMATS, GGUF_TYPES
from loraforge.export.merge import DTYPES
from loraforge.models.sources import ModelSourceError
from loraforge.train.runs import list_runs, run_info
from loraforge.webui.chat import BASE, ChatSessions

NONE = "(none)"


def adapter_runs(runs_root: Path) -> list[str]:
    return [r.name for r in list_runs(runs_root) if r.adapter_dir]


class ChatTab:
    def __init__(self, runs_root: Path, sessions: ChatSessions):
        self.runs_root, self.sessions = runs_root, sessions

    def build(self) -> None:
        with gr.Row():
            self.first = gr.Dropdown([NONE], value=NONE, label="Adapter 1 (a finished run)", elem_id="chat-a1")
            self.second = gr.Dropdown([NONE], value=NONE, label="Adapter 2", elem_id="chat-a2")
            base = gr.Textbox("default", label="Base model", elem_id="chat-base",
                              info="alone: this source, dense; with adapters: their base, as the run trained it")
            max_tokens = gr.Number(48, label="Max new tokens", precision=0)
        error = gr.Markdown(visible=False, elem_id="error-chat", elem_classes=["field-error"])
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="chat-prompt")
        send = gr.Button("Send to all", variant="primary", elem_id="chat-send")
        with gr.Row():
            outputs = [gr.Textbox(label=label, lines=8, interactive=False, elem_id=f"chat-out-{i}")
                       for i, label in enumerate(("base", "adapter 1", "adapter 2"))]
        for dropdown in (self.first, self.second):
            dropdown.change(self._base_of, [self.first, self.second, base], base)
        send.click(self._send, [base, self.first, self.second, prompt, max_tokens], [*outputs, error])

    def _runs(self, first: str | None, second: str | None) -> list[str]:
        return list(dict.fromkeys(run for run in (first, second) if run and run != NONE))

    def _model_config(self, run: str) -> ModelConfig:
        return Config.from_dict(run_info(self.runs_root / run).config(), check_files=False).model

    def _base_of(self, first: str | None, second: str | None, current: str):
        runs = self._runs(first, second)
        return self._model_config(runs[0]).source if runs else current

    def _send(self, base: str, first: str, second: str, prompt: str, max_tokens: int):
        def fail(message: str):
            return "", "", "", gr.update(value=f"⚠ {message}", visible=True)

        runs = self._runs(first, second)
        adapters, bases = {}, {}
        for run in runs:
            info = run_info(self.runs_root / run)
            if info.adapter_dir is None:
                yield fail(f"run {run!r} has no trained adapter yet")
                return
            adapters[run], bases[run] = info.adapter_dir, self._model_config(run)
        if len({repr(b) for b in bases.values()}) > 1:
            yield fail("the two runs were trained on different bases ("
                       + "; ".join(f"{run}: {_describe(b)}" for run, b in bases.items()) + "); pick runs of one base")
            return
        if not prompt.strip():
            yield fail("write a prompt first")
            return
        model = next(iter(bases.values())) if bases else ModelConfig(source=base.strip() or "default")
        labels = [f"base ({_describe(model)})", *runs, "", ""][:3]
        try:
            for texts in self.sessions.replies(model, adapters, prompt, int(max_tokens)):
                columns = [texts[BASE], *(texts[n] for n in runs), "", ""][:3]
                yield (*(gr.update(value=text, label=label or "(no adapter)") for text, label in zip(columns, labels)),
                       gr.update(value="", visible=False))
        except (ModelSourceError, AdapterFormatError, ValueError) as err:
            yield fail(str(err))


def _describe(model: ModelConfig) -> str:
    """``source``, with the quantization the run trained on (``tiny-llama, nf4 4-bit``)."""
    quant = model.quantization
    if quant is None:
        return model.source
    return f"{model.source}, {'its GGUF blocks' if quant.type == 'gguf' else f'{quant.type} {quant.bits}-bit'}"


class ExportTab:
    def __init__(self, runs_root: Path):
        self.runs_root = runs_root

    def build(self) -> None:
        with gr.Row():
            self.run = gr.Dropdown([], label="Run", elem_id="export-run")
            fmt = gr.Radio(list(FORMATS), value=FORMATS[0], label="Format", elem_id="export-format")
            gguf_type = gr.Dropdown(list(GGUF_TYPES), value=GGUF_TYPES[0], label="GGUF type", elem_id="export-type")
            dtype = gr.Dropdown(list(DTYPES), value="float32", label="HF dtype")
        out = gr.Textbox(label="Output (folder for hf, .gguf file for gguf)", elem_id="export-out")
        error = gr.Markdown(visible=False, elem_id="error-export", elem_classes=["field-error"])
        button = gr.Button("Export", variant="primary", elem_id="export-button")
        progress = gr.Textbox(label="Progress", lines=8, interactive=False, elem_id="export-progress",
                              elem_classes=["mono"])
        result = gr.Markdown(elem_id="export-result")
        self.run.change(self._default_out, [self.run, fmt], out)
        fmt.change(self._default_out, [self.run, fmt], out)
        button.click(self._export, [self.run, fmt, gguf_type, dtype, out], [progress, result, error])

    def _default_out(self, run: str | None, fmt: str) -> str:
        if not run:
            return ""
        return str(self.runs_root / run / ("merged.gguf" if fmt == "gguf" else "merged"))

    def _export(self, run: str | None, fmt: str, gguf_type: str, dtype: str, out: str):
        if not run or run_info(self.runs_root / run).adapter_dir is None:
            yield "", "", gr.update(value="⚠ choose a run that has finished (it has an adapter)", visible=True)
            return
        if not out.strip():
            yield "", "", gr.update(value="⚠ give an output path", visible=True)
            return
        command = [sys.executable, "-u", "-m", "loraforge.cli.main", "export", "--run", str(self.runs_root / run),
                   "--out", out.strip(), "--format", fmt, "--gguf-type", gguf_type, "--dtype", dtype]
        lines: list[str] = [f"$ loraforge export --run {run} --format {fmt} --out {out.strip()}"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            lines.append(line.rstrip().rsplit("\r", 1)[-1])
            yield "\n".join(lines[-40:]), "", gr.update(visible=False)
        code = process.wait()
        if code != 0:
            message = next((ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")), lines[-1])
            yield "\n".join(lines[-40:]), "", gr.update(value=f"⚠ export failed: {message}", visible=True)
            return
        yield "\n".join(lines[-40:]), f"Exported to `{Path(out.strip()).absolute()}`", gr.update(visible=False)

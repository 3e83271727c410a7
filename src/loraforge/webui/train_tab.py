"""The Train tab: model, method, data, hyper-parameters; YAML and CLI preview; save/load; estimate; start."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import yaml

from loraforge.config import (
    Config,
    ConfigError,
    DataConfig,
    QuantizationConfig,
    TrainConfig,
    load_config,
    save_config,
)
from loraforge.data.formats import FORMAT_FIELDS, to_conversations
from loraforge.data.readers import DataError, read_records
from loraforge.models.sources import ModelSourceError
from loraforge.train.memory import EstimateError, estimate_memory, model_architecture
from loraforge.train.runs import RunError, start_run
from loraforge.webui.form import (
    AREAS,
    MODEL_KINDS,
    FormValues,
    choices,
    config_data,
    form_values,
    method_names,
    model_source_help,
    place,
    preview,
    quantization_choices,
    validate,
)

PREVIEW_ROWS = 5
PATH_KINDS = ("folder", "GGUF file")


def error_box(area: str) -> gr.Markdown:
    return gr.Markdown(visible=False, elem_id=f"error-{area}", elem_classes=["field-error"])


def show_errors(errors: dict[str, list[str]], areas: tuple[str, ...] = AREAS) -> list:
    """One update per ``AREAS`` entry: its problems, hidden when it has none, unchanged when not in ``areas``."""
    return [gr.update(value="\n".join(f"⚠ {line}" for line in errors.get(area, [])), visible=bool(errors.get(area)))
            if area in areas else gr.update() for area in AREAS]


FORM_AREAS = tuple(a for a in AREAS if a != "yaml")
"""What checking the form reports on; the YAML area belongs to loading a YAML file."""


class TrainTab:
    def __init__(self, runs_root: Path):
        self.runs_root = runs_root

    def build(self) -> None:
        v = FormValues()
        self.base = gr.State({})
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("### Model")
                model_kind = gr.Dropdown(list(MODEL_KINDS), value=v.model_kind, label="Base model",
                                         info=model_source_help(), elem_id="model-kind")
                model_path = gr.Textbox(label="Folder or .gguf path", value=v.model_path, elem_id="model-path",
                                        placeholder="/models/my-llama or /models/model.Q4_0.gguf",
                                        visible=v.model_kind in PATH_KINDS)
                self.errors = {"model": error_box("model")}
                gr.Markdown("### Method")
                method = gr.Dropdown(method_names(), value=v.method, label="Adapter method", elem_id="method")
                with gr.Row():
                    quantization = gr.Dropdown(quantization_choices(), value=v.quantization,
                                               label="Quantize the base (QLoRA)", elem_id="quantization")
                    bits = gr.Dropdown(choices(QuantizationConfig, "bits"), value=v.bits, label="Bits")
                with gr.Row():
                    r = gr.Number(v.r, label="Rank r", precision=0, elem_id="rank")
                    alpha = gr.Number(v.alpha, label="Alpha")
                    dropout = gr.Number(v.dropout, label="Dropout")
                self.errors["method"] = error_box("method")
            with gr.Column(scale=1):
                gr.Markdown("### Data")
                upload = gr.File(label="Upload a dataset (json, jsonl, csv, parquet)", file_count="single",
                                 type="filepath", height=170, elem_id="data-upload")
                data_path = gr.Textbox(label="…or a path on the server", value=v.data_path, elem_id="data-path")
                with gr.Row():
                    data_format = gr.Dropdown(choices(DataConfig, "format"), value=v.data_format, label="Format",
                                              elem_id="data-format")
                    cutoff_len = gr.Number(v.cutoff_len, label="Cutoff length (tokens)", precision=0)
                columns = gr.Textbox(label="Column mapping (field=column, comma separated)", value=v.columns,
                                     elem_id="columns")
                fields_hint = gr.Markdown(self._fields_hint(v.data_format))
                self.errors["data"] = error_box("data")
                data_preview = gr.Dataframe(label="First rows", interactive=False, wrap=True, max_height=220,
                                            visible=False, elem_id="data-preview")
            with gr.Column(scale=1):
                gr.Markdown("### Training")
                with gr.Row():
                    lr = gr.Number(v.lr, label="Learning rate", elem_id="lr")
                    epochs = gr.Number(v.epochs, label="Epochs")
                    max_steps = gr.Number(v.max_steps, label="Max steps (0 = epochs)", precision=0,
                                          elem_id="max-steps")
                with gr.Row():
                    batch_size = gr.Number(v.batch_size, label="Batch size", precision=0, elem_id="batch-size")
                    grad_accum = gr.Number(v.grad_accum, label="Grad. accumulation", precision=0)
                    save_steps = gr.Number(v.save_steps, label="Save every (0 = end)", precision=0,
                                           elem_id="save-steps")
                with gr.Row():
                    optim = gr.Dropdown(choices(TrainConfig, "optim"), value=v.optim, label="Optimizer")
                    precision = gr.Dropdown(choices(TrainConfig, "precision"), value=v.precision, label="Precision")
                gradient_checkpointing = gr.Checkbox(v.gradient_checkpointing, label="Gradient checkpointing")
                run_name = gr.Textbox(v.run_name, label="Run name", elem_id="run-name")
                self.errors["train"] = error_box("train")
        with gr.Row():
            estimate_button = gr.Button("Estimate memory", elem_id="estimate")
            start_button = gr.Button("Start training", variant="primary", elem_id="start")
        status = gr.Markdown(elem_id="train-status")
        estimate_box = gr.Textbox(label="Memory-fit estimate", lines=11, interactive=False, elem_id="estimate-out",
                                  elem_classes=["mono"])
        with gr.Accordion("YAML and CLI", open=False), gr.Row():
            with gr.Column():
                # no line numbers: CodeMirror draws the gutter for the lines in the browser's viewport only
                yaml_preview = gr.Code(language="yaml", label="Equivalent YAML", interactive=False,
                                       show_line_numbers=False, elem_id="yaml-preview")
            with gr.Column():
                command = gr.Textbox(label="Equivalent commands", lines=3, interactive=False, elem_id="cli-preview")
                save_path = gr.Textbox(label="Save YAML to", value=str(self.runs_root / "config.yaml"),
                                       elem_id="save-path")
                save_button = gr.Button("Save YAML", elem_id="save-yaml")
                load_file = gr.File(label="Load a YAML config", type="filepath", file_types=[".yaml", ".yml"],
                                    height=170, elem_id="load-yaml")
                self.errors["yaml"] = error_box("yaml")

        by_name = {"model_kind": model_kind, "model_path": model_path, "method": method,
                   "quantization": quantization, "bits": bits, "r": r, "alpha": alpha, "dropout": dropout,
                   "data_path": data_path, "data_format": data_format, "columns": columns, "cutoff_len": cutoff_len,
                   "lr": lr, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
                   "grad_accum": grad_accum, "gradient_checkpointing": gradient_checkpointing,
                   "precision": precision, "optim": optim, "save_steps": save_steps, "run_name": run_name}
        fields = [by_name[name] for name in FormValues.names()]
        errors = [self.errors[a] for a in AREAS]
        inputs = [self.base, *fields]

        for field in (*fields, save_path):
            field.change(self._preview, [*inputs, save_path], [yaml_preview, command])
        model_kind.change(lambda kind: gr.update(visible=kind in PATH_KINDS), model_kind, model_path)
        data_format.change(self._fields_hint, data_format, fields_hint)
        for trigger in (data_path.change, data_format.change, columns.change):
            trigger(self._data_preview, [data_path, data_format, columns], [data_preview, self.errors["data"]])
        upload.upload(self._upload, upload, data_path)
        estimate_button.click(self._estimate, inputs, [estimate_box, *errors])
        start_button.click(self._start, inputs, [status, *errors])
        save_button.click(self._save, [*inputs, save_path], [status, *errors])
        load_file.upload(self._load, load_file, [self.base, *fields, *errors])
        self.status = status

    # handlers ------------------------------------------------------------------------------------

    def _config(self, base: dict, values: tuple, check_files: bool) -> tuple[Config | None, dict[str, list[str]]]:
        """The form's config, or every problem by area: the config's keys, the model source (read without
        its weights) and the data files (every line parsed, records checked against the format)."""
        form = FormValues(*values)
        data = config_data(form, base)
        data.setdefault("output", {})["dir"] = str(self.runs_root / form.run_name)
        config, errors = validate(data, check_files=check_files)
        if config is not None:
            try:
                model_architecture(config.model.source)
            except ModelSourceError as err:
                errors.setdefault("model", []).append(str(err))
            if config.data.train_files:
                try:
                    records = read_records(config.data.train_files)
                    to_conversations(records, config.data.format, config.data.columns, None)
                except DataError as err:
                    errors.setdefault("data", []).append(str(err))
        return (None if errors else config), errors

    def _preview(self, base: dict, *values_and_path):
        *values, path = values_and_path
        data = config_data(FormValues(*values), base)
        data.setdefault("output", {})["dir"] = str(self.runs_root / FormValues(*values).run_name)
        return preview(data, path)

    @staticmethod
    def _fields_hint(data_format: str) -> str:
        return f"Fields of *{data_format}*: {', '.join(FORMAT_FIELDS.get(data_format, ()))}"

    @staticmethod
    def _data_preview(path: str, data_format: str, columns: str):
        from loraforge.webui.form import parse_columns

        hidden = gr.update(value=None, visible=False)
        if not path.strip():
            return hidden, gr.update(visible=False)
        try:
            records = read_records(path.strip())
            to_conversations(records, data_format, parse_columns(columns), None)
        except DataError as err:
            return hidden, gr.update(value=f"⚠ {err}", visible=True)
        import pandas as pd

        rows = [{k: _short(v) for k, v in r.fields.items()} for r in records[:PREVIEW_ROWS]]
        return (gr.update(value=pd.DataFrame(rows), visible=True, label=f"First rows of {len(records)}"),
                gr.update(value="", visible=False))

    def _upload(self, temp_path: str | None) -> str:
        if not temp_path:
            return gr.update()
        uploads = self.runs_root / ".uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        target = uploads / Path(temp_path).name
        shutil.copyfile(temp_path, target)
        return str(target)

    def _estimate(self, base: dict, *values):
        config, errors = self._config(base, values, check_files=False)
        if config is None:
            return ["", *show_errors(errors, FORM_AREAS)]
        try:
            report = estimate_memory(config).report()
        except (ModelSourceError, EstimateError) as err:
            return ["", *show_errors({"model": [str(err)]}, FORM_AREAS)]
        return [report, *show_errors({}, FORM_AREAS)]

    def _start(self, base: dict, *values):
        config, errors = self._config(base, values, check_files=True)
        if config is None:
            return ["", *show_errors(errors, FORM_AREAS)]
        try:
            info = start_run(config, self.runs_root, FormValues(*values).run_name)
        except RunError as err:
            return ["", *show_errors({"train": [str(err)]}, FORM_AREAS)]
        return [f"Started run **{info.name}** (pid {info.pid}); follow it in the Watch tab.",
                *show_errors({}, FORM_AREAS)]

    def _save(self, base: dict, *values_and_path):
        *values, path = values_and_path
        config, errors = self._config(base, tuple(values), check_files=False)
        if config is None:
            return ["", *show_errors(errors, FORM_AREAS)]
        save_config(config, path)
        return [f"Saved {path}", *show_errors({}, FORM_AREAS)]

    def _load(self, path: str | None):
        keep = [gr.update()] * (1 + len(FormValues.names()))
        if not path:
            return [*keep, *show_errors({})]
        try:
            load_config(path, check_files=False)
        except ConfigError as err:  # an upload's temporary folder means nothing to the user: name the file
            lines = [line.replace(str(path), Path(path).name) for area in place(err).values() for line in area]
            return [*keep, *show_errors({"yaml": lines})]
        data = yaml.safe_load(Path(path).read_text()) or {}
        values = form_values(data)
        return [data, *[getattr(values, name) for name in FormValues.names()], *show_errors({})]


def _short(value, width: int = 120) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    return text if len(text) <= width else text[: width - 1] + "…"

"""The web UI: five tabs over the library, served by Gradio on 127.0.0.1 with every outgoing connection off
(no analytics, no share link, no web fonts)."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path

import gradio as gr

from loraforge.webui.chat import ChatSessions
from loraforge.webui.chat_export_tabs import NONE, ChatTab, ExportTab, adapter_runs
from loraforge.webui.runs_tabs import RunsTab, WatchTab, run_names
from loraforge.webui.train_tab import TrainTab

CSS = """
.field-error { background: #fef3f2 !important; border: 1px solid #fecdca !important; border-radius: 6px;
               padding: 2px 10px !important; }
.field-error * { color: #b42318 !important; background: transparent !important; border: none !important;
                 white-space: pre-wrap; padding: 0 !important; margin: 0 !important; }
.mono textarea { font-family: ui-monospace, SFMono-Regular, Menlo, monospace !important; font-size: 0.85em; }
table.config-diff { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 0.85em; }
table.config-diff td, table.config-diff th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
table.config-diff tr.differs td { background: #fff4cc; font-weight: 600; }
"""

THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])
"""The default theme without its Google web fonts (no outgoing connections)."""


def build_app(runs_root: str | os.PathLike) -> gr.Blocks:
    root = Path(runs_root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    sessions = ChatSessions()
    with gr.Blocks(title="loraforge", analytics_enabled=False) as app:
        gr.Markdown(f"## loraforge · runs in `{root}`")
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train = TrainTab(root)
                train.build()
            with gr.Tab("Watch", id="watch"):
                watch = WatchTab(root)
                watch.build()
            with gr.Tab("Runs", id="runs"):
                runs = RunsTab(root)
                runs.build()
            with gr.Tab("Chat", id="chat"):
                chat = ChatTab(root, sessions)
                chat.build()
            with gr.Tab("Export", id="export"):
                export = ExportTab(root)
                export.build()

        def reattach():
            """On every page load: the runs on disk, the newest selected (running or not)."""
            names = run_names(root)
            newest = names[0] if names else None
            with_adapter = [NONE, *adapter_runs(root)]
            return (gr.update(choices=names, value=newest), runs._table(),
                    gr.update(choices=names, value=newest), gr.update(choices=names, value=None),
                    gr.update(choices=with_adapter), gr.update(choices=with_adapter),
                    gr.update(choices=[n for n in with_adapter if n != NONE]))

        dropdowns = [watch.run, runs.table, runs.a, runs.b, chat.first, chat.second, export.run]
        app.load(reattach, None, dropdowns)
        # a run started from the Train tab shows up everywhere at once
        train.status.change(reattach, None, dropdowns)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, auth=None, block: bool = True):
    """Serve ``app``; ``auth`` is Gradio's (a (user, password) pair or a function of both)."""
    return app.launch(server_name=host, server_port=port, share=False, auth=auth, prevent_thread_lock=not block,
                      quiet=True, theme=THEME, css=CSS, show_error=False, footer_links=[], ssr_mode=False,
                      enable_monitoring=False, mcp_server=False, pwa=False)

"""``loraforge webui``: the browser UI (see ``loraforge.webui``)."""

from __future__ import annotations

import hmac
import os

from loraforge.cli.main import CommandError


def auth_check(auth: str | None, api_key: str | None):
    """Gradio's ``auth`` for ``--auth user:pass`` and/or an API key (entered as the password, any user name);
    None when neither is set."""
    pairs = []
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise CommandError(f"--auth {auth!r}: expected USER:PASSWORD, e.g. --auth admin:s3cret")
        pairs.append((user, password))
    if not pairs and not api_key:
        return None

    def check(user: str, password: str) -> bool:
        if api_key and hmac.compare_digest(password.encode(), api_key.encode()):
            return True
        return any(hmac.compare_digest(user.encode(), u.encode()) and hmac.compare_digest(password.encode(),
                                                                                           p.encode())
                   for u, p in pairs)

    return check


def webui(host: str, port: int, runs_dir: str, auth: str | None, api_key: str | None) -> None:
    check = auth_check(auth, api_key if api_key is not None else os.environ.get("LORAFORGE_API_KEY"))
    from loraforge.webui.app import build_app, launch

    app = build_app(runs_dir)
    print(f"loraforge web UI on http://{host}:{port} (runs in {os.path.abspath(runs_dir)}); Ctrl-C stops the "
          "server, not the runs")
    launch(app, host, port, check)

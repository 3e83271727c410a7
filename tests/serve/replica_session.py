"""One session against ``loraforge serve --replicas``, run by tests/serve/test_replicas.py inside a loopback-only
network namespace: start the server (the CLI, as a user would), drive it with the official ``openai`` client,
read ``/metrics``, write what it saw to a JSON file, then stop the server with SIGINT.

    python replica_session.py PLAN.json RESULT.json

PLAN: ``{"adapter_dir", "port", "replicas", "adapters_per_replica", "prompts": {model: prompt}, "stream": [model],
"chat": [model], "max_tokens"}``. The requests are sequential, in two rounds over ``prompts``.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not ready within {timeout} s")


def session(plan: dict, url: str) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    result = {"models": [m.id for m in client.models.list().data], "rounds": [], "streams": {}, "chats": {}}
    for _ in range(2):
        texts = {}
        for model, prompt in plan["prompts"].items():
            out = client.completions.create(model=model, prompt=prompt, max_tokens=plan["max_tokens"], temperature=0)
            texts[model] = out.choices[0].text
        result["rounds"].append(texts)
    for model in plan["stream"]:
        chunks = client.completions.create(model=model, prompt=plan["prompts"][model], max_tokens=plan["max_tokens"],
                                           temperature=0, stream=True)
        result["streams"][model] = [c.choices[0].text for c in chunks if c.choices]
    for model in plan["chat"]:
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": plan["prompts"][model]}],
                                             max_tokens=plan["max_tokens"], temperature=0)
        result["chats"][model] = out.choices[0].message.content
    try:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
        result["unknown_model"] = None
    except openai.APIStatusError as err:
        result["unknown_model"] = [err.status_code, err.body]
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        result["metrics"] = response.read().decode()
    return result


def main(plan_path: str, result_path: str) -> int:
    with open(plan_path) as file:
        plan = json.load(file)
    url = f"http://127.0.0.1:{plan['port']}"
    command = [sys.executable, "-m", "loraforge.cli.main", "serve", "--replicas", str(plan["replicas"]),
               "--adapters-per-replica", str(plan["adapters_per_replica"]), "--model", "tiny-llama",
               "--adapter-dir", plan["adapter_dir"], "--port", str(plan["port"]), "--threads", "1", "--pool-gb", "0.05"]
    result = {}
    with open(plan["server_log"], "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            result["ready_s"] = wait_ready(url, server, plan.get("ready_timeout", 300))
            result.update(session(plan, url))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                result["server_exit"] = server.wait(120)  # the server bounds its own shutdown at 2 x 25 s
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                result["server_exit"] = "killed"
            with open(result_path, "w") as out:
                json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

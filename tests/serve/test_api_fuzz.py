"""Fuzz the server with requests generated from its own OpenAPI schema (schemathesis): whatever comes in,
valid for the schema or not, the answer is never a 5xx."""

import shutil

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from loraforge.models import tiny_model, tiny_tokenizer
from loraforge.serve import Engine
from loraforge.serve.api import create_app

from .helpers import ServerThread

KEY = "test-key"
BASE = "tiny-llama"


@pytest.fixture(scope="module")
def served(tmp_path_factory, adapter_dirs):
    """A short-context model (64 positions, so any generation is quick) with adapter r8."""
    root = tmp_path_factory.mktemp("adapter-root")
    shutil.copytree(adapter_dirs["r8"], root / "r8")
    engine = Engine(tiny_model(BASE, max_position_embeddings=64), tiny_tokenizer(), adapters={"r8": root / "r8"},
                    pool_bytes=1 << 22)
    app = create_app(engine, BASE, adapter_root=root, api_key=KEY)
    with ServerThread(app) as server:
        yield server.url, schemathesis.openapi.from_dict(app.openapi())


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(served, mode):
    url, schema = served

    @settings(max_examples=250, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(mode, headers={"Authorization": f"Bearer {KEY}"}),
           model=st.sampled_from([BASE, "r8", None]))
    def check(case, model):
        if model is not None and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model  # reach the engine, not only "no such model"
        response = case.call(base_url=url, timeout=60)
        assert response.status_code < 500, f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"

    check()

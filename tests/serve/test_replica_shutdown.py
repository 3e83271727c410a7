"""Ctrl-C always stops ``serve --replicas``: Ray Serve's and Ray's shutdowns each get a bounded time."""

import threading

from references import require

from loraforge.serve import replicas

ray = require("ray")


class HangingServe:
    release = threading.Event()

    @classmethod
    def shutdown(cls):
        cls.release.wait(30)


class QuickServe:
    @staticmethod
    def shutdown():
        pass


def test_a_shutdown_that_hangs_is_abandoned_after_the_bound_and_ray_still_shut_down(monkeypatch, caplog):
    events = []
    monkeypatch.setattr(replicas, "SHUTDOWN_STEP_TIMEOUT_S", 0.2)
    monkeypatch.setattr(ray, "shutdown", lambda: events.append("ray.shutdown"))
    monkeypatch.setattr(replicas.logging, "shutdown", lambda: events.append("logs flushed"))
    monkeypatch.setattr(replicas.os, "_exit", lambda code: events.append(("exit", code)))
    try:
        replicas._shut_down(HangingServe)
    finally:
        HangingServe.release.set()
    assert events == ["ray.shutdown", "logs flushed", ("exit", 1)]
    assert "Ray Serve's shutdown did not return within 0 s" in caplog.text


def test_a_prompt_shutdown_returns_normally(monkeypatch):
    events = []
    monkeypatch.setattr(ray, "shutdown", lambda: events.append("ray.shutdown"))
    monkeypatch.setattr(replicas.os, "_exit", lambda code: events.append(("exit", code)))
    replicas._shut_down(QuickServe)
    assert events == ["ray.shutdown"]

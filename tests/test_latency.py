"""`compare`'s query-latency column on a scripted clock: warm, each query timed again and again, the best of each
kept and the median over queries reported, with the adapter's own product beside the encoder's time. Once, one timing
per query and their median moved 193 -> 1,025 ms with the machine's load and showed base and adapter equal."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

import adapter.pipeline as pipeline
from adapter.config import Config
from adapter.report import cost_table
from adapter.systems import System

ENCODE_MS = 10.0  # what embedding one query costs on an idle machine
LOAD_MS = 500.0  # what another job on the machine adds to a disturbed call
APPLY_MS = 0.02  # the adapter's product on one vector


class Clock:
    """A clock that moves only when the code under test does something."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1000


def fake_encoder(clock: Clock, disturbed: itertools.cycle) -> SimpleNamespace:
    """A remote-style encoder whose every embed costs ENCODE_MS, plus LOAD_MS on the calls ``disturbed`` marks."""

    def embed(texts, role):
        clock.spend(ENCODE_MS + (LOAD_MS if next(disturbed) else 0.0))
        return np.ones((len(texts), 4), dtype=np.float32) / 2

    return SimpleNamespace(model=None, backend=SimpleNamespace(embed=embed))


class FakeAdapter:
    """Costs APPLY_MS per query vector on the clock; the identity otherwise."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        self.clock.spend(APPLY_MS * len(vectors))
        return vectors

    def tensors(self) -> dict[str, np.ndarray]:
        return {"weight": np.eye(4, dtype=np.float32)}


def test_latency_is_warm_repeated_and_shows_the_adapters_own_cost(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(pipeline, "LATENCY_CLOCK", clock)
    disturbed = itertools.cycle([True, True, False])  # two calls in three hit a busy machine
    enc = fake_encoder(clock, disturbed)
    systems = {"base": System("base", enc, kind="base", source="fake"),
               "adapter": System("adapter", enc, FakeAdapter(clock), kind="adapter", source="in memory")}
    texts = [f"question {i}" for i in range(7)]
    infos = pipeline._costs(systems, texts, repeats=Config().report.latency_repeats)
    # the best of 5 timings of each query is an undisturbed one: the encoder's cost, whatever the load
    assert infos["base"].latency_ms == pytest.approx(ENCODE_MS)
    assert infos["base"].adapter_ms is None
    assert infos["adapter"].adapter_ms == pytest.approx(APPLY_MS)
    assert infos["adapter"].latency_ms == pytest.approx(ENCODE_MS + APPLY_MS)
    comparison = SimpleNamespace(systems=infos)
    table = cost_table(comparison, chunks=10)
    assert "| 10.0 ms |" in table and "| 10.0 ms (adapter 0.020 ms) |" in table

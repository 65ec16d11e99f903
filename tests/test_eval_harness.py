"""lm-eval's model type "ctxpatch": `simple_evaluate(model="ctxpatch", model_args="pretrained=...,patch=...,
target_len=...")` loads, patches at the target and scores what a direct computation on the patched model gives;
`python -m ctxpatch.eval.harness` is lm-eval's command line with it registered."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import ctxpatch
from ctxpatch.eval import TASKS_DIR, data
from ctxpatch.eval.errors import EvalError
from test_eval_fixtures import model_folder, one_thread, text_file, tiny_lm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def tail_perplexity(model, ids: list[int], tail: int) -> float:
    """exp(mean NLL) of the last `tail` tokens of ids with all of ids as context, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()  # (n, vocab)
    return math.exp(float(torch.nn.functional.cross_entropy(logits[-tail - 1 : -1], torch.tensor(ids[-tail:]))))


def test_the_model_type_is_registered():
    from lm_eval.api.registry import get_model

    from ctxpatch.eval.lm import CtxpatchLM

    assert get_model("ctxpatch") is CtxpatchLM


def test_simple_evaluate_patches_at_the_target(model_folder, text_file):  # noqa: F811
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ctxpatch.eval.lm import CtxpatchLM  # noqa: F401  (importing it registers "ctxpatch")

    metadata = {"pretrained": str(model_folder), "lengths": [384], "tail": 24, "text_files": [str(text_file)]}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    results = simple_evaluate(model="ctxpatch", model_args=f"pretrained={model_folder},patch=selfextend,target_len=384",
                              tasks=["ctxpatch_ppl_full"], task_manager=manager, bootstrap_iters=0, log_samples=True,
                              device="cpu")
    sample, = results["samples"]["ctxpatch_ppl_full"]
    context_ids, continuation_ids = data.Encoder(tiny_lm()[1]).pair(sample["doc"]["context"],
                                                                    sample["doc"]["continuation"])
    ids = context_ids + continuation_ids
    model, _ = tiny_lm()
    unpatched = tail_perplexity(model, ids, 24)
    with ctxpatch.apply(model, "selfextend", target_len=384) as patch:
        expected = tail_perplexity(model, ids, 24)
    assert patch.to_dict()["target_len"] == 384 and "group" in patch.to_dict()["methods"][0]["from_target_len"]
    assert sample["384"] == pytest.approx(expected, rel=1e-4)
    assert sample["384"] != pytest.approx(unpatched, rel=1e-3)  # the patch was applied
    assert results["results"]["ctxpatch_ppl_full"]["384,none"] == pytest.approx(expected, rel=1e-4)


def test_without_max_length_or_target_len_it_refuses_before_loading():
    from ctxpatch.eval.lm import CtxpatchLM

    with pytest.raises(EvalError, match="pass max_length=N"):
        CtxpatchLM("/no/such/model", patch="selfextend")


@pytest.mark.slow  # lm-eval's command line indexes its thousands of task configs first: ~30 s here
def test_the_harness_command_line(model_folder, tmp_path, monkeypatch):  # noqa: F811
    from ctxpatch.eval import harness

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "lm_eval", "run", "--model", "ctxpatch", "--model_args",
        f"pretrained={model_folder},patch=window,window=32,max_length=300", "--device", "cpu", "--include_path", str(TASKS_DIR), "--tasks", "ctxpatch_passkey",
        "--metadata", json.dumps({"lengths": [256], "depths": [1.0]}), "--output_path", str(tmp_path / "results"),
    ])
    harness.main()
    written = list((tmp_path / "results").rglob("results_*.json"))
    assert len(written) == 1
    scores = json.loads(written[0].read_text())["results"]["ctxpatch_passkey"]
    assert scores["256,none"] in (0.0, 1.0)

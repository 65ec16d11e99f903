"""Where the evaluated model lives: what reaches from_pretrained for --device / --device-map / --dtype, which device
each process takes under a launcher, that inputs go to the model's device, and that logits_to_keep is decided
once from the forward's signature (an error inside the forward is never retried away). The CUDA paths run here
with mocks: this machine has no GPU."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ctxpatch
import ctxpatch.loading
from ctxpatch.cli import main
from ctxpatch.eval import CtxpatchLM, distributed
from ctxpatch.loading import run as eval_loading
from ctxpatch.eval.distributed import Launch, resolve_device
from ctxpatch.eval.errors import EvalError
from ctxpatch.eval.lm import takes_logits_to_keep
from test_eval_fixtures import model_folder, one_thread, text_file, tiny_lm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- what reaches from_pretrained ------------------------------------------------------------------------------


class FakeWeights(nn.Module):
    """Stands for a model from_pretrained placed on `device` (which this machine may not have)."""

    def __init__(self, device: str):
        super().__init__()
        self.placed_on = torch.device(device)
        self.moved_to = None

    def parameters(self, recurse: bool = True):
        yield SimpleNamespace(device=self.placed_on)

    def to(self, device):
        self.moved_to = torch.device(device)
        return self


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Every from_pretrained call's keywords; the model it returns sits where device_map put it (default cpu)."""
    from transformers import AutoModelForCausalLM

    calls = []

    def fake(source, **kwargs):
        calls.append(kwargs)
        device_map = kwargs.get("device_map")
        return FakeWeights(device_map if isinstance(device_map, str) and device_map != "auto" else "cpu")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    return calls


@pytest.mark.parametrize("device, device_map, dtype, expected", [
    (None, None, None, {"dtype": torch.float32}),  # today's CPU default: float32, no device map
    # "auto" is resolved from the checkpoint (the fixture's is float32) before from_pretrained
    ("cpu", None, "auto", {"dtype": torch.float32, "device_map": "cpu"}),
    ("cpu", None, "bfloat16", {"dtype": torch.bfloat16, "device_map": "cpu"}),
    ("cuda", None, None, {"dtype": torch.float32, "device_map": "cuda"}),  # on a GPU: the checkpoint's dtype
    ("cuda:1", None, "float16", {"dtype": torch.float16, "device_map": "cuda:1"}),
    (None, "auto", None, {"dtype": torch.float32, "device_map": "auto"}),  # accelerate's big-model inference
])
def test_what_reaches_from_pretrained(model_folder, from_pretrained_calls, device, device_map, dtype, expected):  # noqa: F811
    model, _ = eval_loading.load_for_eval(str(model_folder), dtype=dtype, device=device, device_map=device_map)
    assert from_pretrained_calls == [expected]
    assert model.moved_to is None  # loaded in place: no copy through the CPU


def test_a_loader_without_device_map_is_moved_after(model_folder, monkeypatch):  # noqa: F811
    monkeypatch.setattr(eval_loading, "load_model", lambda name, dtype, **kwargs: (FakeWeights("cpu"), None))
    model, _ = eval_loading.load_for_eval(str(model_folder), device="cuda:0")
    assert model.moved_to == torch.device("cuda:0")


def test_a_run_folder_is_loaded_in_place_in_its_own_dtype(model_folder, monkeypatch):  # noqa: F811
    (model_folder / "ctxpatch.json").write_text(json.dumps({"patch": {"spec": "window"}}))
    calls = []

    def fake_load(path, dtype=None, **kwargs):
        calls.append({"dtype": dtype, **kwargs})
        return FakeWeights("cpu" if kwargs.get("device_map") in (None, "auto") else kwargs["device_map"]), None

    monkeypatch.setattr(eval_loading, "load", fake_load)
    eval_loading.load_for_eval(str(model_folder), dtype="auto", device="cuda:1")
    eval_loading.load_for_eval(str(model_folder), dtype="float16", device_map="auto")
    assert calls == [{"dtype": None, "device_map": "cuda:1"},  # None: the dtype the run was trained in
                     {"dtype": "float16", "device_map": "auto"}]


def test_a_bad_dtype_is_a_user_error(model_folder):  # noqa: F811
    with pytest.raises(ctxpatch.UserInputError, match="dtype='float8' must be 'auto' or a floating dtype"):
        eval_loading.load_for_eval(str(model_folder), dtype="float8")


# ---- which device a process takes ------------------------------------------------------------------------------


@pytest.fixture
def with_gpus(monkeypatch):
    monkeypatch.setattr(distributed, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_default_device_is_cuda_when_there_is_one(with_gpus):
    assert resolve_device(None, Launch()) == "cuda"
    assert resolve_device("cuda:1", Launch()) == "cuda:1"


def test_default_device_is_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(distributed, "cuda_available", lambda: False)
    assert resolve_device(None, Launch()) == "cpu"
    with pytest.raises(EvalError, match="no CUDA GPU"):
        resolve_device("cuda", Launch())


def test_each_launched_process_takes_its_local_gpu(with_gpus):
    assert resolve_device("cuda", Launch(rank=3, world_size=4, local_rank=1)) == "cuda:1"
    assert resolve_device(None, Launch(rank=1, world_size=2, local_rank=1)) == "cuda:1"
    with pytest.raises(EvalError, match="every process on one GPU"):
        resolve_device("cuda:1", Launch(rank=0, world_size=2))
    with pytest.raises(EvalError, match="this machine has 2 GPU"):
        resolve_device("cuda:5", Launch())


def test_device_map_is_one_process_and_excludes_device(with_gpus):
    assert resolve_device(None, Launch(), device_map="auto") is None
    with pytest.raises(EvalError, match="pass one"):
        resolve_device("cuda", Launch(), device_map="auto")
    with pytest.raises(EvalError, match="launch one process"):
        resolve_device(None, Launch(rank=0, world_size=2), device_map="auto")


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda:1", "nccl")])
def test_process_group_backend_follows_the_device(monkeypatch, device, backend):
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init", kwargs)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    distributed.join(Launch(rank=1, world_size=2, local_rank=1), device)
    expected = [("init", {"backend": backend, "rank": 1, "world_size": 2})]
    assert calls == ([("set_device", device)] + expected if backend == "nccl" else expected)


def test_cli_passes_device_and_dtype_to_the_loader(model_folder, monkeypatch, with_gpus, tmp_path):  # noqa: F811
    seen = {}

    def fake_load(name, dtype=None, device=None, device_map=None):
        seen.update(dtype=dtype, device=device, device_map=device_map)
        return tiny_lm()  # evaluated on the CPU: what matters is what the loader was asked

    monkeypatch.setattr(ctxpatch.loading, "load_for_eval", fake_load)
    argv = ["eval", "--model", str(model_folder), "--lengths", "256", "--tasks", "passkey", "--depths", "1",
            "--out", str(tmp_path / "out")]
    assert main([*argv, "--device", "cuda", "--dtype", "bfloat16"]) == 0
    assert seen == {"dtype": "bfloat16", "device": "cuda", "device_map": None}
    assert main([*argv, "--device-map", "auto", "--overwrite"]) == 0  # the same --out: its scores start again
    assert seen == {"dtype": None, "device": None, "device_map": "auto"}


def test_cli_refuses_cuda_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "cuda_available", lambda: False)
    assert main(["eval", "--device", "cuda:0", "--lengths", "256", "--tasks", "passkey"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


# ---- inputs on the model's device; logits_to_keep --------------------------------------------------------------


class Wrapped(nn.Module):
    """A causal LM behind a forward of the test's choosing, with what HFLM reads of a model (config, device)."""

    def __init__(self, inner: nn.Module, device: str | None = None):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.reported_device = torch.device(device) if device else inner.device
        self.calls: list[dict] = []

    @property
    def device(self) -> torch.device:
        return self.reported_device

    def tie_weights(self) -> None:
        pass


class Recording(Wrapped):
    def forward(self, input_ids, logits_to_keep=0):
        self.calls.append({"device": input_ids.device, "logits_to_keep": logits_to_keep})
        return SimpleNamespace(logits=torch.zeros(1, logits_to_keep, self.config.vocab_size))


class WithoutLogitsToKeep(Wrapped):
    def forward(self, input_ids):  # all positions' logits
        self.calls.append({"length": input_ids.shape[1]})
        return self.inner(input_ids)


class ReturnsNoCache(Wrapped):
    def forward(self, input_ids, past_key_values=None, use_cache=None, logits_to_keep=0):  # names one, gives none
        self.calls.append({"length": input_ids.shape[1]})
        return SimpleNamespace(logits=self.inner(input_ids, logits_to_keep=logits_to_keep).logits)


def direct_log_likelihood(model, ids: list[int], keep: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) over the last `keep` tokens, in float64: the formula."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()  # (n - 1, vocab)
    log_probs = torch.log_softmax(logits, dim=-1)[-keep:]  # (keep, vocab)
    return float(log_probs.gather(1, torch.tensor(ids[-keep:])[:, None]).sum())


def test_inputs_go_to_the_models_device():
    model, tokenizer = tiny_lm()
    wrapped = Recording(model, device="meta")  # a device without data: the forward sees where inputs were put
    lm = CtxpatchLM(wrapped, tokenizer, max_length=64)
    lm._loglikelihood_tokens([(("a", "b"), [5, 6, 7], [8, 9])])
    assert wrapped.calls == [{"device": torch.device("meta"), "logits_to_keep": 2}]


def test_a_forward_without_logits_to_keep_is_called_without_it():
    model, tokenizer = tiny_lm()
    wrapped = WithoutLogitsToKeep(model)
    assert not takes_logits_to_keep(wrapped) and takes_logits_to_keep(model)
    lm = CtxpatchLM(wrapped, tokenizer, max_length=64)
    ids = list(range(3, 23))
    (log_likelihood, _), = lm._loglikelihood_tokens([(("a", "b"), ids[:15], ids[15:])])
    assert wrapped.calls == [{"length": 19}]
    assert math.isclose(log_likelihood, direct_log_likelihood(model, ids, 5), rel_tol=1e-5)


def test_a_forward_that_returns_no_cache_gets_the_sequence_whole():
    model, tokenizer = tiny_lm()
    wrapped = ReturnsNoCache(model)
    lm = CtxpatchLM(wrapped, tokenizer, max_length=64)
    lm.piece = 8  # pieces first: the forward's answer shows it keeps no cache
    ids = list(range(3, 23))
    (log_likelihood, _), = lm._loglikelihood_tokens([(("a", "b"), ids[:15], ids[15:])])
    assert wrapped.calls == [{"length": 8}, {"length": 19}] and lm.piece is None
    assert math.isclose(log_likelihood, direct_log_likelihood(model, ids, 5), rel_tol=1e-5)


def test_a_type_error_inside_the_forward_propagates_and_is_not_retried():
    model, tokenizer = tiny_lm()
    calls = []

    def broken(module, args, kwargs):  # a bug inside the (patched) forward, e.g. a bad keyword deep down
        calls.append(sorted(kwargs))
        raise TypeError("an error inside the model's forward")

    handle = model.model.register_forward_pre_hook(broken, with_kwargs=True)
    try:
        lm = CtxpatchLM(model, tokenizer, max_length=64)
        with pytest.raises(TypeError, match="inside the model's forward"):
            lm._loglikelihood_tokens([(("a", "b"), [5, 6, 7], [8, 9])])
    finally:
        handle.remove()
    assert len(calls) == 1  # no second, full-vocabulary-logits forward without logits_to_keep

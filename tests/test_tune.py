"""`ctxpatch tune`: the candidate set follows the registry, successive halving keeps the good and drops the bad
(stub scorer), resume equals an uninterrupted run, two processes equal one, tuned.json applies, every error
path, and one tiny end-to-end run with the real scorer."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_eval_fixtures import generated_text, model_folder, one_thread, text_file, tiny_lm  # noqa: F401
from torch.testing import assert_close

import ctxpatch
from ctxpatch import registry
from ctxpatch.cli import main
from ctxpatch.kinds import PositionRule
from ctxpatch.registry import ModelInfo, Param, positive_int
from ctxpatch.tune.candidates import TuneError, build_candidates, parse_candidates
from ctxpatch.tune.schedule import CostModel, Item, depth, parse_budget, plan, round_sizes
from ctxpatch.tune.search import SHORT_LIMIT, Progress, leader_so_far

INFO = ModelInfo(train_len=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=8)
COST = CostModel(a=0.01, b=0.0)  # one second per 100 tokens, patched or not (x1.3)


class StubScorer:
    """Perplexity 10 x (1 + a per-label offset): `better` lower, `worse` far higher; retrieval from the label."""

    def __init__(self, better: str = "", worse: str = "", fail_after: int | None = None):
        self.better, self.worse, self.fail_after = better, worse, fail_after
        self.calls: list[tuple[str, str, int, int]] = []

    def measure(self, candidate, kind, length, index):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        label = candidate.label
        self.calls.append((label, kind, length, index))
        if kind == "native":
            return 10.0
        noise = (zlib.crc32(f"{label}/{kind}/{length}/{index}".encode()) % 1000) / 1000  # [0, 1)
        if kind == "ppl":
            if label == self.better:
                return 10.0 * (1.0 + 0.001 * noise)
            if label == self.worse:
                return 10.0 * (3.0 + noise)
            return 10.0 * (1.005 + 0.01 * noise)
        return 1.0 if label == self.better else float(noise < 0.5)


def stub_run(model, **kwargs):
    defaults = {"target_len": 64, "budget_s": 300, "cost": COST, "progress": False}
    return ctxpatch.tune(model, None, **{**defaults, **kwargs})


# ---- candidates --------------------------------------------------------------------------------------------


@pytest.fixture
def registered_rule():
    @registry.register
    class Shifted(PositionRule):
        """A test rule: registered, it joins the search."""

        name = "test_shifted"
        params = (Param("shift", 1, positive_int, "how far"),)

        @classmethod
        def candidate_grid(cls, info, target_len):
            return [{}, {"shift": 3}]

    @registry.register
    class NeedsTraining(PositionRule):
        """A test rule that needs fine-tuning."""

        name = "test_needs_training"
        training_free = False

    yield Shifted
    del registry._REGISTRY["test_shifted"], registry._REGISTRY["test_needs_training"]


def test_the_default_set_is_the_registrys_training_free_position_rules_alone_and_with_logn(registered_rule):
    cands = build_candidates(None, INFO, 64)
    labels = [c.label for c in cands.candidates]
    assert {"test_shifted", "test_shifted+logn", "test_shifted[shift=3]", "test_shifted[shift=3]+logn"} <= set(labels)
    assert not any("test_needs_training" in x for x in labels)
    considered = labels + [s.label for s in cands.skipped]  # string cannot reach 2L: skipped, with the reason
    for name, cls in registry.registered().items():
        if cls.kind == "position" and cls.training_free:
            assert any(x.split("[")[0].split("+")[0] == name for x in considered), name
        if not cls.training_free:
            assert not any(name in x for x in labels), name
    for name in ("xpos", "alibi", "kerple_log", "kerple_power", "sandwich"):
        assert registry.method_class(name).training_free is False
    after = [c.label for c in build_candidates(None, INFO, 64).candidates]
    assert after == labels  # deterministic order


def test_a_method_unregistered_leaves_the_search():
    labels = [c.label for c in build_candidates(None, INFO, 64).candidates]
    assert not any("test_shifted" in x for x in labels)


def test_refusals_are_skipped_with_the_reason_and_duplicates_measured_once():
    cands = build_candidates(None, INFO, 4 * 32)
    skipped = {s.label: s.reason for s in cands.skipped}
    assert "string" in skipped and "2L - W" in skipped["string"]  # STRING reaches at most 2L - W
    resolved = [repr(r) for r in cands.resolved.values()]
    assert len(resolved) == len(set(resolved))
    assert all(c.label in cands.resolved for c in cands.candidates)


def test_grids_follow_each_methods_rule_and_bounds():
    for length in (32, 192, 8192):
        info = ModelInfo(length, 2, 4, 2, 64, 64)
        for point in registry.method_class("dca").candidate_grid(info, 4 * length):
            if point:
                w, s = point["local_window"], point["chunk_len"]
                assert 0 < w < s and s + w < length
        target = 4 * length
        for point in registry.method_class("selfextend").candidate_grid(info, target):
            rule = registry.method("selfextend", **point).resolve(info, target)
            assert rule.widest(target, rule.group) < length or "group" in point  # the rule reaches the target
        factors = [p.get("factor") for p in registry.method_class("yarn").candidate_grid(info, target)]
        assert factors == [None, 6.0, 8.0]  # the rule (T / L = 4), 1.5x and 2x
        for point in registry.method_class("retrieval").candidate_grid(info, target):
            r = registry.method("retrieval", **point).resolve(info, target)
            assert 0 < r.local_window < length  # keys past the window are seen at distance W < L
            assert r.sinks + r.local_window + r.top_k * r.block_size <= length  # never more keys than in training


def test_narrowed_and_widened_candidate_lists():
    labels = [c.label for c in build_candidates("dca,selfextend[group=16],yarn", INFO, 64).candidates]
    assert "selfextend[group=16]" in labels and "selfextend" not in labels
    assert labels[0] == "dca" and "yarn" in labels and "yarn[factor=4]" in labels
    assert not any("logn" in x for x in labels)
    wide = [c.label for c in build_candidates("default,logn+window", INFO, 64).candidates]
    assert "logn+window" in wide and "selfextend+logn" in wide
    assert parse_candidates("selfextend[window=8,group=4]+logn") == [[("selfextend", {"window": 8, "group": 4}),
                                                                       ("logn", None)]]


@pytest.mark.parametrize("text, message", [
    ("selfextnd", "Did you mean 'selfextend'?"),
    ("none", "baseline"),
    ("yarn[factor]", "not key=value"),
    ("yarn[factor=2", "unbalanced"),
])
def test_bad_candidate_lists_are_errors(text, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("[", r"\[")):
        parse_candidates(text)


# ---- schedule -----------------------------------------------------------------------------------------------


def test_schedule_is_fixed_by_its_inputs_and_fits_the_budget():
    cost = CostModel(1e-4, 1e-9)
    one = plan(40, 8192, 32768, ["ppl", "passkey"], cost, 3 * 3600)
    two = plan(40, 8192, 32768, ["ppl", "passkey"], cost, 3 * 3600)
    assert one.to_dict() == two.to_dict()
    assert one.estimated_s <= 3 * 3600
    assert [r.size for r in one.rounds] == round_sizes(40, 0.5) == [40, 20, 10, 5, 3, 2]
    assert all(r.length == 32768 for r in one.rounds)
    prefixes = [r.prefix for r in one.rounds]
    assert prefixes == sorted(prefixes) and prefixes[1] > prefixes[0]  # survivors: more windows and depths
    # the estimate is the sum of what each measurement costs
    total = sum(cost.seconds(min(i.length, 8192), patched=False) for i in one.baseline)
    total += sum(r.size * sum(cost.seconds(i.length) for i in r.items) for r in one.rounds)
    assert math.isclose(total, one.estimated_s)


def test_a_tight_budget_starts_cheap_and_keeps_the_target_for_the_finalists():
    cpu = CostModel(30 / 8192 * 0.5, 30 / 8192**2 * 0.5)  # ~30 s per 8k forward, as SmolLM2 on 2 cores
    tight = plan(52, 8192, 32768, ["ppl", "passkey", "niah"], cpu, 3 * 3600)
    assert tight.rounds[0].length == 16384 and len(tight.rounds[0].items) == 1  # one window at T/2 each
    assert tight.rounds[-1].length == 32768 and tight.rounds[-1].items  # the finalists are measured at the target
    assert tight.estimated_s <= 3 * 3600 and tight.notes
    with pytest.raises(ValueError, match="one perplexity window each"):
        plan(52, 8192, 32768, ["ppl", "passkey", "niah"], cpu, 3600)


def test_the_progress_bar_charges_each_measurement_what_the_schedule_charged():
    """Its time left comes from these charges: a baseline measurement runs unpatched at the trained length."""
    cost = CostModel(1e-4, 1e-9)
    schedule = plan(12, 8192, 32768, ["ppl", "passkey"], cost, 3 * 3600)
    bar = Progress(schedule, {}, None, enabled=False)
    charged = sum(bar.estimate(i, baseline=True) for i in schedule.baseline)
    charged += sum(r.size * sum(bar.estimate(i, baseline=False) for i in r.items) for r in schedule.rounds)
    assert math.isclose(charged, schedule.estimated_s)
    native = Item("native", 32768, 0)
    assert bar.estimate(native, baseline=True) == cost.seconds(8192, patched=False) < cost.seconds(32768)


def test_the_leader_mid_round_is_the_best_fully_measured_candidate():
    items = {Item("ppl", 64, 0)}
    results = {("none", "native", 64, 0): {"value": 10.0}, ("a", "ppl", 64, 0): {"value": 12.0},
               ("b", "ppl", 64, 0): {"value": 11.0}}
    costs = {"a": 1.0, "b": 1.0, "c": 1.0}
    assert leader_so_far(["a", "b", "c"], items, 64, results, 32, costs)() == "b"  # c: not measured yet
    assert leader_so_far(["c"], items, 64, results, 32, costs)() is None
    results[("c", "ppl", 64, 0)] = {"value": 10.5}
    assert leader_so_far(["a", "b", "c"], items, 64, results, 32, costs)() == "c"


def test_depths_spread_and_budgets_parse():
    assert [depth(i) for i in range(4)] == [0.5, 0.25, 0.75, 0.125]
    assert parse_budget("3h") == 10800 and parse_budget("45m") == 2700 and parse_budget("2700") == 2700
    with pytest.raises(ValueError, match="not a duration"):
        parse_budget("3 hours")


# ---- the search (stub scorer) -------------------------------------------------------------------------------

SPECS = "yarn[factor=2],yarn[factor=3],yarn[factor=4],ntk[factor=2],ntk[factor=4],linear[factor=2],linear[factor=4]," \
        "dynamic,selfextend[group=4],selfextend[group=8]"


def test_halving_drops_a_worse_candidate_first_and_keeps_a_better_one(one_thread):  # noqa: F811
    model = tiny_model("llama")
    scorer = StubScorer(better="ntk[factor=4]", worse="selfextend[group=8]")
    result = stub_run(model, candidates=SPECS, scorer=scorer)
    assert result.winner == "ntk[factor=4]"
    assert result.search.eliminated["selfextend[group=8]"] == 0
    rows = {r["candidate"]: r for r in result.table}
    assert rows["selfextend[group=8]"]["status"] == "eliminated in round 0"
    assert rows["ntk[factor=4]"]["status"] == "winner"
    # the winner was measured on more windows than a first-round loser
    assert len(rows["ntk[factor=4]"]["measurements"]) > len(rows["selfextend[group=8]"]["measurements"])
    # no measurement repeated
    assert len(scorer.calls) == len(set(scorer.calls)) == result.schedule.measurements


def test_a_short_context_cost_above_the_limit_is_penalised(one_thread):  # noqa: F811
    class ShortCost(StubScorer):
        def measure(self, candidate, kind, length, index):
            value = super().measure(candidate, kind, length, index)
            if candidate.label == self.better and kind == "ppl" and length == 32:
                return 10.0 * (SHORT_LIMIT + 0.05)  # best at the target, but damages short context
            return value

    result = stub_run(tiny_model("llama"), candidates=SPECS, scorer=ShortCost(better="ntk[factor=4]"))
    assert result.winner != "ntk[factor=4]"
    last = {s.label: s for s in result.search.ranking}
    assert "ntk[factor=4]" not in last or last["ntk[factor=4]"].penalised


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, one_thread):  # noqa: F811
    model = tiny_model("llama")
    whole = StubScorer(better="yarn[factor=3]")
    reference = stub_run(model, candidates=SPECS, scorer=whole, out_dir=tmp_path / "whole")
    killed = StubScorer(better="yarn[factor=3]", fail_after=len(whole.calls) // 2)
    with pytest.raises(KeyboardInterrupt):
        stub_run(model, candidates=SPECS, scorer=killed, out_dir=tmp_path / "resumed")
    with open(tmp_path / "resumed" / "measurements.jsonl", "a") as f:
        f.write('{"candidate": "yarn[fac')  # the line a kill cut short
    with pytest.raises(TuneError, match="--resume"):
        stub_run(model, candidates=SPECS, scorer=StubScorer(), out_dir=tmp_path / "resumed")
    rest = StubScorer(better="yarn[factor=3]")
    resumed = stub_run(model, candidates=SPECS, scorer=rest, out_dir=tmp_path / "resumed", resume=True)
    assert not set(killed.calls) & set(rest.calls)  # nothing measured twice
    assert sorted(killed.calls + rest.calls) == sorted(whole.calls)
    assert resumed.winner == reference.winner == "yarn[factor=3]"
    assert resumed.search.rounds == reference.search.rounds
    assert resumed.tuned["methods"] == reference.tuned["methods"]
    with pytest.raises(TuneError, match="other settings"):
        stub_run(model, candidates=SPECS, scorer=StubScorer(), out_dir=tmp_path / "resumed", resume=True, seed=1)


def test_tuned_json_is_patch_to_dict_and_applies(tmp_path, one_thread):  # noqa: F811
    model = tiny_model("llama")
    result = stub_run(model, candidates="yarn,selfextend", scorer=StubScorer(better="selfextend"), out_dir=tmp_path)
    for name in ("tuned.json", "tune.json", "tune.md", "measurements.jsonl", "state.json", "candidates.png", "rounds.png"):
        assert (tmp_path / name).is_file(), name
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    assert tuned["candidate"] == "selfextend" and tuned["target_len"] == 64 and tuned["train_len"] == 32
    assert {"ctxpatch_version", "model", "objective", "budget", "score"} <= set(tuned)
    assert tuned["methods"][0]["params"] == {"window": 8, "group": 3}  # every parameter resolved (G from the rule)
    ids = torch.arange(1, 65)[None]
    expected_patch = ctxpatch.apply(model, "selfextend", target_len=64)
    expected = model(ids).logits
    assert expected_patch.to_dict()["methods"] == tuned["methods"]
    expected_patch.remove()
    with ctxpatch.apply(model, ctxpatch.spec_from_dict(tuned)) as patch:
        assert [m["params"] for m in patch.to_dict()["methods"]] == [m["params"] for m in tuned["methods"]]
        assert_close(model(ids).logits, expected, rtol=0, atol=0)
    with ctxpatch.apply(model, result.spec):
        assert_close(model(ids).logits, expected, rtol=0, atol=0)
    table = json.loads((tmp_path / "tune.json").read_text())["candidates"]
    assert {r["candidate"] for r in table} >= {"selfextend", "yarn"}
    assert all(r["measurements"] for r in table if r["status"] != "skipped")


def test_tuned_json_path_is_a_spec_when_the_core_parser_reads_json(tmp_path, one_thread):  # noqa: F811
    model = tiny_model("llama")
    stub_run(model, candidates="selfextend", scorer=StubScorer(), out_dir=tmp_path)
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    patch = ctxpatch.apply(model, str(tmp_path / "tuned.json"))
    assert patch.target_len == tuned["target_len"] == 2 * 32
    assert patch.to_dict()["methods"][0]["params"] == tuned["methods"][0]["params"]
    assert set(tuned["methods"][0]["params"]) == {"window", "group"}
    patch.remove()


# ---- two processes -----------------------------------------------------------------------------------------


def _distributed_worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        scorer = StubScorer(better="yarn[factor=3]", worse="linear[factor=4]")
        stub_run(tiny_model("llama"), candidates=SPECS, scorer=scorer, out_dir=f"{folder}/out")
        Path(f"{folder}/calls-{rank}.json").write_text(json.dumps(scorer.calls))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_one_process_result(tmp_path, one_thread):  # noqa: F811
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    scorer = StubScorer(better="yarn[factor=3]", worse="linear[factor=4]")
    one = stub_run(tiny_model("llama"), candidates=SPECS, scorer=scorer, out_dir=tmp_path / "one")
    two = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert two["tuned"]["candidate"] == one.winner == "yarn[factor=3]"
    assert two["rounds"] == one.search.rounds
    calls = [set(map(tuple, json.loads((tmp_path / f"calls-{r}.json").read_text()))) for r in (0, 1)]
    assert calls[0] and calls[1] and not calls[0] & calls[1]  # the work was split
    assert calls[0] | calls[1] == set(scorer.calls)
    logged = [json.loads(line) for line in (tmp_path / "out" / "measurements.jsonl").read_text().splitlines()]
    assert len(logged) == len(scorer.calls)  # rank 0 wrote every rank's measurements


# ---- errors ---------------------------------------------------------------------------------------------------


def test_api_errors(one_thread):  # noqa: F811
    model = tiny_model("llama")
    with pytest.raises(TuneError, match="not above the model's trained length 32"):
        stub_run(model, target_len=32, scorer=StubScorer())
    with pytest.raises(TuneError, match="cannot pay for the unpatched baseline once: it needs about"):
        stub_run(model, budget_s=1, scorer=StubScorer())
    with pytest.raises(TuneError, match="too small to measure"):
        stub_run(model, budget_s=10, scorer=StubScorer())
    with pytest.raises(TuneError, match="ppl included"):
        stub_run(model, tasks="passkey", scorer=StubScorer())
    with pytest.raises(ctxpatch.UnknownMethodError, match="Did you mean 'dynamic'"):
        stub_run(model, candidates="dynamc", scorer=StubScorer())


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    from ctxpatch.tune import cli as tune_cli

    monkeypatch.setattr(tune_cli, "load", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--target-len", "192"], "not above the model's trained length 192"),
    (["--budget", "0.000000001"], "cannot pay for the unpatched baseline once: it needs about"),  # below any machine's estimate
    (["--budget", "soon"], "not a duration"),
    (["--candidates", "selfextnd"], "Did you mean 'selfextend'?"),
    (["--tasks", "ppl,pxl"], "choose from ppl, passkey, niah"),
    (["--target-len", "300k"], "tokens, too few for one window of the target length 307200"),
    (["--keep", "0"], "keep=0.0 must be a fraction in (0, 1)"),
    (["--keep", "2"], "keep=2.0 must be a fraction in (0, 1)"),
    (["--max-steps", "0"], "max_steps=0 must be a whole number of windows, at least 1"),
    (["--device", "cuda"], "this machine has no CUDA GPU that torch can use"),
    (["--device", "tpu"], "--device 'tpu' is not a device: use cpu, cuda or cuda:N"),
    (["--backend", "bogus"], "unknown backend 'bogus'; choose one of blockwise, dense, flex"),
    (["--schedule", "nope.json"], "schedule file 'nope.json' does not exist: pass the schedule.json"),
])
def test_cli_errors_come_before_the_model_loads(model_folder, text_file, tmp_path, capsys, no_model_load, extra,  # noqa: F811
                                                message, monkeypatch):
    monkeypatch.setattr("ctxpatch.eval.distributed.cuda_available", lambda: False)  # --device cuda: no GPU here
    args = ["tune", "--model", str(model_folder), "--target-len", "384", "--text", str(text_file),
            "--out", str(tmp_path / "out"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_cli_refuses_a_used_out_folder_and_a_missing_text(model_folder, text_file, tmp_path, capsys,  # noqa: F811
                                                          no_model_load):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    base = ["tune", "--model", str(model_folder), "--target-len", "384"]
    assert main([*base, "--text", str(text_file), "--out", str(tmp_path / "out")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*base, "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--text", str(text_file), "--out", str(tmp_path / "o3"), "--resume"]) == 2
    assert "no tune run to resume" in capsys.readouterr().err


# ---- end to end, real scorer -----------------------------------------------------------------------------------


def test_end_to_end_on_a_tiny_model(model_folder, text_file, tmp_path, capsys, one_thread):  # noqa: F811
    out = tmp_path / "run"
    status = main(["tune", "--model", str(model_folder), "--target-len", "384", "--budget", "20m",
                   "--candidates", "selfextend[group=4],dynamic,yarn[factor=2]", "--tasks", "ppl,passkey",
                   "--tail", "24", "--text", str(text_file), "--max-steps", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-2000:]
    tuned = json.loads((out / "tuned.json").read_text())
    logged = (out / "measurements.jsonl").read_text()
    again = ["tune", "--model", str(model_folder), "--target-len", "384", "--budget", "20m",
             "--candidates", "selfextend[group=4],dynamic,yarn[factor=2]", "--tasks", "ppl,passkey",
             "--tail", "24", "--text", str(text_file), "--max-steps", "2", "--out", str(out), "--resume"]
    assert main(again) == 0  # a finished run resumed: nothing measured again, the same choice
    assert (out / "measurements.jsonl").read_text() == logged
    assert json.loads((out / "tuned.json").read_text())["methods"] == tuned["methods"]
    replay = [*again[:-2], str(tmp_path / "replayed"), "--schedule", str(out / "schedule.json"), "--budget", "1s"]
    assert main(replay) == 0  # the saved schedule, not the (too small) budget: the same measurements and winner
    assert "replaying a saved schedule" in capsys.readouterr().err
    assert json.loads((tmp_path / "replayed" / "tuned.json").read_text())["methods"] == tuned["methods"]
    values = [[json.loads(line)["value"] for line in (d / "measurements.jsonl").read_text().splitlines()]
              for d in (out, tmp_path / "replayed")]
    assert values[0] == values[1]
    assert main([*replay[:-2], "--resume"]) == 2 and "drop --schedule" in capsys.readouterr().err
    assert tuned["candidate"] in ("selfextend[group=4]", "dynamic", "yarn[factor=2]")
    assert tuned["model"]["fingerprint"]["kind"] == "folder"
    rows = [json.loads(line) for line in (out / "measurements.jsonl").read_text().splitlines()]
    natives = {r["index"]: r["value"] for r in rows if r["kind"] == "native" and r["length"] == 384}
    assert natives and all(v > 1 for v in natives.values())
    # the short check's reference is the unpatched perplexity of the same 192-token window
    model, tokenizer = tiny_lm()
    short = [r for r in rows if r["candidate"] == "dynamic" and r["kind"] == "ppl" and r["length"] == 192]
    base = {r["index"]: r["value"] for r in rows if r["kind"] == "native" and r["length"] == 192}
    for r in short:  # dynamic is the identity inside the trained length
        assert math.isclose(r["value"], base[r["index"]], rel_tol=1e-4)
    with ctxpatch.apply(model, ctxpatch.spec_from_dict(tuned)) as patch:
        assert patch.to_dict()["methods"] == tuned["methods"]
    # the real scorer's perplexity is the eval package's: recompute one native window by hand
    from ctxpatch.eval import data

    encoder = data.Encoder(tokenizer)
    corpus = data.Corpus(encoder, text_file.read_text())
    request = data.PplRequest((384,), 24, 192, 1, 0)
    start = data.window_starts(0, 384, 1)[0]
    _, native = data.ppl_window(encoder, corpus.ids(start + 384 + data.MAX_SHIFT), start, 384, request, 0)
    context, continuation = encoder.pair(native["context"], native["continuation"])
    ids = torch.tensor([context + continuation], dtype=torch.long)
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0, -len(continuation):].double()
    nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(continuation)[:, None]).sum()
    assert math.isclose(math.exp(nll / 24), natives[0], rel_tol=1e-4)
    assert Item("ppl", 384, 0) in {i for r in _schedule(out).rounds for i in r.items}


def _schedule(out: Path):
    from ctxpatch.tune.schedule import Schedule

    return Schedule.from_dict(json.loads((out / "state.json").read_text())["schedule"])


def test_ctxpatch_tune_is_the_function_after_the_cli_imports_the_package():
    import importlib
    import sys
    import types

    importlib.import_module("ctxpatch.tune.cli")  # importing a module of the package leaves ctxpatch.tune alone
    assert ctxpatch.tune is importlib.import_module("ctxpatch.tune.api").tune
    assert type(sys.modules["ctxpatch.tune"]) is types.ModuleType  # no module class swapped
    with pytest.raises(TuneError, match="not above"):
        ctxpatch.tune(tiny_model("llama"), target_len=16, scorer=StubScorer(), cost=COST, progress=False)


def test_info_from_a_chatglm_config_json_reads_its_own_names():
    from ctxpatch.preflight import info_from_config

    glm = {"num_attention_heads": 32, "num_layers": 28, "hidden_size": 4096, "kv_channels": 128,
           "multi_query_group_num": 2, "seq_length": 8192}
    assert info_from_config(glm, 8192) == ModelInfo(train_len=8192, num_layers=28, num_heads=32, num_kv_heads=2,
                                                    head_dim=128, rotary_dim=64)  # half of each head rotates
    assert info_from_config(glm) == info_from_config(glm, 8192)  # one rule for ChatGLM's L: seq_length


# ---- a tune that replays -----------------------------------------------------------------------------------------


def test_a_saved_schedule_replays_the_same_winner_on_a_slower_machine(tmp_path, monkeypatch, capsys,
                                                                      one_thread):  # noqa: F811
    """Two machines (fake timings of the calibration forward, 200x apart) plan two schedules from one budget;
    replaying the first one's schedule.json on the slow one measures the same things and picks the same winner."""
    from ctxpatch.tune import api
    from ctxpatch.tune.scorer import EvalScorer

    model, tokenizer = tiny_lm()
    text = generated_text()
    monkeypatch.setattr(api, "matmul_rate", lambda device: 1e9)  # the config's estimate: the same on both

    def run(seconds_per_forward: float, out: Path, **kwargs):
        monkeypatch.setattr(EvalScorer, "time_forward", lambda self, n: seconds_per_forward)
        return ctxpatch.tune(model, tokenizer, target_len=384, texts=[text], budget_s="2m", tasks="ppl,passkey",
                             candidates="selfextend[group=4],dynamic,yarn[factor=2],rerope", tail=24, max_steps=2,
                             out_dir=out, **kwargs)

    fast = run(0.01, tmp_path / "fast")
    assert "depends on the machine and its load" in capsys.readouterr().err
    slow = run(2.0, tmp_path / "slow")
    assert slow.schedule.to_dict()["rounds"] != fast.schedule.to_dict()["rounds"]  # the timing chose the schedule
    replayed = run(2.0, tmp_path / "replayed", schedule=tmp_path / "fast" / "schedule.json")
    assert "replaying a saved schedule" in capsys.readouterr().err
    assert replayed.schedule.to_dict() == fast.schedule.to_dict()
    assert replayed.winner == fast.winner and replayed.tuned["methods"] == fast.tuned["methods"]
    def measured(run_dir: str) -> list[dict]:
        rows = (json.loads(line) for line in (tmp_path / run_dir / "measurements.jsonl").read_text().splitlines())
        return [{k: r[k] for k in ("candidate", "kind", "length", "index", "value")} for r in rows]

    assert measured("replayed") == measured("fast")  # every measurement, in order, with the same value
    assert replayed.tuned["budget"]["schedule"] == "replayed"
    assert "replayed from a saved schedule.json" in (tmp_path / "replayed" / "tune.md").read_text()
    assert "--schedule schedule.json" in (tmp_path / "fast" / "tune.md").read_text()


def test_a_schedule_made_for_other_settings_is_refused(tmp_path, one_thread):  # noqa: F811
    model = tiny_model("llama")
    stub_run(model, candidates=SPECS, scorer=StubScorer(), out_dir=tmp_path / "a")
    saved = tmp_path / "a" / "schedule.json"
    with pytest.raises(TuneError, match=r"made for other settings \(target_len: 64 there, 128 here; candidates: "
                                        r"dynamic\[factor=4\] here only\)"):
        stub_run(model, candidates=SPECS, scorer=StubScorer(), target_len=128, schedule=saved)
    with pytest.raises(TuneError, match=r"made for other settings \(candidates: yarn\[factor=2\], .* there only; "
                                        r"yarn here only\)"):
        stub_run(model, candidates="yarn,dynamic", scorer=StubScorer(), schedule=saved)
    with pytest.raises(TuneError, match="does not exist: pass the schedule.json"):
        stub_run(model, candidates=SPECS, scorer=StubScorer(), schedule=tmp_path / "nope.json")
    again = stub_run(model, candidates=SPECS, scorer=StubScorer(), cost=COST.scaled(100), schedule=saved)
    assert again.schedule.to_dict() == json.loads(saved.read_text())["schedule"]

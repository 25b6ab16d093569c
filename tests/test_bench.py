"""Tests of fewbit.bench: configuration registry, models, the child worker (run in
process here), comparisons, gradient error, report output and the digits trainer."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from fewbit.bench import CONFIGS, Config, register
from fewbit.bench.configs import DEFAULT_CONFIGS, checkpoint_layers, get_config
from fewbit.bench.convergence import load_digits_split, train_digits
from fewbit.bench.memory import add_comparisons, grad_rel_error, round_order, summarize_times
from fewbit.bench.models import PRESETS, build_model, make_batch, resolve_spec
from fewbit.bench.report import (
    format_markdown,
    format_table,
    pareto_frontier,
    plot_convergence,
    plot_frontier,
    plot_memory,
    write_json,
)
from fewbit.bench.runner import Job, dropout_disabled, run_job
from fewbit.functional.fewbit_fn import side_store_nbytes
from fewbit.profile import SavedTensorLog

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_registry_has_published_rows_and_one_line_extension() -> None:
    assert list(CONFIGS)[:4] == ["vanilla", "gelu3", "rand20", "gelu3+rand20"]
    try:
        register(Config("test-identity", (), "for this test"))
        model = nn.Linear(2, 2)
        assert get_config("test-identity").apply(model) is model
    finally:
        CONFIGS.pop("test-identity", None)
    with pytest.raises(ValueError, match="unknown configuration 'nope'"):
        get_config("nope")
    with pytest.raises(ValueError, match="checkpoint"):
        Config("bad", (), checkpoint="reentrant")


def test_rows_are_fewbit_apply_config_lists() -> None:
    from fewbit.configs import Activations, Generic, Sketch

    assert get_config("gelu3").configs == (Activations(bits=3),)
    assert get_config("gelu3+rand20").configs == (Activations(bits=3), Sketch(ratio=0.2))
    assert get_config("compress2").configs == (Generic(bits=2),)
    assert get_config("L2").configs == ("L2",)
    assert get_config("ckpt").checkpoint == "torch" and get_config("ckpt").configs == ()
    assert get_config("ckpt+L2").checkpoint == "fewbit"
    # a converted model keeps its class and parameter names (the gradients are compared by name)
    spec = resolve_spec("tiny")
    names = [n for n, _ in build_model(spec).named_parameters()]
    for row in ("gelu3+rand20", "L2", "compress2", "ckpt+L2"):
        model = get_config(row).apply(build_model(spec))
        assert [n for n, _ in model.named_parameters()] == names, row


def test_resolve_spec_presets_overrides_and_json(tmp_path: os.PathLike[str]) -> None:
    assert resolve_spec("roberta-base-mrpc").batch == 128
    assert PRESETS["roberta-base-mrpc"].config["hidden_size"] == 768
    spec = resolve_spec("tiny", batch=3, seq=5)
    assert (spec.batch, spec.seq) == (3, 5)
    path = os.path.join(tmp_path, "cfg.json")
    with open(path, "w") as f:
        json.dump({**PRESETS["tiny"].config, "model_type": "roberta"}, f)
    assert resolve_spec(path).config["hidden_size"] == 64
    with pytest.raises(ValueError, match="preset"):
        resolve_spec("no-such-model")
    with pytest.raises(ValueError, match="batch"):
        resolve_spec("tiny", batch=0)


def test_models_and_batches_depend_only_on_seed() -> None:
    spec = resolve_spec("tiny")
    a, b = build_model(spec, seed=1), build_model(spec, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    x, y = make_batch(spec, seed=1), make_batch(spec, seed=1)
    assert torch.equal(x["input_ids"], y["input_ids"])
    assert x["input_ids"].shape == (spec.batch, spec.seq)
    assert int(x["input_ids"].min()) >= 3  # 0-2 are RoBERTa's special ids


def test_dropout_disabled_restores_probabilities() -> None:
    model = nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 4), nn.Dropout2d(0.3))
    with dropout_disabled(model):
        assert [m.p for m in model if isinstance(m, nn.modules.dropout._DropoutNd)] == [0, 0]
    assert (model[0].p, model[2].p) == (0.1, 0.3)


def test_grad_rel_error() -> None:
    ref = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    assert grad_rel_error(ref, ref) == 0.0
    # difference (0, 5, 0) against norm 5: relative error 1; names missing in `other` skipped
    assert grad_rel_error(ref, {"a": torch.tensor([3.0, 5.0]), "b": torch.tensor([4.0])}) == 1.0
    assert grad_rel_error(ref, {"a": torch.tensor([0.0, 0.0])}) == 1.0
    with pytest.raises(ValueError, match="common"):
        grad_rel_error(ref, {"c": torch.tensor([1.0])})


def test_add_comparisons_against_vanilla() -> None:
    rows = [
        {"config": "vanilla", "peak_total_bytes": 200, "saved_bytes": 100, "step_time_s": 2.0},
        {"config": "x", "peak_total_bytes": 150, "saved_bytes": 40, "step_time_s": 3.0},
        {"config": "y", "error": "boom"},
    ]
    add_comparisons(rows)
    assert rows[0]["time_ratio"] == 1.0 and rows[0]["peak_saving_pct"] == 0.0
    assert rows[1]["peak_saving_pct"] == 25.0 and rows[1]["saved_saving_pct"] == 60.0
    assert rows[1]["time_ratio"] == 1.5
    assert "time_ratio" not in rows[2]


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """vanilla and gelu3 on the tiny preset, run in this process (no RSS measurement)."""
    tmp = tmp_path_factory.mktemp("grads")
    rows = []
    for name in ("vanilla", "gelu3"):
        job = Job(name, "tiny", steps=1, rss=False, grad_path=os.path.join(tmp, name + ".pt"))
        rows.append({"config": name, **run_job(job)})
    add_comparisons(rows)
    return rows


def test_run_job_saved_bytes_difference_is_exactly_the_gelu_inputs(tiny_rows: list) -> None:
    vanilla, gelu3 = tiny_rows
    cfg = PRESETS["tiny"].config
    spec = PRESETS["tiny"]
    n = spec.batch * spec.seq * cfg["intermediate_size"]  # GELU inputs per layer
    layers = cfg["num_hidden_layers"]
    # each GELU input (fp32, 4 B/element) is replaced by a 3-bit code and the fixed-size
    # non-finite side store
    stored = math.ceil(n * 3 / 8) + side_store_nbytes(n)
    expected = layers * (n * 4 - stored)
    assert vanilla["saved_bytes"] - gelu3["saved_bytes"] == expected
    assert gelu3["saved_by_op"]["FewBitActivationBackward"] == layers * stored
    assert "GeluBackward0" not in gelu3["saved_by_op"]
    assert vanilla["time_ratio"] == 1.0
    assert gelu3["peak_saving_pct"] > 0  # the peak holds all saved activations


def test_gradient_dumps_compare(tiny_rows: list) -> None:
    ref = torch.load(tiny_rows[0]["job"]["grad_path"])
    other = torch.load(tiny_rows[1]["job"]["grad_path"])
    assert set(ref) == set(other)  # convert keeps parameter names
    err = grad_rel_error(ref, other)
    # 3-bit derivative tables are not exact (err > 0); a lost gradient would give err = 1
    assert 0.0 < err < 1.0


def test_report_table_json_and_plot(tiny_rows: list, tmp_path: os.PathLike[str]) -> None:
    rows = [dict(r) for r in tiny_rows] + [{"config": "broken", "error": "exit 1: boom"}]
    report = {"settings": {"model": "tiny", "batch": 4, "seq": 32, "dtype": "fp32",
                           "device": "cpu", "n_params": tiny_rows[0]["n_params"]}, "rows": rows}
    text = format_table(report)
    for word in ("vanilla", "gelu3", "peak memory", "saved activations", "x vanilla",
                 "grad rel err", "failed: exit 1: boom"):
        assert word in text
    write_json(report, os.path.join(tmp_path, "r.json"))
    with open(os.path.join(tmp_path, "r.json")) as f:
        assert json.load(f)["rows"][0]["config"] == "vanilla"
    plot_memory(report, os.path.join(tmp_path, "m.png"))
    with open(os.path.join(tmp_path, "m.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_digits_training_learns_and_plots(tmp_path: os.PathLike[str]) -> None:
    data = load_digits_split()
    assert (len(data[1]), len(data[3])) == (1347, 450)
    row = train_digits("vanilla", model="mlp", epochs=2, data=data)
    assert row["train_loss"][1] < row["train_loss"][0] < math.log(10) + 0.1
    assert row["test_accuracy"] > 10.0  # better than chance (10 classes)
    with pytest.raises(ValueError, match="model"):
        train_digits("vanilla", model="cnn")
    path = os.path.join(tmp_path, "c.png")
    plot_convergence({"settings": {"model": "digits-mlp"}, "rows": [{**row, "config": "v"}]}, path)
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_round_order_rotates_so_no_configuration_always_runs_first() -> None:
    names = ["vanilla", "ckpt", "gelu3"]
    orders = [round_order(names, r) for r in range(3)]
    assert [o[0] for o in orders] == names  # each runs first once
    assert all(sorted(o) == sorted(names) for o in orders)
    assert round_order([], 2) == []


def test_paired_time_ratios_against_vanilla_and_ckpt() -> None:
    rows = [
        {"config": "vanilla", "peak_total_bytes": 100, "saved_bytes": 50},
        {"config": "ckpt", "peak_total_bytes": 60, "saved_bytes": 5},
        {"config": "x", "peak_total_bytes": 50, "saved_bytes": 10},
        {"config": "offload", "skipped": "does not apply on cpu"},
    ]
    # round 2 is a slow spell of the machine (every configuration 2x slower): paired ratios
    # are unaffected by it, a ratio of pooled medians would not be
    summarize_times(rows[0], [[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    summarize_times(rows[1], [[1.5, 1.5], [3.0, 3.0], [1.5, 1.5]])
    summarize_times(rows[2], [[1.2, 1.2], [2.4, 2.4], None])  # round 3 failed
    add_comparisons(rows)
    vanilla, ckpt, x, offload = rows
    assert vanilla["step_time_s"] == 1.0 and vanilla["round_medians_s"] == [1.0, 2.0, 1.0]
    # quartiles of the six steps [1, 1, 1, 1, 2, 2] (inclusive method: q3 at position 3.75)
    assert vanilla["step_time_iqr_s"] == [1.0, 1.75]
    assert ckpt["time_ratio"] == pytest.approx(1.5) and ckpt["time_ratio_range"] == [1.5, 1.5]
    assert x["time_ratio"] == pytest.approx(1.2)  # rounds 1-2 only
    assert x["time_ratio_ckpt"] == pytest.approx(0.8)
    assert vanilla["time_ratio_ckpt"] == pytest.approx(1 / 1.5)
    assert x["peak_saving_pct"] == 50.0 and x["peak_vs_ckpt_pct"] == pytest.approx(100 / 6)
    assert "time_ratio" not in offload


def test_round_ratio_pairs_steps_by_cycle() -> None:
    """Lockstep rounds: slow spells within a round (cycles 1 and 3 every configuration 3x
    slower, cycle 4 only x) leave the per-cycle paired ratio at 1.1, where the ratio of the
    round medians would be 3.3; a child that failed mid-round (unequal lengths) falls back to
    the medians."""
    rows = [{"config": "vanilla", "peak_total_bytes": 100, "saved_bytes": 50},
            {"config": "x", "peak_total_bytes": 50, "saved_bytes": 10}]  # fmt: skip
    summarize_times(rows[0], [[1.0, 3.0, 1.0, 3.0, 1.0]])
    summarize_times(rows[1], [[1.1, 3.3, 1.1, 3.3, 3.3]])
    add_comparisons(rows)
    # per-cycle ratios 1.1, 1.1, 1.1, 1.1, 3.3: median 1.1 (medians: 3.3 / 1.0)
    assert rows[1]["time_ratio"] == pytest.approx(1.1)
    summarize_times(rows[0], [[1.0, 2.0, 3.0, 4.0, 5.0]])
    summarize_times(rows[1], [[2.0, 2.0, 9.0]])
    add_comparisons(rows)
    assert rows[1]["time_ratio"] == pytest.approx(2.0 / 3.0)
    assert rows[1]["round_step_times_s"] == [[2.0, 2.0, 9.0]]


def test_pareto_frontier() -> None:
    points = {"vanilla": (1.0, 10.0), "ckpt": (1.3, 5.0), "slow": (2.0, 6.0), "L2": (1.5, 4.0),
              "tie": (1.3, 5.0)}
    # "slow" is beaten by ckpt on both; equal points do not dominate each other
    assert pareto_frontier(points) == ["vanilla", "ckpt", "tie", "L2"]
    assert pareto_frontier({}) == []


def test_offload_row_applies_only_on_cuda() -> None:
    offload = get_config("offload")
    assert not offload.applies_to("cpu")
    assert offload.applies_to("cuda") and offload.applies_to("cuda:1")
    assert get_config("ckpt").applies_to("cpu")
    for name in ("vanilla", "ckpt", "gelu3", "ckpt+gelu3", "gelu3+rand20", "L2", "compress2"):
        assert name in DEFAULT_CONFIGS


def _grads_and_saving_modules(model: nn.Module, batch: dict) -> tuple[dict, set]:
    """Gradients (dropout off) and the paths of the modules that saved tensors in forward."""
    log = SavedTensorLog(exclude=list(model.parameters()) + list(model.buffers()), model=model)
    with dropout_disabled(model):  # backward too: checkpointing re-runs forward there
        with log.record():
            loss = model(**batch).loss
        loss.backward()
    log.clear()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, set(log.by_module())


@pytest.mark.parametrize("preset", ["tiny", "resnet-small"])
def test_checkpoint_layers_same_gradient_nothing_saved_inside_layers(preset: str) -> None:
    """torch's checkpoint: the same gradient as without it."""
    from fewbit.models import BasicBlock

    spec = resolve_spec(preset, batch=2)
    batch = make_batch(spec, seed=0)
    vanilla = build_model(spec, seed=0)
    resnet = preset == "resnet-small"
    layer_types = (BasicBlock,) if resnet else (type(vanilla.roberta.encoder.layer[0]),)
    layers = [n for n, m in vanilla.named_modules() if isinstance(m, layer_types)]
    ref, ref_savers = _grads_and_saving_modules(vanilla, batch)
    got, savers = _grads_and_saving_modules(checkpoint_layers(build_model(spec, seed=0)), batch)
    assert set(got) == set(ref)  # parameter names unchanged
    # recomputation runs the same float ops in the same order: the same gradient up to the
    # order of accumulation (a few float32 ulps)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7)

    def inside(path: str) -> bool:
        return any(path.startswith(layer + ".") for layer in layers)

    # vanilla's sub-modules of every layer save tensors; checkpointed, none does (the
    # checkpoint keeps the layer's input, logged under the layer's own path)
    assert layers and all(any(p.startswith(layer + ".") for p in ref_savers) for layer in layers)
    assert not any(inside(p) for p in savers), sorted(savers)


def test_checkpoint_layers_rejects_models_without_layers() -> None:
    with pytest.raises(ValueError, match="checkpoint_layers"):
        checkpoint_layers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="kind"):
        checkpoint_layers(nn.Linear(2, 2), "reentrant")


def test_fewbit_checkpoint_layers_close_gradient() -> None:
    """fewbit.checkpoint regions: layer inputs at 8 bits, so the gradient is torch's evaluated
    at inputs off by less than one step (range/255 per group): close, not equal. (The ResNet
    preset is left out: its BatchNorms amplify the input error, 13-15% at batch 2-16.)"""
    spec = resolve_spec("tiny", batch=2)
    batch = make_batch(spec, seed=0)
    ref, _ = _grads_and_saving_modules(build_model(spec, seed=0), batch)
    got, _ = _grads_and_saving_modules(checkpoint_layers(build_model(spec, seed=0), "fewbit"),
                                       batch)
    flat = lambda g: torch.cat([g[n].reshape(-1) for n in sorted(ref)])  # noqa: E731
    err = float((flat(got) - flat(ref)).norm() / flat(ref).norm())
    # 8-bit inputs: errors of about 1/255 of each group's range, propagated through a few
    # layers; a lost or wrong gradient would be O(1)
    assert 0.0 < err < 0.05


def test_frontier_plot_and_ckpt_columns(tmp_path: os.PathLike[str]) -> None:
    rows = [
        {"config": "vanilla", "peak_total_bytes": 100 << 20, "saved_bytes": 50 << 20},
        {"config": "ckpt", "peak_total_bytes": 60 << 20, "saved_bytes": 5 << 20},
        {"config": "offload", "skipped": "does not apply on cpu (only on cuda)"},
    ]
    summarize_times(rows[0], [[1.0], [1.1]])
    summarize_times(rows[1], [[1.4], [1.5]])
    add_comparisons(rows)
    report = {"settings": {"model": "tiny", "batch": 4, "seq": 32, "dtype": "fp32",
                           "device": "cpu", "steps": 1, "rounds": 2}, "rows": rows}
    text = format_table(report)
    assert "x ckpt" in text and "n/a: does not apply on cpu" in text
    md = format_markdown(report)
    assert "| x vanilla | x ckpt |" in md and "2 lockstep rounds" in md
    path = os.path.join(tmp_path, "f.png")
    plot_frontier(report, path)
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC

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
from fewbit.bench.configs import get_config
from fewbit.bench.convergence import load_digits_split, train_digits
from fewbit.bench.memory import add_comparisons, grad_rel_error
from fewbit.bench.models import PRESETS, build_model, make_batch, resolve_spec
from fewbit.bench.report import format_table, plot_convergence, plot_memory, write_json
from fewbit.bench.runner import Job, dropout_disabled, run_job

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_registry_has_published_rows_and_one_line_extension() -> None:
    assert list(CONFIGS)[:4] == ["vanilla", "gelu3", "rand20", "gelu3+rand20"]
    try:
        register(Config("test-identity", lambda m: m, "for this test"))
        assert get_config("test-identity").apply is not None
    finally:
        CONFIGS.pop("test-identity", None)
    with pytest.raises(ValueError, match="unknown configuration 'nope'"):
        get_config("nope")


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
    # each GELU input (fp32, 4 B/element) is replaced by a 3-bit code
    expected = layers * (n * 4 - math.ceil(n * 3 / 8))
    assert vanilla["saved_bytes"] - gelu3["saved_bytes"] == expected
    assert gelu3["saved_by_op"]["FewBitActivationBackward"] == layers * math.ceil(n * 3 / 8)
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
    for word in ("vanilla", "gelu3", "peak memory", "saved activations", "time ratio",
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

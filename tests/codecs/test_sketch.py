"""Random sketches: sizes, argument checks, E[S S^T] = I, chunking, seeding."""

import pytest
import torch

from fewbit.codecs.sketch import (
    check_proj_args,
    check_sketch,
    chunk_rows,
    draw_seed,
    importance_rows,
    project,
    sketch_dim,
)


@pytest.mark.parametrize(
    "n, kwargs, expected",
    [
        (100, {}, 50),  # default ratio 0.5
        (100, {"proj_dim_ratio": 0.1}, 10),
        (101, {"proj_dim_ratio": 0.1}, 10),  # round(10.1)
        (100, {"proj_dim": 7, "proj_dim_ratio": 0.9}, 7),  # proj_dim wins
        (100, {"proj_dim_ratio": 0.1, "proj_dim_min": 20}, 20),
        (100, {"proj_dim_ratio": 0.9, "proj_dim_max": 30}, 30),
        (5, {"proj_dim": 64}, 5),  # never more than N
        (3, {"proj_dim_ratio": 0.1}, 1),  # round(0.3) = 0 -> 1, never a zero sketch
        (1, {}, 1),
    ],
)
def test_sketch_dim(n: int, kwargs: dict, expected: int) -> None:
    assert sketch_dim(n, **kwargs) == expected


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"proj_dim": 0}, "proj_dim"),
        ({"proj_dim": -3}, "proj_dim"),
        ({"proj_dim_ratio": 0.0}, "proj_dim_ratio"),
        ({"proj_dim_ratio": 1.5}, "proj_dim_ratio"),
        ({"proj_dim_min": 0}, "proj_dim_min"),
        ({"proj_dim_max": 0}, "proj_dim_max"),
        ({"proj_dim_min": 5, "proj_dim_max": 4}, "proj_dim_min"),
    ],
)
def test_check_proj_args_names_the_argument(kwargs: dict, name: str) -> None:
    args = {"proj_dim_ratio": None, "proj_dim": None, "proj_dim_min": None, "proj_dim_max": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        check_proj_args(**args)


def test_check_proj_args_types() -> None:
    with pytest.raises(TypeError, match="proj_dim"):
        check_proj_args(None, 2.5, None, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="proj_dim_ratio"):
        check_proj_args("0.5", None, None, None)  # type: ignore[arg-type]


def test_check_sketch() -> None:
    assert check_sketch("rademacher") == "rademacher"
    with pytest.raises(ValueError, match="matmul"):
        check_sketch("dft")


def test_draw_seed_with_generator_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(1)
    seeds = [draw_seed(gen) for _ in range(3)]
    assert torch.equal(state, torch.get_rng_state())
    assert len(set(seeds)) == 3  # a fresh seed per call
    assert seeds == [draw_seed(torch.Generator().manual_seed(1))] + seeds[1:]
    with pytest.raises(TypeError, match="generator"):
        draw_seed(123)  # type: ignore[arg-type]


def test_draw_seed_without_generator_follows_manual_seed() -> None:
    torch.manual_seed(5)
    a = draw_seed()
    torch.manual_seed(5)
    assert draw_seed() == a


def test_chunk_rows_bounds_the_random_block() -> None:
    for n, k, f in [(1000, 10, 8), (1000, 500, 8), (7, 3, 1), (64, 64, 1), (10, 1, 1)]:
        c = chunk_rows(n, k, f)
        assert 1 <= c <= n
        assert k * c <= max(k, n * f)  # never larger than the input (or one column)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_project_regenerates_and_chunks(kind: str) -> None:
    x = torch.randn(40, 3, dtype=torch.float64)
    a = project(x, 6, 123, kind, chunk=40)
    assert torch.equal(a, project(x, 6, 123, kind, chunk=40))  # same seed -> same R
    assert not torch.equal(a, project(x, 6, 124, kind, chunk=40))
    # Chunked: R^T x computed block by block equals R^T applied to the identity, times x.
    eye = torch.eye(40, dtype=torch.float64)
    rt = project(eye, 6, 7, kind, chunk=5)  # R^T, 6 x 40, built from 8 blocks
    assert torch.allclose(project(x, 6, 7, kind, chunk=5), rt @ x, rtol=1e-12, atol=1e-12)
    if kind == "rademacher":
        assert set(rt.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projection_is_isotropic(kind: str) -> None:
    # E[R R^T] / k = I: average of D draws of R R^T / k, n = 6, k = 4, D = 2000 draws.
    n, k, draws = 6, 4, 2000
    eye = torch.eye(n, dtype=torch.float64)
    acc = torch.zeros(n, n, dtype=torch.float64)
    for seed in range(draws):
        rt = project(eye, k, seed, kind, chunk=n)
        acc += rt.t() @ rt / k
    mean = acc / draws
    # Entry variance per draw <= 2/k (Gaussian diagonal), so the std of the mean is
    # <= sqrt(2 / (k D)) = 0.016; 5 sigma = 0.08.
    assert (mean - eye).abs().max() < 0.08


def test_importance_rows_is_unbiased_and_skips_zero_rows() -> None:
    x = torch.randn(12, 5, dtype=torch.float64)
    x[3] = 0
    g = torch.randn(12, 4, dtype=torch.float64)
    exact = g.t() @ x
    acc = torch.zeros_like(exact)
    draws = 4000
    for seed in range(draws):
        index, rows = importance_rows(x, 3, seed)
        assert 3 not in index.tolist()  # zero-probability rows are never drawn
        acc += g[index].t() @ rows
    mean = acc / draws
    p = x.norm(dim=1) / x.norm(dim=1).sum()
    keep = p > 0
    var = ((g.norm(dim=1) ** 2 * x.norm(dim=1) ** 2)[keep] / p[keep]).sum() - exact.norm() ** 2
    rms = (var / (3 * draws)).sqrt()  # expected Frobenius error of the mean
    assert (mean - exact).norm() < 3 * rms  # Markov on the squared error: P(fail) < 1/9


def test_importance_rows_all_zero_input_is_uniform() -> None:
    x = torch.zeros(5, 3)
    index, rows = importance_rows(x, 4, 0)
    assert index.shape == (4,) and rows.shape == (4, 3) and torch.all(rows == 0)


def test_count_sketch_matrix_has_one_sign_per_row() -> None:
    n, k = 40, 6
    rt = project(torch.eye(n, dtype=torch.float64), k, 11, "countsketch", chunk=n)  # R^T
    assert rt.shape == (k, n)
    assert torch.equal(rt.abs().sum(0), torch.ones(n, dtype=torch.float64))  # one +-1 per row
    assert set(rt.unique().tolist()) <= {-1.0, 0.0, 1.0}
    x = torch.randn(n, 3, dtype=torch.float64)
    assert torch.allclose(project(x, k, 11, "countsketch", chunk=n), rt @ x, atol=1e-12)
    assert not torch.equal(rt, project(torch.eye(n, dtype=torch.float64), k, 12, "countsketch",
                                       chunk=n))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_count_sketch_half_accumulates_in_float32(dtype: torch.dtype) -> None:
    n, k = 50, 4  # float32 copies of 2k = 8 rows at a time: 7 chunks
    x = torch.randn(n, 5).to(dtype)
    rt = project(torch.eye(n), k, 3, "countsketch", chunk=n).double()
    out = project(x, k, 3, "countsketch", chunk=n)
    assert out.dtype == torch.float32
    # float32 sums of <= 50 exactly representable half values: within 50 * 2^-24 relative.
    ref = rt @ x.double()
    assert bool(((out.double() - ref).abs() <= 50 * 2**-24 * (rt.abs() @ x.double().abs())).all())


def test_count_sketch_is_isotropic() -> None:
    # E[R R^T] = I with no scaling: diagonal exactly 1; off-diagonal entries are +-1 with
    # probability 1/k each (else 0): mean 0, variance 1/k per draw.
    n, k, draws = 6, 4, 2000
    eye = torch.eye(n, dtype=torch.float64)
    acc = torch.zeros(n, n, dtype=torch.float64)
    for seed in range(draws):
        rt = project(eye, k, seed, "countsketch", chunk=n)
        gram = rt.t() @ rt
        assert torch.equal(gram.diagonal(), torch.ones(n, dtype=torch.float64))
        acc += gram
    # std of the mean <= sqrt(1 / (k D)) = 0.011; 7 sigma = 0.08 (max over 30 entries).
    assert ((acc / draws) - eye).abs().max() < 0.08

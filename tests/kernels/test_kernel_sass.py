"""Logic of benchmarks/kernel_sass.py that needs no compiler: SASS and resource parsing,
argument binding against a kernel's signature. (The tests run under TRITON_INTERPRET=1,
where kernels cannot be compiled; `python benchmarks/kernel_sass.py` does that.)"""

import importlib.util
import pathlib
import sys
from types import SimpleNamespace

import pytest

PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_sass.py"
spec = importlib.util.spec_from_file_location("kernel_sass", PATH)
ks = importlib.util.module_from_spec(spec)
sys.modules["kernel_sass"] = ks  # dataclasses look their module up
spec.loader.exec_module(ks)

SASS = """
	code for sm_90a
		Function : _k
        /*0000*/                   LDC R1, c[0x0][0x28] ;            /* 0x00000a00ff017b82 */
                                                                     /* 0x000fe20000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                /* 0x0000000000007919 */
        /*0020*/              @!P0 BRA 0x60 ;                        /* 0x0000000000d88947 */
        /*0030*/                   FFMA R2, R0, R0, R1 ;             /* 0x0 */
.L_x_1:
        /*0040*/                   FMUL R2, R2, R2 ;                 /* 0x0 */
        /*0050*/               @P0 BRA `(.L_x_1) ;                   /* 0x0 */
        /*0060*/                   NOP ;                             /* 0x0 */
        /*0070*/                   EXIT ;                            /* 0x0 */
.L_x_2:
        /*0080*/                   BRA `(.L_x_2) ;                   /* 0x0 */
"""


def test_count_sass_skips_nops_and_the_final_self_branch() -> None:
    total, body, ops = ks.count_sass(SASS)
    # LDC S2R BRA FFMA FMUL BRA EXIT: 7 (the NOP and `BRA self` after EXIT not counted)
    assert total == 7
    assert body == 2  # the loop FMUL / BRA back to .L_x_1
    assert ops["BRA"] == 2 and ops["FMUL"] == 1 and "NOP" not in ops
    assert [op for _, op in ks.parse_sass(SASS)][:3] == ["LDC R1, c[0x0][0x28]",
                                                          "S2R R0, SR_TID.X", "BRA 0x60"]


def test_parse_res_usage() -> None:
    text = " Function _k:\n  REG:89 STACK:0 SHARED:0 LOCAL:32 CONSTANT[0]:568 TEXTURE:0"
    assert ks.parse_res_usage(text) == {"REG": 89, "STACK": 0, "SHARED": 0, "LOCAL": 32}
    r = ks.Result("v", True, stack=0, local=32, per_element=10.0, goal=40.0)
    assert r.spills == 32 and r.meets_goal is False  # spills fail the goal
    assert ks.Result("v", True, stack=0, local=0, per_element=41.0, goal=40.0).meets_goal is False
    assert ks.Result("v", True, stack=0, local=0, per_element=39.0, goal=40.0).meets_goal


def test_bind_orders_arguments_and_names_signature_changes() -> None:
    def param(name: str, const: bool) -> SimpleNamespace:
        return SimpleNamespace(name=name, is_constexpr=const)

    kernel = SimpleNamespace(params=[param("x_ptr", False), param("n", False),
                                     param("BLOCK", True)])
    assert ks._bind(kernel, {"n": 5, "x_ptr": "X"}, {"BLOCK": 8}) == ["X", 5]
    with pytest.raises(KeyError, match="signature changed"):
        ks._bind(kernel, {"x_ptr": "X"}, {"BLOCK": 8})
    with pytest.raises(KeyError, match="no longer taken"):
        ks._bind(kernel, {"x_ptr": "X", "n": 1}, {"BLOCK": 8, "OLD": 1})


def test_every_variant_has_a_kernel_in_fewbit() -> None:
    import fewbit.kernels  # noqa: F401

    for v in ks.VARIANTS:
        mod = importlib.import_module(f"fewbit.kernels.{v.module}")
        assert hasattr(mod, v.kernel), v.name


def test_every_variant_binds_to_its_kernels_signature() -> None:
    """Each variant's arguments and constexprs match its kernel's parameters (no compiler
    needed): a kernel signature change fails here, not only in the GPU-less benchmark."""
    for v in ks.VARIANTS:
        mod = importlib.import_module(f"fewbit.kernels.{v.module}")
        kernel = getattr(mod, v.kernel)  # interpreted here: parameters from annotations
        args, consts, warps = v.build(mod)
        assert len(ks._bind(kernel, args, consts)) == len(args), v.name
        assert warps >= 1 and v.elements(consts) > 0, v.name

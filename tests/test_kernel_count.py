"""``opcount.CompiledKernels``: the kernels of compiled graphs, from inductor's output code."""

from __future__ import annotations

import torch

from mtrl_ntk.opcount import CompiledKernels, count_compiled_kernels, count_kernel_calls

# The shape of inductor's wrapper code (CPU and CUDA), with kernel sources in strings.
OUTPUT_CODE = """
cpp_fused_add_0 = async_compile.cpp_pybinding(['double*'], '''
extern "C" void kernel(double* out) { out[0] = 1.0; /* extern_kernels.mm(x) */ }
''')
triton_poi_fused_mul_1 = async_compile.triton('triton_poi_fused_mul_1', '''
def triton_poi_fused_mul_1(in_ptr0):
    torch.ops.aten.not_a_call.default(x)
''')

class Runner:
    def call(self, args):
        arg0_1, = args
        buf0 = empty_strided_cpu((3, 3), (3, 1), torch.float64)
        cpp_fused_add_0(arg0_1, buf0)
        extern_kernels.mm(buf0, arg0_1, out=buf1)
        buf2 = torch.ops.aten.linalg_cholesky_ex.default(buf1)
        buf3 = buf2[0]
        triton_poi_fused_mul_1.run(buf3, stream=stream0)
        extern_kernels.mm(buf3, buf3, out=buf4)
        return (buf4, )
"""


def test_count_kernel_calls_reads_the_calls_and_skips_the_kernel_sources() -> None:
    calls = count_kernel_calls(OUTPUT_CODE)
    assert calls == {
        "generated": 2,
        "extern_kernels.mm": 2,
        "torch.ops.aten.linalg_cholesky_ex": 1,
    }


def solve(matrix: torch.Tensor) -> torch.Tensor:
    system = matrix @ matrix.T + torch.eye(4, dtype=torch.float64)
    factor, _ = torch.linalg.cholesky_ex(system)
    return factor.exp() + 1.0


def test_compiled_kernels_counts_what_inductor_compiles_inside_the_block() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(solve, backend="inductor", fullgraph=True, dynamic=False)
    matrix = torch.randn(4, 4, dtype=torch.float64)
    with CompiledKernels() as kernels:
        result = compiled(matrix)
    torch.testing.assert_close(result, solve(matrix))
    assert len(kernels.sources) == 1
    assert kernels.by_name["torch.ops.aten.linalg_cholesky_ex"] == 1
    assert kernels.by_kind["extern"] + kernels.by_kind["library"] >= 2  # mm and cholesky
    assert kernels.by_kind["generated"] >= 1  # the eye-add and the exp
    assert kernels.total == sum(kernels.by_kind.values())
    with CompiledKernels() as again:
        compiled(matrix)  # already compiled: nothing new
    assert again.total == 0


def test_count_compiled_kernels_reads_the_same_code_without_compiling_the_kernels() -> None:
    matrix = torch.randn(4, 4, dtype=torch.float64)
    torch._dynamo.reset()
    with CompiledKernels() as compiled:
        torch.compile(solve, backend="inductor", fullgraph=True, dynamic=False)(matrix)
    torch._dynamo.reset()
    counted = count_compiled_kernels(solve, matrix)
    assert counted.by_name == compiled.by_name and counted.total == compiled.total > 0

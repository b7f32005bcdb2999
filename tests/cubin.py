"""Compile a Triton kernel for a real GPU target on a machine without a GPU, and read its resource usage.

`triton.compile` lowers the kernel through PTX to a cubin with triton's bundled ptxas; the bundled
`cuobjdump --dump-resource-usage` then reports registers, stack, shared and local (spill) memory.
"""

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCHS = {"sm80": 80, "sm90": 90}  # Ampere (A100) and Hopper (H100/H200)
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_for_gpu(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4) -> dict:
    """Compile `kernel` for `cuda:<arch>`; return {"registers", "stack", "shared", "local", "num_warps"}.

    signature maps every argument name to a triton type string ("*fp32", "i32", "fp32", "constexpr").
    """
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        text = subprocess.run(
            [_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(f.name)
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if not usage:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {
        "registers": int(usage["REG"]),
        "stack": int(usage["STACK"]),
        "shared": int(usage["SHARED"]),
        "local": int(usage["LOCAL"]),
        "num_warps": num_warps,
    }

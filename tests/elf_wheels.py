"""Stand-in wheels carrying small real ELF libraries with chosen DT_SONAME and DT_NEEDED entries.

Each library is built by gcc: `-Wl,--no-as-needed` against stub libraries whose soname is each
wanted DT_NEEDED entry (`-l:<file>` links a file by its exact name), so the linker writes the
entries itself. Everything lives under the test's tmp_path.
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path


def gcc() -> str:
    found = shutil.which("gcc") or shutil.which("cc")
    assert found, "gcc not found: the stand-in wheels' ELF libraries are built with it"
    return found


def build_library(work: Path, soname: str | None, needed: list[str], out_name: str) -> Path:
    """A shared library (or, with soname None, a Python-extension-like .so without DT_SONAME)
    whose DT_NEEDED are `needed` (plus libc.so.6, which gcc links)."""
    stubs = work / "stubs"
    stubs.mkdir(parents=True, exist_ok=True)
    source = work / "empty.c"
    if not source.exists():
        source.write_text("int stand_in(void) { return 0; }\n")
    for name in needed:
        if not (stubs / name).exists():
            subprocess.run([gcc(), "-shared", "-fPIC", "-o", str(stubs / name), f"-Wl,-soname,{name}",
                            str(source)], check=True)
    out = work / "built" / out_name
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [gcc(), "-shared", "-fPIC", "-o", str(out), str(source), f"-L{stubs}", "-Wl,--no-as-needed"]
    if soname:
        args.append(f"-Wl,-soname,{soname}")
    args += [f"-l:{name}" for name in needed]
    subprocess.run(args, check=True)
    return out


def write_wheel(path: Path, files: dict[str, bytes | Path]) -> Path:
    """A wheel (zip, deflated as real wheels are) with `files` and its dist-info."""
    name, version = path.name.split("-")[:2]
    dist_info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr(f"{name}/__init__.py", "")
        for member, content in files.items():
            wheel.writestr(member, content.read_bytes() if isinstance(content, Path) else content)
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n")
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


def as_gpu_code_object(library: Path) -> bytes:
    """The library's bytes with e_machine set to EM_AMDGPU (224): a stand-in for a HIP kernel
    file, which ld.so never loads."""
    data = bytearray(library.read_bytes())
    data[18:20] = (224).to_bytes(2, "little")
    return bytes(data)


def rocm_wheels(directory: Path, work: Path, torch_file: str, vllm_file: str) -> tuple[Path, Path]:
    """A torch wheel whose libraries need ROCm and glibc/gcc sonames and bundle libc10/libtorch,
    and a vLLM wheel whose extension needs torch's libraries and libamdhip64."""
    c10 = build_library(work, "libc10.so", ["libamdhip64.so.7"], "libc10.so")
    torch_lib = build_library(work, "libtorch.so", ["libc10.so", "libhipblas.so.3", "libMIOpen.so.1",
                                                   "libstdc++.so.6"], "libtorch.so")
    torch_c = build_library(work, None, ["libtorch.so", "libc10.so"], "_C.cpython-311-x86_64-linux-gnu.so")
    kernel = build_library(work, None, ["libnot-a-host-library.so.9"], "kernel.hsaco")
    torch = write_wheel(directory / torch_file, {
        "torch/lib/libc10.so": c10,
        "torch/lib/libtorch.so": torch_lib,
        "torch/_C.cpython-311-x86_64-linux-gnu.so": torch_c,
        "torch/lib/kernels/kernel.hsaco": as_gpu_code_object(kernel),
        "torch/lib/README.txt": b"not an ELF file\n" * 8,
    })
    vllm_c = build_library(work, None, ["libtorch.so", "libc10.so", "libamdhip64.so.7"], "_C.abi3.so")
    vllm = write_wheel(directory / vllm_file, {"vllm/_C.abi3.so": vllm_c})
    return torch, vllm

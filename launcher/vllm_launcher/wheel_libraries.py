"""Which shared libraries a wheel needs from outside itself, read from its ELF files.

`vllm-launcher artifacts lock` records the result per artifact in artifacts.lock.json
(`needs`: soname -> the first file needing it; `provides`: library name -> its directory in the
wheel), and nix/native-libraries.nix maps each needed soname to a nixpkgs package. A wheel
bundles a library when one of its ELF files has that DT_SONAME or that file name; everything
else its ELF files list as DT_NEEDED is needed from outside.

A small reader of the ELF dynamic section (ELF header, program headers, PT_DYNAMIC, the dynamic
string table), not pyelftools: it reads each zip member as a stream, forward except for one
seek back to the string table (which linkers place near the start), so a gigabyte-sized
libtorch_hip.so is decompressed about once and never written to disk; pyelftools seeks to the
section headers at the end of the file and back, and a compressed zip member restarts its
decompression on every backward seek. It also keeps the launcher free of a dependency.
Formats: ELF32/ELF64, either byte order (System V gABI, "Dynamic Section").
"""

from __future__ import annotations

import posixpath
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ELF_MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_SONAME = 0, 1, 5, 10, 14
# GPU code objects (HIP/Triton kernels, .hsaco) are ELF files too, loaded by the HIP runtime,
# never by ld.so: their entries say nothing about the host's libraries.
EM_AMDGPU = 224


class ElfError(ValueError):
    """A file that starts like an ELF file but cannot be read as one."""


@dataclass
class ElfDynamic:
    machine: int
    soname: str | None = None
    needed: list[str] = field(default_factory=list)


def _read_exact(stream: IO[bytes], offset: int, size: int, what: str) -> bytes:
    stream.seek(offset)
    data = stream.read(size)
    if len(data) != size:
        raise ElfError(f"truncated: {what} at offset {offset} ({size} bytes) past the end")
    return data


def read_elf_dynamic(stream: IO[bytes]) -> ElfDynamic | None:
    """DT_SONAME and DT_NEEDED of the ELF file in `stream` (seekable); None if it is no ELF."""
    ident = stream.read(16)
    if ident[:4] != ELF_MAGIC:
        return None
    if len(ident) < 16 or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        raise ElfError(f"unknown ELF class {ident[4:5]!r} or byte order {ident[5:6]!r}")
    wide = ident[4] == 2
    order = "<" if ident[5] == 1 else ">"
    if wide:
        header = struct.Struct(order + "HHIQQQIHHHHHH")
        phdr = struct.Struct(order + "IIQQQQQQ")  # type flags offset vaddr paddr filesz memsz align
        dyn = struct.Struct(order + "qQ")
    else:
        header = struct.Struct(order + "HHIIIIIHHHHHH")
        phdr = struct.Struct(order + "IIIIIIII")  # type offset vaddr paddr filesz memsz flags align
        dyn = struct.Struct(order + "iI")
    (_type, machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     *_rest) = header.unpack(_read_exact(stream, 16, header.size, "ELF header"))
    result = ElfDynamic(machine=machine)
    if phnum == 0:
        return result
    if phentsize < phdr.size:
        raise ElfError(f"program header entries of {phentsize} bytes (expected {phdr.size})")
    table = _read_exact(stream, phoff, phentsize * phnum, "program headers")
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic = None
    for index in range(phnum):
        fields = phdr.unpack_from(table, index * phentsize)
        if wide:
            p_type, _f, p_offset, p_vaddr, _p, p_filesz, *_ = fields
        else:
            p_type, p_offset, p_vaddr, _p, p_filesz, *_ = fields
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:  # statically linked
        return result
    data = _read_exact(stream, dynamic[0], dynamic[1], "dynamic section")
    entries: list[tuple[int, int]] = []
    for offset in range(0, len(data) - dyn.size + 1, dyn.size):
        tag, value = dyn.unpack_from(data, offset)
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    strtab = next((v for t, v in entries if t == DT_STRTAB), None)
    strsz = next((v for t, v in entries if t == DT_STRSZ), None)
    names = [(t, v) for t, v in entries if t in (DT_NEEDED, DT_SONAME)]
    if not names:
        return result
    if strtab is None or strsz is None:
        raise ElfError("DT_NEEDED/DT_SONAME without DT_STRTAB/DT_STRSZ")
    # DT_STRTAB is an address: the file offset is where a PT_LOAD segment maps it.
    segment = next(((v, o, s) for v, o, s in loads if v <= strtab < v + s), None)
    if segment is None:
        raise ElfError(f"DT_STRTAB 0x{strtab:x} lies in no loaded segment")
    strings = _read_exact(stream, strtab - segment[0] + segment[1], strsz, "dynamic string table")
    for tag, value in names:
        end = strings.find(b"\0", value)
        if value >= len(strings) or end < 0:
            raise ElfError(f"string offset {value} outside the dynamic string table ({strsz} bytes)")
        name = strings[value:end].decode("utf-8", "surrogateescape")
        if tag == DT_NEEDED:
            result.needed.append(name)
        else:
            result.soname = name
    return result


@dataclass
class WheelLibraries:
    """`needs`: soname -> the first file (sorted) needing it, for the sonames no file of the
    wheel provides; `provides`: library name (DT_SONAME, or a lib*.so* file name) -> the
    directory holding it, inside the wheel."""

    needs: dict[str, str]
    provides: dict[str, str]
    elf_files: int


def _is_library_name(name: str) -> bool:
    return name.startswith("lib") and (name.endswith(".so") or ".so." in name)


def scan_wheel(path: Path) -> WheelLibraries:
    """Read every ELF file of the wheel at `path` (a zip). Raises ElfError naming the member."""
    needed: dict[str, str] = {}
    bundled: set[str] = set()
    provides: dict[str, str] = {}
    count = 0
    with zipfile.ZipFile(path) as wheel:
        for info in sorted(wheel.infolist(), key=lambda i: i.filename):
            if info.is_dir() or info.file_size < 64:
                continue
            with wheel.open(info) as member:
                try:
                    elf = read_elf_dynamic(member)
                except (ElfError, struct.error) as exc:
                    raise ElfError(f"{path.name}: {info.filename}: {exc}") from exc
            if elf is None or elf.machine == EM_AMDGPU:
                continue
            count += 1
            directory, base = posixpath.split(info.filename)
            bundled.add(base)
            for name in filter(None, [elf.soname, base if _is_library_name(base) else None]):
                bundled.add(name)
                provides.setdefault(name, directory)
            for name in elf.needed:
                needed.setdefault(name, info.filename)
    needs = {name: needed[name] for name in sorted(needed) if name not in bundled}
    return WheelLibraries(needs=needs, provides=dict(sorted(provides.items())), elf_files=count)

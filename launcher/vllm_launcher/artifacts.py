"""`vllm-launcher artifacts`: hash, verify and add the private wheels named in artifacts.lock.json.

The torch and vLLM wheels are private local files: the repository cannot know their hashes. The
committed lock therefore names each wheel with an empty `sha256`; `lock DIR` fills in the hash and
size of the files a user holds, `verify DIR` checks files against the lock, and `add DIR` puts them
into the Nix store with `nix-store --add-fixed sha256` (what nixpkgs' `requireFile` expects).
The lock format (schema version 1) is described by nix/artifacts.schema.json and read by
nix/lock.nix.

`lock DIR` also reads each wheel's ELF files (wheel_libraries.py) and records per artifact the
sonames it needs and does not bundle (`needs`) and the libraries it bundles (`provides`):
nix/native-libraries.nix maps those sonames to nixpkgs packages, so the wheels themselves, not
a hand list, decide which ROCm libraries Nix links them against and the image carries.

`lock DIR` also re-locks the engines' Python closure, `python-env/uv.lock` next to the lock file
(`--python-env DIR` names another, `--no-relock` skips it), against the wheels' own METADATA:
the committed python-env/pyproject.toml describes the private wheels with
`[[tool.uv.dependency-metadata]]` entries (their Requires-Dist as vLLM's sources give them) and
lets uv lock PyPI's torch and vllm files as placeholders. The re-lock works on a copy in a
temporary directory: the pyproject with those entries replaced by `[tool.uv.sources]` path
entries `torch = { path = "wheels/<file>" }` (and vllm, and `pytorch-triton-rocm` when torch's
METADATA requires it or the lock names it), the wheels symlinked into `wheels/`, the launcher
reachable as `../launcher` (a symlink), and the current uv.lock so uv keeps the versions it can.
`uv lock` runs there (it may ask PyPI for new dependencies); then the rewritten pyproject.toml
and the new uv.lock replace python-env's, and one line per added, removed or changed package is
printed ("closure unchanged" otherwise). uv records a path wheel as
`source = { path = "wheels/<file>" }` with `wheels = [{ filename, hash = "sha256:..." }]`: the
lock holds relative paths only (refused otherwise), and the hash must equal artifacts.lock.json's.

On a clone without the wheels the rewritten pyproject's `wheels/<file>` paths do not exist.
uv2nix never reads them (the Nix overlay swaps in the requireFile'd wheels pinned in
artifacts.lock.json, whose hashes the uv.lock repeats), so Nix builds as before; but a plain
`uv lock` in python-env then fails on the missing files: keep the committed uv.lock, or re-run
`vllm-launcher artifacts lock DIR` with the wheels (`git checkout python-env/` goes back to the
placeholder form).
"""

from __future__ import annotations

import base64
import copy
import email.parser
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import click

from .wheel_libraries import ElfError, scan_wheel

LOCK_VERSION = 1
DEFAULT_LOCK_FILE = "artifacts.lock.json"
LOCK_ENV = "VLLM_ARTIFACTS_LOCK"
CHUNK = 1 << 20
# Written by `lock` from each wheel's ELF files (wheel_libraries.py), read by
# nix/native-libraries.nix: `needs` soname -> first file needing it, `provides` name -> directory.
LIBRARY_KEYS = ("needs", "provides")
# Files at least this large get a progress bar (the torch wheel is 544 MB).
PROGRESS_MIN_BYTES = 8 << 20

# PEP 427: {distribution}-{version}(-{build tag})?-{python tag}-{abi tag}-{platform tag}.whl
WHEEL_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.!+]+)"
    r"(?:-(?P<build>\d[A-Za-z0-9_.]*))?-(?P<py>[A-Za-z0-9_.]+)-(?P<abi>[A-Za-z0-9_.]+)"
    r"-(?P<plat>[A-Za-z0-9_.]+)\.whl$"
)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# The lock a fresh clone starts from: the two wheels this project is built around, unhashed.
DEFAULT_LOCK: dict = {
    "$schema": "./nix/artifacts.schema.json",
    "version": LOCK_VERSION,
    "artifacts": [
        {
            "name": "torch",
            "version": "2.9.1",
            "filename": "torch-2.9.1-cp311-cp311-linux_x86_64.whl",
            "sha256": "",
            "size": None,
        },
        {
            "name": "vllm",
            "version": "0.12.0+rocm711",
            "filename": "vllm-0.12.0+rocm711-cp311-cp311-linux_x86_64.whl",
            "sha256": "",
            "size": None,
        },
    ],
}


class LockError(click.ClickException):
    """A problem with the lock file itself (exit status 2)."""

    exit_code = 2


def normalize_name(name: str) -> str:
    """PEP 503 normalisation; wheel file names use `_` where the project name has `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel_filename(filename: str) -> dict[str, str] | None:
    match = WHEEL_RE.match(filename)
    return match.groupdict() if match else None


# --- lock file -------------------------------------------------------------------------------


def validate_lock(data: object, source: str) -> list[str]:
    """Every problem of a lock document, each naming where it is and what is accepted."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return [f"{source}: the top level must be a JSON object"]
    if data.get("version") != LOCK_VERSION:
        problems.append(f"{source}: version={data.get('version')!r}: must be {LOCK_VERSION}")
    entries = data.get("artifacts")
    if not isinstance(entries, list) or not entries:
        return problems + [f"{source}: 'artifacts' must be a non-empty list of entries"]
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{source}: artifacts[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object")
            continue
        name = entry.get("name")
        if isinstance(name, str):
            where = f"{where} ({name})"
        unknown = set(entry) - {"name", "version", "filename", "sha256", "size", "url", *LIBRARY_KEYS}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
        if not isinstance(name, str) or not NAME_RE.match(name):
            problems.append(f"{where}: name={name!r}: must be a package name (letters, digits, . _ -)")
        elif normalize_name(name) in seen:
            problems.append(f"{where}: name {name!r} appears twice")
        else:
            seen.add(normalize_name(name))
        if not isinstance(entry.get("version"), str) or not entry.get("version"):
            problems.append(f"{where}: version={entry.get('version')!r}: must be a non-empty string")
        filename = entry.get("filename")
        parsed = parse_wheel_filename(filename) if isinstance(filename, str) else None
        if parsed is None:
            problems.append(
                f"{where}: filename={filename!r}: must be an exact PEP 427 wheel file name "
                "(name-version-python-abi-platform.whl)"
            )
        elif isinstance(name, str) and normalize_name(parsed["name"]) != normalize_name(name):
            problems.append(f"{where}: filename {filename!r} is not a wheel of {name!r}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not (sha == "" or SHA256_RE.match(sha)):
            problems.append(
                f"{where}: sha256={sha!r}: must be 64 lower-case hex digits, or \"\" while unlocked"
            )
        size = entry.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            problems.append(f"{where}: size={size!r}: must be a byte count or null")
        if sha and size is None:
            problems.append(f"{where}: a locked entry (sha256 set) needs its size")
        for key in LIBRARY_KEYS:
            value = entry.get(key)
            if value is not None and not (
                isinstance(value, dict)
                and all(isinstance(k, str) and k and isinstance(v, str) for k, v in value.items())
            ):
                problems.append(f"{where}: {key} must map library names to paths in the wheel "
                                "(written by `vllm-launcher artifacts lock DIR`)")
        url = entry.get("url")
        if url is not None and (not isinstance(url, str) or not re.match(r"^(https?|file)://", url)):
            problems.append(f"{where}: url={url!r}: must be an http(s):// or file:// URL")
    return problems


def default_lock_path() -> Path:
    return Path(os.environ.get(LOCK_ENV) or DEFAULT_LOCK_FILE)


def read_lock(path: Path, *, missing_ok: bool = False) -> dict:
    if not path.exists():
        if missing_ok:
            return copy.deepcopy(DEFAULT_LOCK)
        raise LockError(f"{path}: lock file not found (run `vllm-launcher artifacts lock DIR` first)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LockError(f"{path}: cannot read the lock file: {exc}") from exc
    problems = validate_lock(data, str(path))
    if problems:
        raise LockError("\n".join(problems))
    return data


def write_lock(path: Path, data: dict) -> None:
    problems = validate_lock(data, str(path))
    if problems:  # never write a lock Nix would refuse
        raise LockError("\n".join(problems))
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file beside `path`, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --- hashing ---------------------------------------------------------------------------------


def sha256_file(path: Path, *, progress: bool = True) -> str:
    """Streaming sha256 (1 MiB reads) with a click progress bar on stderr for large files."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if progress and size >= PROGRESS_MIN_BYTES:
            with click.progressbar(
                length=size, label=f"sha256 {path.name}", file=sys.stderr, show_eta=True
            ) as bar:
                for block in iter(lambda: handle.read(CHUNK), b""):
                    digest.update(block)
                    bar.update(len(block))
        else:
            for block in iter(lambda: handle.read(CHUNK), b""):
                digest.update(block)
    return digest.hexdigest()


_NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"


def nix_base32(data: bytes) -> str:
    """Nix's base-32 encoding (libutil/hash.cc printHash32)."""
    length = (len(data) * 8 - 1) // 5 + 1
    chars = []
    for n in range(length - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        value = data[i] >> j
        if i + 1 < len(data):
            value |= data[i + 1] << (8 - j)
        chars.append(_NIX32_ALPHABET[value & 0x1F])
    return "".join(chars)


def fixed_output_store_path(sha256_hex: str, name: str, store_dir: str = "/nix/store") -> str:
    """Store path of `nix-store --add-fixed sha256 FILE` (flat hashing), i.e. of requireFile.

    Follows Nix's makeFixedOutputPath: inner = sha256("fixed:out:sha256:<hex>:"), then
    sha256("output:out:sha256:<inner hex>:<store>:<name>") compressed to 20 bytes.
    """
    inner = hashlib.sha256(f"fixed:out:sha256:{sha256_hex}:".encode()).hexdigest()
    outer = hashlib.sha256(f"output:out:sha256:{inner}:{store_dir}:{name}".encode()).digest()
    compressed = bytearray(20)
    for index, byte in enumerate(outer):
        compressed[index % 20] ^= byte
    return f"{store_dir}/{nix_base32(bytes(compressed))}-{name}"


def sri_sha256(sha256_hex: str) -> str:
    return "sha256-" + base64.b64encode(bytes.fromhex(sha256_hex)).decode()


# --- finding files ---------------------------------------------------------------------------


def find_wheel(directory: Path, entry: dict) -> Path | None:
    """The exact file name first; otherwise the one wheel of that project in DIR."""
    exact = directory / entry["filename"]
    if exact.is_file():
        return exact
    wanted = normalize_name(entry["name"])
    candidates = []
    for path in sorted(directory.glob("*.whl")):
        parsed = parse_wheel_filename(path.name)
        if parsed and normalize_name(parsed["name"]) == wanted:
            candidates.append(path)
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise click.ClickException(
            f"{directory}: several wheels of {entry['name']!r} ({names}); keep one, or name it "
            f"exactly {entry['filename']!r}"
        )
    return candidates[0] if candidates else None


@dataclass
class Check:
    entry: dict
    path: Path
    problem: str | None


def check_entry(directory: Path, entry: dict, *, progress: bool) -> Check:
    path = directory / entry["filename"]
    expected = f"sha256 {entry['sha256'] or '(none)'}, {entry['size']} bytes"
    if not entry["sha256"]:
        return Check(entry, path, f"{entry['name']}: not locked yet (empty sha256): run "
                     f"`vllm-launcher artifacts lock {directory}`")
    if not path.is_file():
        return Check(entry, path, f"{path}: missing (expected {entry['filename']}, {expected})")
    size = path.stat().st_size
    if entry["size"] is not None and size != entry["size"]:
        return Check(entry, path, f"{path}: size {size} bytes, expected {entry['size']} bytes "
                     f"({expected})")
    actual = sha256_file(path, progress=progress)
    if actual != entry["sha256"]:
        return Check(entry, path, f"{path}: sha256 {actual}, expected {entry['sha256']}")
    return Check(entry, path, None)


# --- re-locking the Python closure (python-env/uv.lock) -------------------------------------

PYTHON_ENV_DIR = "python-env"
TRITON_ROCM = "pytorch-triton-rocm"
# Written into python-env/pyproject.toml's [tool.uv.sources] above the wheels' path entries.
SOURCES_COMMENT = [
    "# Written by `vllm-launcher artifacts lock DIR`: the private wheels, read from wheels/ while",
    "# locking (sha256 in ../artifacts.lock.json and uv.lock). uv2nix never reads these paths (Nix",
    "# swaps in the requireFile'd wheels); a plain `uv lock` here fails without the files: keep",
    "# uv.lock, or re-run `artifacts lock DIR` (`git checkout python-env/` restores placeholders).",
]
# Added to override-dependencies with the third wheel: PyPI's triton and pytorch-triton-rocm
# both install the `triton` package, and xgrammar still requires `triton` by name.
TRITON_OVERRIDE = "\"triton; sys_platform == 'never'\","
TRITON_OVERRIDE_COMMENT = (
    "  # pytorch-triton-rocm (artifacts.lock.json) provides the `triton` module: "
    "no PyPI triton beside it."
)
# Overridden out of the closure while no ROCm torchvision is an artifact (PyPI's is a CUDA build,
# timm requires it); with one, `lock` drops these overrides and timm comes back.
TORCHVISION = "torchvision"
TORCHVISION_OVERRIDES = ("torchvision", "timm")
# Sonames a torchvision extension shares with torch: torch's own libraries and the HIP runtime.
# A ROCm torchvision must find each in the user's torch wheel (bundled, or needed by it).
TORCH_SONAME = re.compile(r"lib(c10|torch|caffe2|shm)(_\w+)?\.so.*|libamdhip64\.so.*|libhiprtc\.so.*")
CUDA_SONAME = re.compile(
    r"lib(cuda|cudart|cublas(Lt)?|cudnn\w*|nvrtc(-builtins)?|nvJitLink|nvToolsExt|nvjpeg|nccl|cusparse(Lt)?"
    r"|cufftw?|curand|cusolver(Mg)?|cupti|cufile(_rdma)?|nvshmem\w*|nvidia-ml|c10_cuda|torch_cuda\w*|caffe2_nvrtc)"
    r"([.-].*)?\.so.*")
_HEADER_RE = re.compile(r"^\[\[?\s*([A-Za-z0-9_.\-]+)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r'^\s*"?([A-Za-z0-9][A-Za-z0-9._-]*)"?\s*=')


def wheel_requires(path: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    try:
        with zipfile.ZipFile(path) as wheel:
            names = [n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if not names:
                raise click.ClickException(f"{path}: no *.dist-info/METADATA in this wheel")
            metadata = email.parser.BytesParser().parsebytes(wheel.read(names[0]))
    except zipfile.BadZipFile as exc:
        raise click.ClickException(f"{path}: not a wheel (zip) file: {exc}") from exc
    return [str(value) for value in metadata.get_all("Requires-Dist") or []]


def required_triton(torch_wheel: Path) -> str | None:
    """The file name of the pytorch-triton-rocm wheel torch's METADATA requires, if it does.

    By name only: the torch ROCm wheel's marker (Linux, x86_64) is the closure's platform; a
    requirement under an `extra ==` marker is optional and ignored.
    """
    for requirement in wheel_requires(torch_wheel):
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?$", requirement)
        if not match or normalize_name(match.group(1)) != TRITON_ROCM:
            continue
        if match.group(4) and "extra" in match.group(4):
            continue
        pin = re.search(r"===?\s*([A-Za-z0-9_.!+]+)", match.group(3) or "")
        tags = parse_wheel_filename(torch_wheel.name) or {}
        version = pin.group(1) if pin else "<version>"
        return (f"pytorch_triton_rocm-{version}-{tags.get('py', 'cp311')}-{tags.get('abi', 'cp311')}"
                f"-{tags.get('plat', 'linux_x86_64')}.whl")
    return None


def find_required_triton(directory: Path, torch_wheel: Path, lock_path: Path) -> tuple[dict, Path] | None:
    """(new lock entry, file) of the pytorch-triton-rocm wheel torch requires, None if it does
    not; an error naming the file expected when DIRECTORY lacks it."""
    expected = required_triton(torch_wheel)
    if expected is None:
        return None
    entry = {"name": TRITON_ROCM, "version": expected.split("-")[1], "filename": expected,
             "sha256": "", "size": None}
    wheel = find_wheel(directory, entry)
    if wheel is None:
        raise click.ClickException(
            f"{directory / expected}: not found: {torch_wheel.name} requires {TRITON_ROCM} (its "
            f"METADATA's Requires-Dist), which is not on PyPI; put that wheel in {directory} (it "
            f"joins the lock as a third artifact), or lock without re-locking: --no-relock.\n"
            f"{lock_path} left unchanged."
        )
    return entry, wheel


def uv_command() -> list[str]:
    """uv on PATH, else `python -m uv` when the uv package is installed beside the launcher."""
    found = shutil.which("uv")
    if found:
        return [found]
    if importlib.util.find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    raise click.ClickException(
        "uv is needed to re-lock python-env/uv.lock: pip install uv (with Nix: "
        "`nix shell nixpkgs#uv`), or pass --no-relock"
    )


def _split_blocks(lines: list[str]) -> list[tuple[str | None, list[str]]]:
    """TOML text as (table name, lines) blocks; a comment run right above a header joins it."""
    blocks: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in lines:
        header = _HEADER_RE.match(line)
        if header is None:
            blocks[-1][1].append(line)
            continue
        previous = blocks[-1][1]
        start = len(previous)
        while start > 0 and previous[start - 1].startswith("#"):
            start -= 1
        leading = previous[start:]
        del previous[start:]
        blocks.append((header.group(1), leading + [line]))
    return blocks


def _insert_before_close(body: list[str], key: str, new_lines: list[str]) -> None:
    """Insert lines before the `]` closing the multi-line array `key = [`."""
    opening = next(i for i, line in enumerate(body) if re.match(rf"^{re.escape(key)}\s*=\s*\[\s*$", line))
    closing = next(i for i in range(opening + 1, len(body)) if body[i].strip() == "]")
    body[closing:closing] = new_lines


def _requirement_name(requirement: str) -> str:
    return normalize_name(re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0])


def _drop_overrides(body: list[str], projects: tuple[str, ...]) -> None:
    """Remove the override-dependencies entries of `projects` and the comment run above them."""
    kept: list[str] = []
    for line in body:
        if line.strip().startswith('"') and _requirement_name(line.strip().strip('",')) in projects:
            while kept and kept[-1].strip().startswith("#"):
                kept.pop()
            continue
        kept.append(line)
    body[:] = kept


def check_torchvision(entries: list[dict]) -> None:
    """A torchvision artifact must be built for the user's torch: every torch or HIP runtime
    soname its ELF files need is one the torch wheel bundles or needs itself, and no CUDA one
    (PyTorch's own ROCm index builds against PyTorch's ROCm torch, not necessarily yours)."""
    by_name = {normalize_name(e["name"]): e for e in entries}
    vision, torch = by_name.get(TORCHVISION), by_name.get("torch")
    if vision is None or torch is None:
        return
    torch_has = set(torch.get("needs", {})) | set(torch.get("provides", {}))
    cuda = [s for s in vision.get("needs", {}) if CUDA_SONAME.fullmatch(s)]
    other = [s for s in vision.get("needs", {}) if TORCH_SONAME.fullmatch(s) and s not in torch_has and s not in cuda]
    if cuda or other:
        lines = [f"{s} (needed by {vision['needs'][s]}): a CUDA library" for s in cuda]
        lines += [f"{s} (needed by {vision['needs'][s]}): not in {torch['filename']}, which has "
                  f"{', '.join(sorted(n for n in torch_has if TORCH_SONAME.fullmatch(n))) or 'none of these'}"
                  for s in other]
        raise click.ClickException(
            f"{vision['filename']} is not built for your torch wheel, refused:\n  " + "\n  ".join(lines)
            + "\nUse a torchvision built against this torch and ROCm, or remove it from the directory "
            "(without it the closure has no torchvision; docs/nix.md, torchvision).")


def find_torchvision(directory: Path, data: dict) -> None:
    """A torchvision wheel in DIRECTORY joins the lock as an optional artifact."""
    if any(normalize_name(e["name"]) == TORCHVISION for e in data["artifacts"]):
        return
    entry = {"name": TORCHVISION, "version": "", "filename": "torchvision.whl", "sha256": "", "size": None}
    if find_wheel(directory, entry) is not None:
        data["artifacts"].append(entry)


def rewrite_pyproject(text: str, wheels: dict[str, str]) -> str:
    """python-env/pyproject.toml with the artifacts as path sources `wheels/<file>`.

    `wheels` maps each artifact's project name to its wheel file name. Drops the
    `[[tool.uv.dependency-metadata]]` entries of those projects (their stand-in Requires-Dist)
    with the comments above them, replaces any earlier path entries, and makes each artifact a
    direct dependency (uv applies sources to direct dependencies only: pytorch-triton-rocm is
    torch's), overriding PyPI's triton out of the closure beside pytorch-triton-rocm.
    """
    names = {normalize_name(name) for name in wheels}
    blocks = []
    for table, body in _split_blocks(text.splitlines()):
        if table == "tool.uv.dependency-metadata":
            entry = tomllib.loads("\n".join(line for line in body if not _HEADER_RE.match(line)))
            if normalize_name(entry.get("name", "")) in names:
                continue
        blocks.append((table, body))
    current = tomllib.loads(text)
    dependencies = {_requirement_name(d) for d in current.get("project", {}).get("dependencies", [])}
    overrides = current.get("tool", {}).get("uv", {}).get("override-dependencies", [])
    has_sources = any(table == "tool.uv.sources" for table, _ in blocks)
    if not has_sources:
        blocks.append(("tool.uv.sources", ["", "[tool.uv.sources]"]))
    for table, body in blocks:
        if table == "project" and names - dependencies:
            _insert_before_close(body, "dependencies", [
                "  # Private wheels of ../artifacts.lock.json (torch's METADATA requires",
                "  # pytorch-triton-rocm): uv applies path sources to direct dependencies only.",
            ] + [f'  "{name}",' for name in wheels if normalize_name(name) not in dependencies])
        if table == "tool.uv" and TORCHVISION in names:
            _drop_overrides(body, TORCHVISION_OVERRIDES)
        if table == "tool.uv" and TRITON_ROCM in names and not any(
            _requirement_name(o) == "triton" for o in overrides
        ):
            if not overrides:
                raise click.ClickException(
                    "python-env/pyproject.toml: [tool.uv] needs an override-dependencies = [ ... ] "
                    "array (one entry a line) to take PyPI's triton out beside pytorch-triton-rocm"
                )
            _insert_before_close(body, "override-dependencies", [TRITON_OVERRIDE_COMMENT, f"  {TRITON_OVERRIDE}"])
        elif table == "tool.uv.sources":
            kept = [
                line for line in body
                if line not in SOURCES_COMMENT
                and not ((key := _KEY_RE.match(line)) and normalize_name(key.group(1)) in names)
            ]
            end = len(kept)
            while end > 0 and not kept[end - 1].strip():
                end -= 1
            added = SOURCES_COMMENT + [
                f'{name} = {{ path = "wheels/{filename}" }}' for name, filename in wheels.items()
            ]
            body[:] = kept[:end] + added + kept[end:]
    result = "\n".join(line for _, body in blocks for line in body).rstrip("\n") + "\n"
    tomllib.loads(result)  # never write a pyproject uv cannot read
    return result


def _lock_packages(text: str) -> dict[str, list[dict]]:
    packages: dict[str, list[dict]] = {}
    for package in tomllib.loads(text).get("package", []):
        packages.setdefault(normalize_name(package["name"]), []).append(package)
    return packages


def _source(package: dict) -> str:
    source = package.get("source", {})
    if "registry" in source:
        return "PyPI" if "pypi.org" in source["registry"] else source["registry"]
    return next(iter(source.values()), "?") if source else "?"


def _hashes(packages: list[dict]) -> list[str]:
    return sorted(wheel.get("hash", "") for package in packages for wheel in package.get("wheels", []))


def closure_changes(old: str | None, new: str) -> list[str]:
    """One line per package added, removed or changed (version, source or wheel hash)."""
    before = _lock_packages(old) if old else {}
    after = _lock_packages(new)
    lines = []
    for name in sorted(set(before) | set(after)):
        old_p, new_p = before.get(name, []), after.get(name, [])
        old_v = ", ".join(p["version"] for p in old_p)
        new_v = ", ".join(p["version"] for p in new_p)
        new_src = ", ".join(_source(p) for p in new_p)
        old_src = ", ".join(_source(p) for p in old_p)
        if not old_p:
            lines.append(f"added   {name} {new_v} ({new_src})")
        elif not new_p:
            lines.append(f"removed {name} {old_v}")
        elif old_v != new_v:
            lines.append(f"changed {name} {old_v} -> {new_v} ({new_src})")
        elif old_src != new_src:
            lines.append(f"changed {name} {new_v}: {old_src} -> {new_src}")
        elif _hashes(old_p) != _hashes(new_p):
            lines.append(f"changed {name} {new_v}: new wheel hash ({new_src})")
    return lines


def _outside_paths(pyproject: str) -> list[str]:
    """Relative path sources that leave the python-env directory (`../launcher`)."""
    sources = tomllib.loads(pyproject).get("tool", {}).get("uv", {}).get("sources", {})
    paths = []
    for source in sources.values():
        for item in source if isinstance(source, list) else [source]:
            path = item.get("path") if isinstance(item, dict) else None
            if path and not os.path.isabs(path) and Path(path).parts[0] == "..":
                paths.append(path)
    return paths


def check_relocked(lock_text: str, allowed_outside: list[str], entries: list[dict]) -> None:
    """No absolute path, nothing outside python-env but the pyproject's own `../` sources, and
    each artifact's wheel hash in uv.lock equal to artifacts.lock.json's."""
    problems = []
    allowed = {os.path.normpath(path) for path in allowed_outside}
    packages = _lock_packages(lock_text)
    for name, versions in packages.items():
        for package in versions:
            for kind, value in package.get("source", {}).items():
                if kind not in ("path", "directory", "editable", "virtual"):
                    continue
                if os.path.isabs(value) or (
                    Path(value).parts[:1] == ("..",) and os.path.normpath(value) not in allowed
                ):
                    problems.append(f"{name}: source {kind} = {value!r} is outside python-env")
    for entry in entries:
        versions = packages.get(normalize_name(entry["name"]), [])
        hashes = _hashes(versions)
        if hashes != [f"sha256:{entry['sha256']}"]:
            problems.append(f"{entry['name']}: uv.lock has {hashes or 'no wheel'}, "
                            f"artifacts.lock.json sha256:{entry['sha256']}")
    if problems:
        raise click.ClickException("the re-locked uv.lock is not usable, nothing written:\n"
                                   + "\n".join(problems))


def relock_closure(env_dir: Path, wheels: dict[str, Path], uv: list[str]) -> tuple[str, str]:
    """(pyproject text, uv.lock text) re-locked against `wheels` ({project name: file})."""
    pyproject = rewrite_pyproject((env_dir / "pyproject.toml").read_text(),
                                  {name: path.name for name, path in wheels.items()})
    with tempfile.TemporaryDirectory(prefix="vllm-relock-") as tmp:
        work = Path(tmp) / "python-env"
        (work / "wheels").mkdir(parents=True)
        for path in wheels.values():
            (work / "wheels" / path.name).symlink_to(path.resolve())
        for relative in _outside_paths(pyproject):  # ../launcher -> <tmp>/launcher
            link = Path(os.path.normpath(work / relative))
            if not link.is_relative_to(tmp):
                raise click.ClickException(f"{env_dir / 'pyproject.toml'}: source path {relative!r} "
                                           "reaches more than one directory above python-env")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to((env_dir / relative).resolve())
        (work / "pyproject.toml").write_text(pyproject)
        if (env_dir / "uv.lock").is_file():
            shutil.copyfile(env_dir / "uv.lock", work / "uv.lock")
        click.echo(f"re-locking {env_dir / 'uv.lock'} against the wheels' METADATA (uv lock)", err=True)
        env = dict(os.environ)
        if sys.version_info[:2] == (3, 11):  # the closure's Python: spare uv the search for one
            env.setdefault("UV_PYTHON", sys.executable)
        result = subprocess.run([*uv, "lock"], cwd=work, env=env, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise click.ClickException(
                f"uv lock failed (exit status {result.returncode}, its messages above); "
                f"nothing written ({env_dir}, the artifacts lock)"
            )
        return pyproject, (work / "uv.lock").read_text()


# --- the wheels' native libraries ------------------------------------------------------------


def record_libraries(entry: dict, wheel: Path) -> None:
    """Write the libraries the wheel needs from outside itself (and those it provides) into its
    lock entry; nix/native-libraries.nix maps each needed soname to a nixpkgs package."""
    click.echo(f"{entry['name']}: reading the ELF files of {wheel.name}", err=True)
    try:
        found = scan_wheel(wheel)
    except (ElfError, zipfile.BadZipFile, OSError) as exc:
        raise click.ClickException(f"{wheel}: cannot read its native libraries: {exc}") from exc
    entry["needs"] = found.needs
    entry["provides"] = found.provides
    names = ", ".join(found.needs) or "none"
    click.echo(f"{entry['name']}: {found.elf_files} ELF files, {len(found.provides)} libraries of "
               f"its own; needs from outside: {names}")


# --- commands --------------------------------------------------------------------------------

_lock_option = click.option(
    "--lock-file",
    "lock_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar=LOCK_ENV,
    show_envvar=True,
    help=f"The lock file [default: ./{DEFAULT_LOCK_FILE}].",
)
_dir_argument = click.argument(
    "directory", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
_progress_option = click.option(
    "--progress/--no-progress", default=True, help="Progress bar while hashing large files."
)


@click.group(help="Pin the private torch/vLLM wheels in artifacts.lock.json and add them to the Nix store.")
def artifacts() -> None:
    pass


@artifacts.command("lock")
@_dir_argument
@_lock_option
@_progress_option
@click.option(
    "--python-env",
    "python_env",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help=f"The uv project to re-lock [default: {PYTHON_ENV_DIR}/ next to the lock file].",
)
@click.option("--relock/--no-relock", default=True,
              help="Re-lock python-env/uv.lock against the wheels' METADATA (needs uv).")
def lock_command(
    directory: Path, lock_file: Path | None, progress: bool, python_env: Path | None, relock: bool
) -> None:
    """Find each wheel of the lock in DIRECTORY, hash it and write sha256 and size to the lock;
    then re-lock the engines' closure (python-env/uv.lock) against the wheels' METADATA.

    Without a lock file, one naming the torch 2.9.1 and vLLM 0.12.0+rocm711 wheels is created.
    A wheel found under another file name of the same project updates filename and version.
    When torch's METADATA requires pytorch-triton-rocm, its wheel must be in DIRECTORY too (it
    joins the lock). Each wheel's ELF files are read: the sonames it needs from outside itself
    are written to its entry (`needs`), for Nix to map to packages. The re-lock prints each
    package added, removed or changed.
    """
    path = lock_file or default_lock_path()
    data = read_lock(path, missing_ok=True)
    env_dir = None
    if relock:
        env_dir = python_env or path.parent / PYTHON_ENV_DIR
        if not (env_dir / "pyproject.toml").is_file():
            click.echo(f"warning: {env_dir / 'pyproject.toml'} not found: the Python closure is not "
                       "re-locked (--python-env DIR names it)", err=True)
            env_dir = None
    missing = []
    found: dict[str, Path] = {}
    find_torchvision(directory, data)
    for entry in data["artifacts"]:
        wheel = find_wheel(directory, entry)
        if wheel is None:
            missing.append(
                f"{directory / entry['filename']}: not found (no wheel of {entry['name']!r} in {directory})"
            )
            continue
        found[entry["name"]] = wheel
    if missing:
        raise click.ClickException("\n".join(missing) + f"\n{path} left unchanged.")
    if env_dir is not None and "torch" in found and TRITON_ROCM not in map(normalize_name, found):
        triton = find_required_triton(directory, found["torch"], path)
        if triton is not None:
            data["artifacts"].append(triton[0])
            found[TRITON_ROCM] = triton[1]
    uv = uv_command() if env_dir is not None else []  # before hashing half a gigabyte
    for entry in data["artifacts"]:
        wheel = found[entry["name"]]
        parsed = parse_wheel_filename(wheel.name)
        entry["filename"] = wheel.name
        entry["version"] = parsed["version"] if parsed else entry["version"]
        entry["size"] = wheel.stat().st_size
        entry["sha256"] = sha256_file(wheel, progress=progress)
        click.echo(f"{entry['name']}: {wheel.name} {entry['size']} bytes sha256 {entry['sha256']}")
        record_libraries(entry, wheel)
    check_torchvision(data["artifacts"])
    if env_dir is None:
        write_lock(path, data)
        click.echo(f"wrote {path}")
    else:
        old_lock = (env_dir / "uv.lock").read_text() if (env_dir / "uv.lock").is_file() else None
        pyproject, new_lock = relock_closure(env_dir, found, uv)
        check_relocked(new_lock, _outside_paths(pyproject), data["artifacts"])
        write_lock(path, data)
        write_text(env_dir / "pyproject.toml", pyproject)
        write_text(env_dir / "uv.lock", new_lock)
        count = sum(len(v) for v in _lock_packages(new_lock).values())
        click.echo(f"wrote {path}, {env_dir / 'pyproject.toml'} and {env_dir / 'uv.lock'} "
                   f"({count} packages):")
        for line in closure_changes(old_lock, new_lock) or ["closure unchanged"]:
            click.echo(f"  {line}")
    click.echo(f"next: `vllm-launcher artifacts add {directory}`")


@artifacts.command("verify")
@_dir_argument
@_lock_option
@_progress_option
def verify_command(directory: Path, lock_file: Path | None, progress: bool) -> None:
    """Check every wheel in DIRECTORY against the lock (presence, size, sha256)."""
    data = read_lock(lock_file or default_lock_path())
    problems = []
    for entry in data["artifacts"]:
        check = check_entry(directory, entry, progress=progress)
        if check.problem:
            problems.append(check.problem)
        else:
            click.echo(f"ok {entry['filename']}")
    if problems:
        raise click.ClickException("\n".join(problems))


@artifacts.command("add")
@_dir_argument
@_lock_option
@_progress_option
@click.option("--dry-run", is_flag=True, help="Print the nix-store commands instead of running them.")
def add_command(directory: Path, lock_file: Path | None, progress: bool, dry_run: bool) -> None:
    """Verify the wheels in DIRECTORY, then `nix-store --add-fixed sha256` each of them.

    Prints the store path of each (the one nix/lock.nix's requireFile expects). Without
    nix-store on PATH, prints the commands to run on the Nix machine.
    """
    data = read_lock(lock_file or default_lock_path())
    checks = [check_entry(directory, entry, progress=progress) for entry in data["artifacts"]]
    problems = [c.problem for c in checks if c.problem]
    if problems:
        raise click.ClickException("\n".join(problems) + "\nnothing added.")
    nix_store = shutil.which("nix-store")
    if dry_run or nix_store is None:
        if nix_store is None and not dry_run:
            click.echo("nix-store is not on PATH; run these on the Nix machine:", err=True)
        for check in checks:
            expected = fixed_output_store_path(check.entry["sha256"], check.entry["filename"])
            click.echo(f"nix-store --add-fixed sha256 {_quote(check.path)}   # -> {expected}")
        return
    for check in checks:
        expected = fixed_output_store_path(check.entry["sha256"], check.entry["filename"])
        result = subprocess.run(
            [nix_store, "--add-fixed", "sha256", str(check.path)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise click.ClickException(
                f"nix-store --add-fixed sha256 {check.path} failed ({result.returncode}): "
                f"{result.stderr.strip()}"
            )
        store_path = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        if store_path != expected:
            raise click.ClickException(
                f"{check.path}: nix-store added {store_path!r}, expected {expected!r}"
            )
        click.echo(store_path)


def _quote(path: Path) -> str:
    return shlex.quote(str(path))

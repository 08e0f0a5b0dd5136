"""`vllm-launcher artifacts`: hash, verify and add the private wheels named in artifacts.lock.json.

The torch and vLLM wheels are private local files: the repository cannot know their hashes. The
committed lock therefore names each wheel with an empty `sha256`; `lock DIR` fills in the hash and
size of the files a user holds, `verify DIR` checks files against the lock, and `add DIR` puts them
into the Nix store with `nix-store --add-fixed sha256` (what nixpkgs' `requireFile` expects).
The lock format (schema version 1) is described by nix/artifacts.schema.json and read by
nix/lock.nix.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

LOCK_VERSION = 1
DEFAULT_LOCK_FILE = "artifacts.lock.json"
LOCK_ENV = "VLLM_ARTIFACTS_LOCK"
CHUNK = 1 << 20
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
        unknown = set(entry) - {"name", "version", "filename", "sha256", "size", "url"}
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
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
def lock_command(directory: Path, lock_file: Path | None, progress: bool) -> None:
    """Find each wheel of the lock in DIRECTORY, hash it and write sha256 and size to the lock.

    Without a lock file, one naming the torch 2.9.1 and vLLM 0.12.0+rocm711 wheels is created.
    A wheel found under another file name of the same project updates filename and version.
    """
    path = lock_file or default_lock_path()
    data = read_lock(path, missing_ok=True)
    missing = []
    for entry in data["artifacts"]:
        found = find_wheel(directory, entry)
        if found is None:
            missing.append(
                f"{directory / entry['filename']}: not found (no wheel of {entry['name']!r} in {directory})"
            )
            continue
        parsed = parse_wheel_filename(found.name)
        entry["filename"] = found.name
        entry["version"] = parsed["version"] if parsed else entry["version"]
        entry["size"] = found.stat().st_size
        entry["sha256"] = sha256_file(found, progress=progress)
        click.echo(f"{entry['name']}: {found.name} {entry['size']} bytes sha256 {entry['sha256']}")
    if missing:
        raise click.ClickException("\n".join(missing) + f"\n{path} left unchanged.")
    write_lock(path, data)
    click.echo(f"wrote {path}; next: `vllm-launcher artifacts add {directory}`")


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

"""nix/native-libraries.nix, the soname -> package table, evaluated by Debian's real
`nix-instantiate` with stub packages (builtins only: runs in CI without nixpkgs).

Mapped sonames give those packages; a soname the wheel bundles, or another artifact provides,
needs none; an unknown soname, or a package the package set lacks, stops evaluation naming the
soname, the wheel and what to do; a user's `vllmStrixLibraries` supplies what nixpkgs lacks; the
dlopen'ed libraries join when their loader is in the set. And the lock `vllm-launcher artifacts
lock` writes for stand-in wheels with real ELF files resolves end to end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from elf_wheels import rocm_wheels
from nix_evaluator import nix_eval
from vllm_launcher.artifacts import artifacts as artifacts_cli

pytestmark = pytest.mark.nix

TORCH = "torch-2.9.1-cp311-cp311-linux_x86_64.whl"
VLLM = "vllm-0.12.0+rocm711-cp311-cp311-linux_x86_64.whl"
ROCM = ["clr", "rocm-runtime", "rocblas", "hipblas", "hipblaslt", "miopen", "rccl", "amdsmi", "rocm-smi"]


def resolve(tmp_path: Path, entries: list[dict], *, loaders: list[str] = (), extra: str = "{ }",
            ok: bool = True):
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"version": 1, "artifacts": entries}))
    expr = f"""
      let
        nl = import ./nix/native-libraries.nix;
        drv = name: {{ type = "derivation"; inherit name; outPath = "/nix/store/00000000000000000000000000000000-${{name}}"; }};
        pkgs = {{
          stdenv.cc = {{ libc = drv "glibc"; cc.lib = drv "gcc-lib"; }};
          rocmPackages = builtins.listToAttrs (map (n: {{ name = n; value = drv n; }}) {nix_list(ROCM)});
          numactl = drv "numactl";
          zlib = drv "zlib";
        }} // {extra};
        r = nl.resolve {{
          inherit pkgs;
          artifacts = (builtins.fromJSON (builtins.readFile {lock})).artifacts;
          where = "lock.json";
          loaders = {nix_list(loaders)};
        }};
      in {{
        artifacts = builtins.mapAttrs (n: a: {{
          inherit (a) sonames searchDirs;
          packages = map (p: p.name) a.packages;
        }}) r.artifacts;
        image = map (p: p.name) r.packages;
        dlopened = builtins.mapAttrs (n: p: p.name) r.dlopened;
      }}
    """
    return nix_eval(expr, ok=ok)


def nix_list(items) -> str:
    return "[ " + " ".join(json.dumps(i) for i in items) + " ]"


def entry(name: str, filename: str, needs: dict, provides: dict | None = None, sha256: str = "a" * 64) -> dict:
    return {"name": name, "version": "1", "filename": filename, "sha256": sha256, "size": 1,
            "needs": needs, "provides": provides or {}}


def test_mapped_sonames_give_those_packages(tmp_path: Path):
    needs = {"libamdhip64.so.7": "torch/lib/libc10_hip.so", "libhipblas.so.3": "torch/lib/libtorch_hip.so",
             "libMIOpen.so.1": "torch/lib/libtorch_hip.so", "libhsa-runtime64.so.1": "torch/lib/libtorch_hip.so",
             "libc.so.6": "torch/lib/libc10.so", "libstdc++.so.6": "torch/lib/libc10.so",
             "libnuma.so.1": "torch/lib/libtorch_hip.so"}
    out = resolve(tmp_path, [entry("torch", TORCH, needs)])
    torch = out["artifacts"]["torch"]
    assert sorted(torch["packages"]) == ["clr", "gcc-lib", "glibc", "hipblas", "miopen", "numactl", "rocm-runtime"]
    assert torch["sonames"]["libamdhip64.so.7"] == "rocmPackages.clr"  # by its name without the version
    assert torch["sonames"]["libc.so.6"] == "stdenv.cc.libc"  # by the exact soname
    assert sorted(out["image"]) == sorted(torch["packages"])  # nothing else in the image's layer
    assert "rocm-smi" not in out["image"] and "amdsmi" not in out["image"]


def test_bundled_and_other_artifacts_libraries_need_no_package(tmp_path: Path):
    torch = entry("torch", TORCH, {"libc10.so": "torch/lib/libtorch.so", "libc.so.6": "torch/lib/libc10.so"},
                  {"libc10.so": "torch/lib", "libtorch.so": "torch/lib", "libc10_hip.so.2": "torch/lib"})
    vllm = entry("vllm", VLLM, {"libtorch.so": "vllm/_C.abi3.so", "libc10_hip.so": "vllm/_C.abi3.so",
                                "libc.so.6": "vllm/_C.abi3.so"})
    out = resolve(tmp_path, [torch, vllm])
    assert out["artifacts"]["torch"]["sonames"]["libc10.so"] == "bundled"
    assert out["artifacts"]["torch"]["packages"] == ["glibc"]
    v = out["artifacts"]["vllm"]
    assert v["sonames"]["libtorch.so"] == "artifact torch (torch/lib)"
    assert v["sonames"]["libc10_hip.so"] == "artifact torch (torch/lib)"  # libc10_hip.so.2 by its name
    assert v["searchDirs"] == [{"artifact": "torch", "dir": "torch/lib"}]
    assert v["packages"] == ["glibc"]


def test_an_unknown_soname_stops_evaluation_naming_it_the_wheel_and_what_to_do(tmp_path: Path):
    needs = {"libc.so.6": "torch/lib/libc10.so", "libcudart.so.12": "torch/lib/libc10_cuda.so"}
    err = resolve(tmp_path, [entry("torch", TORCH, needs)], ok=False)
    assert "libcudart.so.12" in err and TORCH in err and "torch/lib/libc10_cuda.so" in err
    assert "maps it to no package" in err and "What to do" in err and "vllmStrixLibraries" in err
    assert "send back" in err


def test_a_package_the_set_lacks_stops_evaluation_until_the_user_supplies_it(tmp_path: Path):
    needs = {"libhipsparselt.so.0": "torch/lib/libtorch_hip.so"}
    err = resolve(tmp_path, [entry("torch", TORCH, needs)], ok=False)
    assert "libhipsparselt.so.0" in err and TORCH in err and "`rocmPackages.hipsparselt`" in err
    assert "only from ROCm" in err and "vllmStrixLibraries" in err
    # Their overlay adds the library...
    mine = '{ vllmStrixLibraries."libhipsparselt.so" = drv "hipsparselt-from-amd"; }'
    out = resolve(tmp_path, [entry("torch", TORCH, needs)], extra=mine)
    assert out["artifacts"]["torch"]["packages"] == ["hipsparselt-from-amd"]
    assert out["image"] == ["hipsparselt-from-amd"]
    # ...or rocmPackages.hipsparselt itself (as rocmPackages.overrideScope would).
    scope = '{ rocmPackages = { hipsparselt = drv "hipsparselt"; }; }'
    out = resolve(tmp_path, [entry("torch", TORCH, needs)], extra=scope)
    assert out["artifacts"]["torch"]["sonames"] == {"libhipsparselt.so.0": "rocmPackages.hipsparselt"}


def test_dlopened_libraries_join_when_their_loader_is_in_the_set(tmp_path: Path):
    torch = entry("torch", TORCH, {"libc.so.6": "torch/lib/libc10.so"})
    out = resolve(tmp_path, [torch], loaders=["amdsmi", "triton", "numpy"])
    assert out["dlopened"] == {"libamd_smi.so": "amdsmi", "libamdhip64.so": "clr"}
    assert sorted(out["image"]) == ["amdsmi", "clr", "glibc"]
    assert resolve(tmp_path, [torch], loaders=["numpy"])["dlopened"] == {}
    # A torch that bundles its own HIP runtime: Triton uses that copy (two copies must never load).
    bundling = entry("torch", TORCH, {"libc.so.6": "torch/lib/libc10.so"}, {"libamdhip64.so.7": "torch/lib"})
    assert resolve(tmp_path, [bundling], loaders=["triton"])["dlopened"] == {}


def test_a_locked_entry_without_needs_asks_for_a_new_lock_and_an_unlocked_one_needs_nothing(tmp_path: Path):
    old = entry("torch", TORCH, {})
    del old["needs"]
    err = resolve(tmp_path, [old], ok=False)
    assert "has no `needs`" in err and "vllm-launcher artifacts lock DIR" in err
    unlocked = dict(old, sha256="")
    assert resolve(tmp_path, [unlocked])["artifacts"]["torch"]["packages"] == []


def test_the_launchers_lock_of_stand_in_wheels_resolves(tmp_path: Path):
    """`artifacts lock` on wheels with real ELF libraries, then the table on what it wrote."""
    directory = tmp_path / "wheels"
    directory.mkdir()
    rocm_wheels(directory, tmp_path / "elf", TORCH, VLLM)
    lock_file = tmp_path / "artifacts.lock.json"
    result = CliRunner().invoke(artifacts_cli, ["lock", str(directory), "--lock-file", str(lock_file),
                                                "--no-progress", "--no-relock"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = resolve(tmp_path, json.loads(lock_file.read_text())["artifacts"], loaders=["amdsmi"])
    torch, vllm = out["artifacts"]["torch"], out["artifacts"]["vllm"]
    assert sorted(torch["packages"]) == ["clr", "gcc-lib", "glibc", "hipblas", "miopen"]
    assert sorted(vllm["packages"]) == ["clr", "glibc"]
    assert vllm["searchDirs"] == [{"artifact": "torch", "dir": "torch/lib"}]
    assert sorted(out["image"]) == ["amdsmi", "clr", "gcc-lib", "glibc", "hipblas", "miopen"]


def test_the_table_is_sonames_to_attribute_paths():
    table = nix_eval("(import ./nix/native-libraries.nix).table")
    dlopened = nix_eval("(import ./nix/native-libraries.nix).dlopened")
    stems = nix_eval('map (import ./nix/native-libraries.nix).stem [ "libamdhip64.so.7" "libc.so.6" "libfoo.so" '
                     '"libx.so.1.2.3" "ld-linux-x86-64.so.2" ]')
    assert stems == ["libamdhip64.so", "libc.so", "libfoo.so", "libx.so", "ld-linux-x86-64.so"]
    for key, path in table.items():
        assert re.fullmatch(r"(lib|ld-)[A-Za-z0-9_+.-]*\.so(\.\d+)*", key), key
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*(\.[A-Za-z][A-Za-z0-9_-]*)*", path), (key, path)
    # Every dlopen'ed library has a reason and is in the table.
    for item in dlopened:
        assert item["reason"] and item["loaders"] and item["library"] in table, item


# services.vllm.strixHalo -> the kernel parameters of a Strix Halo (gfx1151) host (issue 23,
# point 4). Each one is what `vllm-launcher check` (launcher/vllm_launcher/host_checks.py) asks
# for when its finding is there; nothing is set unless asked.
#
# Pure (builtins only), so CI evaluates it without nixpkgs, as nix/lane-env.nix:
#   nix-instantiate --eval --strict --json -E \
#     '(import ./nix/strix-halo.nix) { gttSizeGiB = 124; disableIommu = true; }'
#
# :: { gttSizeGiB ? null, disableIommu ? false, disableCwsr ? false }
#    -> { kernelParams; assertions; errors; }
#
# gttSizeGiB: how much of the box's memory the GPU may map. Two limits bound it, both set here:
#   - ttm.pages_limit, in PAGE_SIZE pages (4 KiB on x86_64): TTM's page limit; amdgpu's GTT size
#     defaults to it (amdgpu_ttm.c: gtt_size = ttm_tt_pages_limit() << PAGE_SHIFT) and KFD refuses
#     ROCm allocations beyond it (amdgpu_amdkfd_gpuvm.c: max_ttm_mem_limit). Kernel default: half
#     of the memory, 64 GiB of a 128 GB box.
#   - amdgpu.gttsize, in MiB: the GTT size on kernels that still read it; newer ones log
#     "Configuring gttsize via module parameter is deprecated, please use ttm.pages_limit" and
#     "this is unusual" when the two differ, so both are given the same size.
#   docs/nix.md section 4's values for a 128 GB box are 124 GiB: amdgpu.gttsize=126976
#   ttm.pages_limit=32505856. With AMD's DKMS driver (amdttm) the TTM parameter is
#   amdttm.pages_limit: add it to boot.kernelParams yourself (`check` names the module it finds).
# disableIommu: amd_iommu=off. A field report: measured 5-12 % faster on Strix Halo, page faults
#   reported with the IOMMU on (the project's field notes, strix-halo-field.md); leave it on where the
#   box passes devices to virtual machines.
# disableCwsr: amdgpu.cwsr_enable=0. gfx1151 hangs under ROCm with compute wave save/restore on
#   (ROCm/legacy-rocm-build issue 5590); AMD advises it until kernel 6.18-rc6, which disables CWSR
#   there by default (issue 5991). It does not help with MES firmware 0x83 (issue 5724): that one
#   needs the firmware back at 0x80.
let
  inherit (builtins) filter isInt toJSON;
  kib4PagesPerGiB = 1024 * 1024 / 4; # 262144 pages of 4 KiB in a GiB
in
{
  gttSizeGiB ? null,
  disableIommu ? false,
  disableCwsr ? false,
}:
let
  validGtt = gttSizeGiB == null || (isInt gttSizeGiB && gttSizeGiB > 0 && gttSizeGiB <= 4096);
  assertions = [
    {
      assertion = validGtt;
      message = "services.vllm.strixHalo.gttSizeGiB = ${toJSON gttSizeGiB} is not a size in GiB: a whole number from 1 to 4096, a few GiB below the box's memory (124 on a 128 GB Strix Halo), or null for the kernel's default (half of the memory).";
    }
  ];
  gttParams =
    if gttSizeGiB == null || !validGtt then
      [ ]
    else
      [
        "ttm.pages_limit=${toString (gttSizeGiB * kib4PagesPerGiB)}"
        "amdgpu.gttsize=${toString (gttSizeGiB * 1024)}"
      ];
in
{
  kernelParams =
    gttParams
    ++ (if disableIommu then [ "amd_iommu=off" ] else [ ])
    ++ (if disableCwsr then [ "amdgpu.cwsr_enable=0" ] else [ ]);
  inherit assertions;
  errors = map (a: a.message) (filter (a: !a.assertion) assertions);
}

# vLLM 0.12.0+rocm711 from the private wheel pinned in artifacts.lock.json.
# Dependencies and ROCm runtime follow nixpkgs' pkgs/development/python-modules/vllm/default.nix
# (a source build); here the wheel is relinked like torch (nix/torch-rocm.nix), with torch's
# own torch/lib on the autoPatchelf search path because vLLM's _C/_rocm_C extensions link
# libtorch*, libc10*.
{
  lib,
  stdenv,
  buildPythonPackage,
  python,
  src,
  version,
  autoPatchelfHook,
  rocmPackages,
  torch,
  # dependencies (those of nixpkgs' vllm that a ROCm 0.12 build imports)
  aiohttp,
  amdsmi,
  blake3,
  cachetools,
  cbor2,
  cloudpickle,
  compressed-tensors,
  datasets,
  depyf,
  diskcache,
  einops,
  fastapi,
  filelock,
  gguf,
  importlib-metadata,
  lark,
  llguidance,
  lm-format-enforcer,
  mistral-common,
  msgspec,
  numba,
  numpy,
  openai,
  openai-harmony,
  opencv-python-headless,
  outlines,
  partial-json-parser,
  peft,
  pillow,
  prometheus-client,
  prometheus-fastapi-instrumentator,
  protobuf,
  psutil,
  py-cpuinfo,
  pybase64,
  pydantic,
  python-json-logger,
  pyyaml,
  pyzmq,
  regex,
  requests,
  sentencepiece,
  setproctitle,
  six,
  tiktoken,
  timm,
  tokenizers,
  tqdm,
  transformers,
  typing-extensions,
  uvicorn,
  watchfiles,
  xgrammar,
}:
# vLLM 0.12 needs transformers >= 4.56, < 5; nixpkgs moved to 5.x in early 2026. The pin's
# version is reported at evaluation; override `transformers` in nix/python.nix if it is 5.x.
lib.warnIf (lib.versionAtLeast transformers.version "5")
  "vllm ${version}: nixpkgs' transformers is ${transformers.version}, vLLM 0.12 wants < 5 (see nix/python.nix)"
  buildPythonPackage
  {
    pname = "vllm";
    inherit version src;
    format = "wheel";

    nativeBuildInputs = [ autoPatchelfHook ];
    # Same ROCm runtime as torch; nixpkgs' vllm lists clr, hipblas, rocblas, miopen, hipblaslt, ...
    buildInputs = torch.rocmLibraries or [ rocmPackages.clr ];

    preFixup = ''
      addAutoPatchelfSearchPath "${torch}/${python.sitePackages}/torch/lib"
    '';
    dontStrip = true;

    dependencies = [
      torch
      # Triton and torch.compile compile at run time (nixpkgs' vllm: "needs Torch's compiler").
      stdenv.cc
      aiohttp
      amdsmi # vLLM picks the ROCm platform by importing amdsmi
      blake3
      cachetools
      cbor2
      cloudpickle
      compressed-tensors
      datasets
      depyf
      diskcache
      einops
      fastapi
      filelock
      gguf
      importlib-metadata
      lark
      llguidance
      lm-format-enforcer
      mistral-common
      msgspec
      numba
      numpy
      openai
      openai-harmony
      opencv-python-headless
      outlines
      partial-json-parser
      peft
      pillow
      prometheus-client
      prometheus-fastapi-instrumentator
      protobuf
      psutil
      py-cpuinfo
      pybase64
      pydantic
      python-json-logger
      pyyaml
      pyzmq
      regex
      requests
      sentencepiece
      setproctitle
      six
      tiktoken
      timm
      tokenizers
      tqdm
      transformers
      typing-extensions
      uvicorn
      watchfiles
      xgrammar
    ]
    ++ uvicorn.optional-dependencies.standard or [ ];

    # The wheel's metadata pins exact versions of its build (torch==2.9.1, ...); the set
    # supplies its own. Removed: packages not in nixpkgs' python311 set or not used on ROCm.
    pythonRelaxDeps = true;
    pythonRemoveDeps = [
      "pytorch-triton-rocm"
      "triton"
      "ray"
      "xformers"
      "torchaudio"
      "torchvision"
      "flashinfer-python"
      "conch-triton-kernels"
      "amd-aiter"
      "amd-quark"
      "fastsafetensors"
      "anthropic"
      "model-hosting-container-standards"
      "scipy"
    ];

    pythonImportsCheck = [ "vllm" ];

    makeWrapperArgs = [
      "--set-default"
      "HIP_DEVICE_LIB_PATH"
      "${rocmPackages.rocm-device-libs}/amdgcn/bitcode"
      "--prefix"
      "PATH"
      ":"
      "${rocmPackages.clr}/bin"
    ];

    meta = {
      description = "vLLM ${version} for ROCm, from a locally built wheel (artifacts.lock.json)";
      homepage = "https://github.com/vllm-project/vllm";
      license = lib.licenses.asl20;
      sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
      platforms = [ "x86_64-linux" ];
    };
  }

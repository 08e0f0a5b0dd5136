# The launcher (./launcher) as a Python application of the same package set: pyproject build,
# and the project's tests that need no engine run in checkPhase (tests marked `engine`, the
# Nix checks and the end-to-end tests need vLLM or nix-instantiate and are deselected).
{
  lib,
  buildPythonPackage,
  src,
  # The repository's tests/ directory; when given they run in checkPhase.
  testsSrc ? null,
  setuptools,
  click,
  fastapi,
  uvicorn,
  httpx,
  prometheus-client,
  pytestCheckHook,
  pytest-timeout,
  hypothesis,
}:
let
  pyproject = builtins.fromTOML (builtins.readFile (src + "/pyproject.toml"));
in
buildPythonPackage {
  pname = "vllm-launcher";
  inherit (pyproject.project) version;
  pyproject = true;
  inherit src;

  build-system = [ setuptools ];
  dependencies = [
    click
    fastapi
    uvicorn
    httpx
    prometheus-client
  ];

  nativeCheckInputs = [
    pytestCheckHook
    pytest-timeout
    hypothesis
  ];
  # The repository's tests live beside the launcher (../tests), outside `src`: copy them in.
  # What runs here: the configuration contract, the engine command lines and the scheduler
  # (unit and property tests). Left out: tests marked `engine`/`e2e` (they start engines),
  # files that import what this package set does not hold (openai, torch, jsonschema, vLLM),
  # and the Nix checks (nix-instantiate and nix-store are not usable inside the sandbox).
  doCheck = testsSrc != null;
  preCheck = lib.optionalString (testsSrc != null) ''
    cp -r ${testsSrc} tests
    chmod -R u+w tests
    export HOME=$TMPDIR
  '';
  pytestFlagsArray = [
    "tests"
    "-m"
    "not engine and not e2e"
    "--ignore-glob=tests/test_nix_*.py"
    "--ignore-glob=tests/test_server_*.py"
    "--ignore-glob=tests/test_e2e_*.py"
    "--ignore=tests/test_demo.py"
    "--ignore=tests/test_demo_models.py"
    "--ignore=tests/test_vllm_engine_facts.py"
    "--ignore=tests/test_artifacts.py"
  ];
  pythonImportsCheck = [
    "vllm_launcher"
    "vllm_launcher.artifacts"
  ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.mit;
    mainProgram = "vllm-launcher";
  };
}

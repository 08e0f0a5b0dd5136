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
  # Deselected: tests marked `engine` (they start vLLM), the Nix checks (they call
  # nix-instantiate, not available inside the build sandbox) and the end-to-end tests.
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

# artifacts.lock.json -> source specifications for the private wheels.
#
# Pure: needs only builtins, so CI evaluates it without nixpkgs:
#   nix-instantiate --eval --strict --json -E '(import ./nix/lock.nix { lockFile = ./artifacts.lock.json; }).specs'
#
# `specs.<name>` is plain data (name = the exact wheel file name, sha256, fetcher, message);
# `sources { requireFile, fetchurl; }` turns it into fixed-output derivations:
#   - nixpkgs' requireFile (pkgs/build-support/trivial-builders/default.nix): the file must
#     already be in the store (`nix-store --add-fixed sha256 FILE`), otherwise the build
#     prints `message`;
#   - fetchurl when the entry has a `url`.
# The store name is the wheel file name, which the wheel unpack hook needs verbatim.
# Never a repository path and never an absolute path: the wheels live in the Nix store only.
{
  lockFile ? null,
  lock ? builtins.fromJSON (builtins.readFile lockFile),
}:
let
  inherit (builtins)
    filter
    isInt
    isString
    length
    listToAttrs
    map
    match
    ;

  where = if lockFile == null then "artifacts.lock.json" else toString lockFile;

  sha256Re = "[0-9a-f]{64}";
  # PEP 427 wheel file name (same pattern as nix/artifacts.schema.json).
  wheelRe = "([A-Za-z0-9_.]+)-([A-Za-z0-9_.!+]+)(-[0-9][A-Za-z0-9_.]*)?-([A-Za-z0-9_.]+)-([A-Za-z0-9_.]+)-([A-Za-z0-9_.]+)[.]whl";

  fail = name: msg: throw "${where}: artifact '${name}': ${msg}";

  addCommand = filename: "nix-store --add-fixed sha256 /path/to/${filename}";

  # nixpkgs' requireFile prints this through an unquoted heredoc in its builder
  # (pkgs/build-support/trivial-builders/default.nix: `cat <<_EOF_ ... ${msg} ... _EOF_`), so
  # the shell expands it: a backtick, `$` or backslash here would run or eat part of the text.
  # Commands stand on lines of their own instead (tests/test_nix_eval.py checks it in bash).
  message =
    entry:
    ''
      The wheel ${entry.filename} (sha256 ${entry.sha256}) is not in the Nix store.
      It is a private local file: add it once, from the directory that holds it, with

        ${addCommand entry.filename}

      or let the launcher verify and add every wheel of the lock:

        nix run .#artifacts -- add DIR      (or: vllm-launcher artifacts add DIR)

      A different file under that name means a different hash: run

        vllm-launcher artifacts lock DIR

      again and commit the lock.
    '';

  checkEntry =
    entry:
    let
      name = entry.name or (throw "${where}: an artifact entry has no 'name'");
      filename = entry.filename or (fail name "no 'filename'");
      sha256 = entry.sha256 or "";
    in
    if !(isString filename) || match wheelRe filename == null then
      fail name "filename '${toString filename}' is not an exact PEP 427 wheel file name"
    else if sha256 == "" then
      fail name ''
        ${filename} is not locked yet (empty sha256): the repository cannot know the hash of
        your private wheel. Run `vllm-launcher artifacts lock DIR` (DIR holding the wheels; or
        `nix run .#artifacts -- lock DIR`), then `vllm-launcher artifacts add DIR`.''
    else if !(isString sha256) || match sha256Re sha256 == null then
      fail name "sha256 '${toString sha256}' must be 64 lower-case hex digits"
    else if entry ? size && entry.size != null && !(isInt entry.size) then
      fail name "size must be a byte count"
    else
      {
        inherit name filename sha256;
        version = entry.version or (fail name "no 'version'");
        size = entry.size or null;
        fetcher = if entry ? url && entry.url != null then "fetchurl" else "requireFile";
        url = entry.url or null;
        message = message entry;
      };

  entries =
    if (lock.version or null) != 1 then
      throw "${where}: version must be 1 (got ${toString (lock.version or "none")})"
    else
      lock.artifacts or (throw "${where}: no 'artifacts' list");

  names = map (e: e.name or "") entries;
  duplicates = filter (n: length (filter (m: m == n) names) > 1) names;

  # Attribute set keyed by artifact name; each value is checked only when used (lazily), so a
  # lock with an unlocked vLLM entry still lets `torch-rocm` evaluate, and vice versa.
  specs =
    if duplicates != [ ] then
      throw "${where}: artifact '${builtins.head duplicates}' appears twice"
    else
      listToAttrs (
        map (entry: {
          name = entry.name;
          value = checkEntry entry;
        }) entries
      );

  sources =
    { requireFile, fetchurl }:
    builtins.mapAttrs (
      _: spec:
      if spec.fetcher == "fetchurl" then
        fetchurl {
          inherit (spec) url sha256;
          name = spec.filename;
        }
      else
        requireFile {
          name = spec.filename;
          inherit (spec) sha256 message;
        }
    ) specs;
in
{
  inherit lock specs sources;
  # Versions without touching hashes: usable in labels and messages while unlocked.
  versions = listToAttrs (
    map (e: {
      name = e.name;
      value = e.version;
    }) entries
  );
}

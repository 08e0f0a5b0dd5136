"""Agent lane settings (issue 22 point 4): TOOL_CALL_PARSER, REASONING_PARSER and CHAT_TEMPLATE,
per lane and global, checked at configuration time against the parser registries of the engines'
vLLM (the locked closure's 0.12.0 here), with a --tool-parser-plugin's names accepted; from the
NixOS module's options through nix/lane-env.nix to the engine's argv."""

from __future__ import annotations

import json
import time

import pytest

from closure_env import CLOSURE_DIR, CLOSURE_PYTHON, closure_ready
from launcher_cli import run_launcher
from measurements import record
from nix_evaluator import evaluate, nix_eval, run_eval

pytestmark = [pytest.mark.closure,
              pytest.mark.skipif(not closure_ready(), reason=f"{CLOSURE_DIR} is missing: run `make closure`")]

PLUGIN = """
try:
    from vllm.tool_parsers import ToolParser, ToolParserManager
except ImportError:                     # vLLM 0.12
    from vllm.entrypoints.openai.tool_parsers import ToolParser, ToolParserManager


@ToolParserManager.register_module("our_agent_parser")
class OurParser(ToolParser):
    pass
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One parser-registry cache (and plugin) for the module: the registry is read once."""
    directory = tmp_path_factory.mktemp("agents")
    plugin = directory / "our_parser.py"
    plugin.write_text(PLUGIN)
    template = directory / "tools.jinja"
    template.write_text("{% for message in messages %}{{ message['content'] }}{% endfor %}")
    return {"dir": directory, "template": str(template),
            "env": {"VLLM_ENGINE_PYTHON": str(CLOSURE_PYTHON), "XDG_CACHE_HOME": str(directory / "cache"),
                    "VLLM_EXTRA_ARGS": f"--tool-parser-plugin {plugin}"}}


def test_wrong_parser_names_are_refused_naming_the_choices(base):
    env = {**base["env"], "VLLM_LANES": "coder,thinker", "VLLM_MODEL": "/models/m",
           "VLLM_TOOL_CALL_PARSER": "hermes-typo", "VLLM_LANE_THINKER_TOOL_CALL_PARSER": "our_agent_parser",
           "VLLM_LANE_THINKER_REASONING_PARSER": "deepseek-r1"}
    began = time.monotonic()
    result = run_launcher(env, "config", timeout=300)
    record(f"TOOL_CALL_PARSER check against vLLM 0.12's registries (closure), first read: "
           f"{time.monotonic() - began:.1f} s")
    assert result.returncode == 2, result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 2, result.stderr
    tool, reasoning = problems
    assert "VLLM_TOOL_CALL_PARSER='hermes-typo' (lane 'coder'): not a tool-call parser" in tool
    assert "hermes" in tool and "llama3_json" in tool and "our_agent_parser" in tool      # the plugin's too
    assert "VLLM_LANE_THINKER_REASONING_PARSER='deepseek-r1'" in reasoning and "deepseek_r1" in reasoning
    # an engine Python without vLLM (yet): nothing to check against, said, not refused
    unchecked = run_launcher({**env, "VLLM_ENGINE_PYTHON": "/bin/true"}, "config", "--format", "argv")
    assert unchecked.returncode == 0, unchecked.stderr
    assert "warning: VLLM_TOOL_CALL_PARSER='hermes-typo' not checked" in unchecked.stderr
    assert "--enable-auto-tool-choice --tool-call-parser hermes-typo" in unchecked.stdout
    # a file CHAT_TEMPLATE that is not there: no registry needed
    missing = run_launcher({**base["env"], "VLLM_MODEL": "/models/m", "VLLM_CHAT_TEMPLATE": "/nowhere/t.jinja"},
                           "config")
    assert missing.returncode == 2 and "VLLM_CHAT_TEMPLATE='/nowhere/t.jinja': no such file" in missing.stderr


@pytest.mark.nix
def test_module_options_reach_the_engine_argv(base):
    settings = ('{ defaults.model = "/models/m"; defaults.extraArgs = [ "--tool-parser-plugin" "%s" ]; '
                'lanes.coder = { toolCallParser = "hermes"; chatTemplate = %s; }; '
                'lanes.thinker = { reasoningParser = "deepseek_r1"; toolCallParser = "our_agent_parser"; }; }'
                % (base["env"]["VLLM_EXTRA_ARGS"].split()[1], base["template"]))
    rendered = nix_eval(f"(import ./nix/lane-env.nix).render ({settings})")
    assert rendered["errors"] == []
    env = rendered["environment"]
    assert env["VLLM_LANE_CODER_TOOL_CALL_PARSER"] == "hermes"
    assert env["VLLM_LANE_CODER_CHAT_TEMPLATE"] == base["template"]           # a Nix path as its file name
    assert env["VLLM_LANE_THINKER_REASONING_PARSER"] == "deepseek_r1"
    result = run_launcher({**env, "VLLM_ENGINE_PYTHON": base["env"]["VLLM_ENGINE_PYTHON"],
                           "XDG_CACHE_HOME": base["env"]["XDG_CACHE_HOME"]}, "config", "--format", "json",
                          timeout=300)
    assert result.returncode == 0, result.stderr
    lanes = json.loads(result.stdout)["lanes"]
    coder, thinker = lanes["coder"]["argv"], lanes["thinker"]["argv"]
    assert coder[coder.index("--tool-call-parser") - 1] == "--enable-auto-tool-choice"
    assert coder[coder.index("--tool-call-parser") + 1] == "hermes"
    assert coder[coder.index("--chat-template") + 1] == base["template"]
    assert thinker[thinker.index("--reasoning-parser") + 1] == "deepseek_r1"
    assert "--reasoning-parser" not in coder and "--chat-template" not in thinker


@pytest.mark.nix
def test_nixos_module_options(base):
    """services.vllm.lanes.<name>.toolCallParser, reasoningParser, chatTemplate (a path or the
    template) and their defaults reach the unit's environment (nixpkgs.lib's module system)."""
    out = evaluate('{ enable = true; defaults.toolCallParser = "hermes"; '
                   'lanes.coder = { model = "/m/c"; chatTemplate = %s; }; '
                   'lanes.thinker = { model = "/m/t"; reasoningParser = "deepseek_r1"; '
                   'chatTemplate = "{{ messages }}"; }; }' % base["template"])
    env = out["environment"]
    assert out["failedAssertions"] == []
    assert env["VLLM_TOOL_CALL_PARSER"] == "hermes" and env["VLLM_LANE_THINKER_REASONING_PARSER"] == "deepseek_r1"
    assert env["VLLM_LANE_CODER_CHAT_TEMPLATE"].endswith("tools.jinja")
    assert env["VLLM_LANE_THINKER_CHAT_TEMPLATE"] == "{{ messages }}"
    wrong = run_eval('{ services.vllm = { enable = true; lanes.a = { model = "m"; toolCallParser = 7; }; }; }')
    assert wrong.returncode != 0 and "toolCallParser" in wrong.stderr

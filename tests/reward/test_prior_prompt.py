"""prior_prompt_ids: the empty conversation of the grounding term (the chat template's generation prompt; BOS, else
EOS, for a string prompt), tokenized as encode_prompt tokenizes prompts."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from cagsr_reward.encoding import encode_prompt, prior_prompt_ids  # noqa: E402
from cagsr_reward.salient import SalientSelector  # noqa: E402

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does Alice live?"},
    {"role": "assistant", "content": "In Paris."},
    {"role": "user", "content": "And Bob?"},
]


def word_tokenizer(*, bos: bool = True, eos: bool = True, template: str | None = None):
    """A fast word-level tokenizer (no downloads) with a chat template whose generation prompt is two tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    words += sorted({w for m in CHAT for w in m["content"].replace("?", " ?").replace(".", " .").split()} | {"?", "."})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"unk_token": "<unk>"}
    if bos:
        kwargs["bos_token"] = "<s>"
    if eos:
        kwargs["eos_token"] = "</s>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.chat_template = template or (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> <s> {% endif %}"
    )
    return fast


def test_chat_prompt_gives_the_generation_prompt_tokens():
    tok = word_tokenizer()
    prior = prior_prompt_ids(tok, CHAT)
    assert prior == tok.convert_tokens_to_ids(["<|assistant|>", "<s>"])
    # it is exactly the tail that add_generation_prompt=True adds to encode_prompt's ids
    full = encode_prompt(CHAT, tok, SalientSelector()).input_ids
    assert full[-len(prior):] == prior
    assert encode_prompt(CHAT, tok, SalientSelector(), add_generation_prompt=False).input_ids == full[: -len(prior)]
    # the history does not matter, only the template's header
    assert prior_prompt_ids(tok, CHAT[:2]) == prior


def test_string_prompt_gives_bos_else_eos():
    assert prior_prompt_ids(word_tokenizer(), "Where does Alice live ?") == [1]
    assert prior_prompt_ids(word_tokenizer(bos=False), "Where does Alice live ?") == [2]
    with pytest.raises(ValueError, match="neither"):
        prior_prompt_ids(word_tokenizer(bos=False, eos=False), "Where does Alice live ?")


def test_a_template_without_a_generation_prompt_is_refused():
    tok = word_tokenizer(template="{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}")
    with pytest.raises(ValueError, match="adds no tokens for the generation prompt"):
        prior_prompt_ids(tok, CHAT)
    with pytest.raises(ValueError, match="prompt: expected a string or a non-empty list"):
        prior_prompt_ids(word_tokenizer(), [])


def test_smollm2_header(smollm2_path):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path)
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert prior_prompt_ids(tok, CHAT) == header
    assert prior_prompt_ids(tok, [{"role": "user", "content": "Hi"}]) == header
    assert prior_prompt_ids(tok, "Hi") == [tok.bos_token_id]

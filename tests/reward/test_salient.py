"""Salient positions: IDF numbers worked by hand, entity rules, offsets mapping on a locally trained fast tokenizer."""

from __future__ import annotations

import doctest
import json
import math
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cagsr_reward.salient as salient_module
from cagsr_reward.encoding import PromptEncoding, encode_prompt, salient_positions, salient_positions_for_messages
from cagsr_reward.salient import IDFModel, SalientSelector, named_entities

CORPUS = ["the cat sat", "the dog sat", "the cat ran"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE fast tokenizer trained here (no downloads), BOS prepended, with a chat template."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [
        "Alice met Bob in Paris on 3 May 2021.",
        "The capital of France is Paris, the user said.",
        "What is 1,234.5 plus 7? The answer is 1,241.5.",
        "the cat sat on the mat and the dog ran",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    assert fast.bos_token_id == 1
    return fast


# -- IDF ------------------------------------------------------------------------------------------------------------


def test_idf_hand_worked_numbers():
    m = IDFModel.fit(CORPUS)
    # N = 3; df: the 3, cat 2, sat 2, dog 1, ran 1; idf = ln((1+N)/(1+df)) + 1
    assert m.n_docs == 3 and len(m) == 5
    assert m.idf("the") == pytest.approx(1.0)  # ln(4/4) + 1
    assert m.idf("cat") == pytest.approx(math.log(4 / 3) + 1)  # 1.287682
    assert m.idf("dog") == pytest.approx(1.693147, abs=1e-6)  # ln 2 + 1
    assert m.idf("unseen") == pytest.approx(2.386294, abs=1e-6)  # ln 4 + 1
    assert m.idf("CAT") == m.idf("cat") and m.df("Sat") == 2
    # sorted vocabulary idfs [1, 1.2877, 1.2877, 1.6931, 1.6931]; linear quantile at 0.8 -> position 3.2
    assert m.quantile(0.8) == pytest.approx(math.log(2) + 1)
    assert m.quantile(0.25) == pytest.approx(math.log(4 / 3) + 1)
    assert m.top(3) == [("dog", m.idf("dog")), ("ran", m.idf("ran")), ("cat", m.idf("cat"))]


def test_idf_counts_a_word_once_per_document_and_reads_chat_messages():
    m = IDFModel.fit(["Cat cat CAT", [{"role": "user", "content": "a cat"}, {"role": "assistant", "content": "b"}]])
    assert m.df("cat") == 2 and m.df("b") == 1 and m.n_docs == 2
    assert m.idf("cat") == pytest.approx(1.0)


def test_idf_custom_pattern_and_errors():
    m = IDFModel.fit(["don't stop", "stop"], tokenize=r"[a-z']+")
    assert "don't" in m and m.df("stop") == 2
    assert m.words("Don't go") == [(0, 5, "don't"), (6, 8, "go")]
    with pytest.raises(ValueError, match="corpus"):
        IDFModel.fit([])
    with pytest.raises(TypeError, match="tokenize"):
        IDFModel.fit(["a"], tokenize=str.split)
    with pytest.raises(ValueError, match="n_docs"):
        IDFModel({"a": 1}, 0)
    with pytest.raises(ValueError, match="df"):
        IDFModel({"a": 3}, 2)


def test_idf_json_and_pickle_round_trip(tmp_path):
    m = IDFModel.fit(CORPUS)
    path = tmp_path / "idf.json"
    m.save(path)
    data = json.loads(path.read_text())
    assert data["n_docs"] == 3 and data["df"]["the"] == 3 and data["pattern"] == r"\w+"
    assert IDFModel.load(path) == m
    clone = pickle.loads(pickle.dumps(m))
    assert clone == m and clone.idf("dog") == m.idf("dog")
    with pytest.raises(ValueError, match="format"):
        IDFModel.from_dict({**data, "format": "other"})


# -- entities -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Alice met Bob in New York.", ["Bob", "New", "York"]),
        ("the price is 1,234,567.89 dollars", ["1,234,567.89"]),
        ("Pi is 3.14.", ["3.14"]),
        ("He said hi. Then Carol left! Where? Over there", ["Carol"]),
        ("I think I'm with Dave", ["Dave"]),
        ("COVID19 came 3rd, not 19 th", ["19"]),
        ("Line one\nSecond line mentions Eve", ["Eve"]),
        ('"Stop." Frank said', []),
        ("see e.g.Bob here", ["Bob"]),
        ("12,34 and 1,000", ["12", "34", "1,000"]),
        ("(Zed) was here", []),
        ("ask O'Neil and Jean-Luc", ["O'Neil", "Jean-Luc"]),
        ("", []),
    ],
)
def test_named_entities(text, expected):
    assert [text[a:b] for a, b in named_entities(text)] == expected


# -- selector on text -----------------------------------------------------------------------------------------------


def test_keywords_are_case_insensitive_whole_words():
    sel = SalientSelector(use_entities=False, keywords=["paris", "new york"])
    text = "PARIS, parisian, Paris. unparis New  York new york"
    assert [text[a:b] for a, b in sel.char_spans(text)] == ["PARIS", "Paris", "new york"]
    with pytest.raises(TypeError, match="keywords"):
        SalientSelector(keywords="paris")
    with pytest.raises(ValueError, match="keywords"):
        SalientSelector(keywords=["  "])


def test_idf_threshold_quantile_and_min_idf():
    m = IDFModel.fit(CORPUS)
    text = "the cat and the dog"
    by_quantile = SalientSelector(m, idf_quantile=0.8, use_entities=False)
    assert by_quantile.idf_threshold == pytest.approx(math.log(2) + 1)
    assert [text[a:b] for a, b in by_quantile.char_spans(text)] == ["and", "dog"]  # unseen "and" has max idf
    low = SalientSelector(m, min_idf=1.2, use_entities=False)
    assert [text[a:b] for a, b in low.char_spans(text)] == ["cat", "and", "dog"]
    assert SalientSelector(use_entities=False).char_spans(text) == []
    with pytest.raises(ValueError, match="min_idf"):
        SalientSelector(min_idf=1.0)
    with pytest.raises(ValueError, match="idf_quantile"):
        SalientSelector(m, idf_quantile=1.5)
    with pytest.raises(TypeError, match="idf"):
        SalientSelector({"a": 1})


def test_annotate_reports_reasons_and_char_spans_merge_them():
    sel = SalientSelector(IDFModel.fit(CORPUS), keywords=["bob smith"])
    text = "the cat saw Bob Smith"
    kinds = {(text[s.start : s.end], s.kind) for s in sel.annotate(text)}
    assert ("Bob Smith", "keyword") in kinds and ("Bob", "entity") in kinds and ("saw", "idf") in kinds
    assert [text[a:b] for a, b in sel.char_spans(text)] == ["saw", "Bob Smith"]


def test_token_positions_with_handmade_offsets():
    sel = SalientSelector(use_entities=False, keywords=["bob"])
    offsets = [(0, 0), (0, 3), (3, 7), (7, 11)]  # <s>, "Ask", " Bob", " now"
    assert sel.token_positions("Ask Bob now", offsets).tolist() == [2]
    assert sel.token_positions("Ask Bob now", offsets, sink=3).tolist() == []
    # The same text placed at character 5 of a longer tokenized string.
    shifted = [(0, 0), (0, 5), (5, 8), (8, 12), (12, 16)]
    assert sel.token_positions("Ask Bob now", shifted, offset_base=5).tolist() == [3]
    with pytest.raises(ValueError, match="sink"):
        sel.token_positions("Ask Bob now", offsets, sink=-1)
    with pytest.raises(ValueError, match="offsets"):
        sel.token_positions("Ask Bob now", [1, 2, 3])


# -- selector through a real fast tokenizer -------------------------------------------------------------------------


def test_positions_through_fast_tokenizer(tokenizer):
    text = "Alice met Bob in Paris"
    sel = SalientSelector(use_entities=True)
    enc = tokenizer(text, return_offsets_mapping=True)
    positions = salient_positions(text, tokenizer, sel)
    offsets = enc["offset_mapping"]
    covered = "".join(text[offsets[p][0] : offsets[p][1]] for p in positions)
    assert covered.replace(" ", "") == "BobParis"  # "Alice" starts the sentence
    assert 0 not in positions.tolist()  # the added BOS, offsets (0, 0)
    # Every other token lies outside both entities.
    for p in set(range(len(offsets))) - set(positions.tolist()):
        a, b = offsets[p]
        assert b <= 10 or (13 <= a and b <= 17) or p == 0


def test_special_tokens_and_sinks_are_never_salient(tokenizer):
    text = "Bob met Alice"
    sel = SalientSelector(use_entities=False, keywords=["bob"])
    enc = tokenizer(text, return_offsets_mapping=True)
    assert enc["input_ids"][0] == tokenizer.bos_token_id and tuple(enc["offset_mapping"][0]) == (0, 0)
    first = salient_positions(text, tokenizer, sel)
    assert first.min() == 1  # "Bob" starts at character 0 but the BOS (0, 0) never overlaps it
    assert salient_positions(text, tokenizer, sel, sink="auto").tolist() == first.tolist()
    bob_tokens = first.tolist()
    assert salient_positions(text, tokenizer, sel, sink=bob_tokens[-1] + 1).size == 0
    without_bos = salient_positions(text, tokenizer, sel, add_special_tokens=False)
    assert without_bos.tolist() == [p - 1 for p in bob_tokens]


def test_encode_prompt_string_matches_tokenizer(tokenizer):
    enc = encode_prompt("Where is Paris?", tokenizer, SalientSelector(), sink="auto")
    assert isinstance(enc, PromptEncoding)
    assert enc.input_ids == tokenizer("Where is Paris?")["input_ids"]
    assert enc.sink == 1 and enc.message_spans == ()
    assert "".join(tokenizer.decode([enc.input_ids[p]]) for p in enc.salient).strip() == "Paris"


def test_messages_mark_content_not_template(tokenizer):
    messages = [
        {"role": "system", "content": "The user is Bob."},
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "Hi Bob"},
        {"role": "user", "content": "Tell Carol about Paris"},
    ]
    sel = SalientSelector(use_entities=True, keywords=["user"])
    enc = encode_prompt(messages, tokenizer, sel, sink="auto")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert enc.text == rendered
    assert enc.input_ids == list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    # Content character ranges, found independently; template headers also contain the word "user".
    starts, cursor = [], 0
    for m in messages:
        at = rendered.index("\n" + m["content"] + "</s>", cursor) + 1
        starts.append((at, at + len(m["content"])))
        cursor = at + len(m["content"])
    assert rendered.count("user") > 2
    for p in enc.salient:
        a, b = enc.offsets[p]
        assert any(a < e and b > s for s, e in starts), (p, rendered[a:b])
    # Per message, the characters covered by salient tokens spell exactly the salient words.
    covered = [
        "".join(rendered[enc.offsets[p][0] : enc.offsets[p][1]] for p in enc.salient if s <= enc.offsets[p][0] < e)
        for s, e in starts
    ]
    assert [c.replace(" ", "") for c in covered] == ["userBob", "user", "Bob", "CarolParis"]
    # The "user" content of message 1 is salient; the role headers spelled "user" are not.
    header_user = rendered.index("<s>user\n") + 3
    assert not any(enc.offsets[p][0] <= header_user < enc.offsets[p][1] for p in enc.salient)
    content_user = starts[1][0]
    assert any(enc.offsets[p][0] <= content_user < enc.offsets[p][1] for p in enc.salient)
    # message_spans give each message's content tokens.
    assert [(i, role) for i, role, _, _ in enc.message_spans] == [(i, m["role"]) for i, m in enumerate(messages)]
    for (i, _, lo, hi), (s, e) in zip(enc.message_spans, starts):
        assert enc.offsets[lo][0] <= s < enc.offsets[lo][1] and enc.offsets[hi - 1][1] >= e
    assert enc.last_span("user") == enc.message_spans[3][2:]
    # roles= restricts which messages contribute.
    users = salient_positions_for_messages(messages, tokenizer, sel, roles=["user"])
    lo3, hi3 = enc.message_spans[3][2:]
    lo1, hi1 = enc.message_spans[1][2:]
    assert all(lo3 <= p < hi3 or lo1 <= p < hi1 for p in users) and len(users) > 0


def test_messages_with_a_trimming_template_fall_back_to_search(tokenizer):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}\n{% endfor %}"
    messages = [{"role": "user", "content": "  ask Bob  "}]
    pos = salient_positions_for_messages(
        messages, tokenizer, SalientSelector(), chat_template=template, add_generation_prompt=False
    )
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    covered = "".join(rendered[enc["offset_mapping"][p][0] : enc["offset_mapping"][p][1]] for p in pos)
    assert covered.strip() == "Bob"


def test_messages_content_missing_from_template_raises(tokenizer):
    template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        salient_positions_for_messages(
            [{"role": "user", "content": "ask bob"}], tokenizer, SalientSelector(), chat_template=template
        )


def test_slow_tokenizer_is_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast"):
        salient_positions("Bob", Slow(), SalientSelector())


def test_selector_pickles(tokenizer):
    sel = SalientSelector(IDFModel.fit(CORPUS), keywords=["paris"], idf_quantile=0.5)
    clone = pickle.loads(pickle.dumps(sel))
    text = "the dog ran to Paris"
    assert clone.char_spans(text) == sel.char_spans(text)
    assert clone.idf_threshold == sel.idf_threshold


# -- property: positions are within bounds and overlap salient spans ------------------------------------------------

_ALPHABET = "abcdeBCDPQ 0123456789.,!?'\n-"
_SELECTOR = SalientSelector(IDFModel.fit(["abc bcd", "abc", "dee 12"]), keywords=["bad", "ce"], idf_quantile=0.5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=_ALPHABET, max_size=60), sink=st.integers(0, 4), special=st.booleans())
def test_positions_property(tokenizer, text, sink, special):
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    n = len(enc["input_ids"])
    spans = _SELECTOR.char_spans(text)
    positions = _SELECTOR.token_positions(text, enc["offset_mapping"], sink=sink)
    assert positions.dtype == np.int64 and np.all(np.diff(positions) > 0)

    def overlaps(p):
        a, b = offsets[p]
        return b > a and any(a < e and b > s for s, e in spans)

    for p in positions:
        assert sink <= p < n
        assert overlaps(p)
    # ...and nothing salient is missed.
    assert set(positions.tolist()) == {p for p in range(sink, n) if overlaps(p)}
    # Spans are sorted, non-overlapping, inside the text.
    assert all(0 <= s < e <= len(text) for s, e in spans)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))


def test_module_doctests():
    # salient.py of 0.1 is now four modules: the rules, the IDF model, the tokenizer side and message spans
    import cagsr_reward.encoding
    import cagsr_reward.idf
    import cagsr_reward.spans

    failed = attempted = 0
    for module in (salient_module, cagsr_reward.idf, cagsr_reward.encoding, cagsr_reward.spans):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        failed, attempted = failed + result.failed, attempted + result.attempted
    assert failed == 0 and attempted > 15

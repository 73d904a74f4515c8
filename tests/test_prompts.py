import pytest

from backforth_spark import prompts


def test_backtranslate_prompt_is_exactly_as_written():
    tpl = prompts.load_template("backtranslate_v1")
    assert tpl.fields == {"passage"}
    [msg] = tpl.render(passage="Boil water {not a field}, add pasta.")
    assert msg["role"] == "user"
    expected = """\
Here is a text from a web page. Suppose an AI assistant had written it as its reply to something a
user asked. What is the most likely thing the user asked? The best guess is a request for which this
text would be an excellent answer.

Reply with the user's request only: one question or instruction, in the user's own voice, with no
introduction, no quotation marks and no answer.

Text:
\"\"\"
Boil water {not a field}, add pasta.
\"\"\""""
    assert msg["content"] == expected


def test_score_prompt_carries_the_rubric_instruction_and_answer():
    tpl = prompts.load_template("score_v1")
    assert tpl.fields == {"instruction", "passage"}
    [msg] = tpl.render(instruction="How do I cook pasta?", passage="Boil water, add pasta.")
    content = msg["content"]
    assert content.startswith("You are grading training data for an AI assistant.")
    assert 'Instruction:\n"""\nHow do I cook pasta?\n"""' in content
    assert 'Candidate answer:\n"""\nBoil water, add pasta.\n"""' in content
    for grade in "12345":
        assert f"\n{grade} - " in content
    assert content.endswith('the grade on the last line as "Score: N", where N is 1, 2, 3, 4 or 5.')
    assert tpl.structured_regex == r"Reason: [^\n]{1,300}\nScore: [1-5]"


def test_rewrite_prompt_asks_for_res_tags():
    tpl = prompts.load_template("rewrite_v1")
    [msg] = tpl.render(instruction="Q?", passage="Draft.")
    assert msg["content"].startswith('A user sent an AI assistant this instruction:\n"""\nQ?\n"""')
    assert msg["content"].endswith("Put the finished reply between [RES] and [/RES] and write nothing else.")


def test_template_hash_changes_with_the_text(tmp_path):
    a = prompts.load_template("score_v1")
    path = tmp_path / "score_custom.yaml"
    path.write_text("user: 'Rate {instruction} / {passage}'\n")
    b = prompts.load_template(str(path))
    assert (b.name, b.fields) == ("score_custom", {"instruction", "passage"})
    assert a.hash != b.hash


def test_unknown_template_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="rewrite_v1"):
        prompts.load_template("nope")


def test_missing_placeholder_value_is_an_error():
    with pytest.raises(KeyError, match="instruction"):
        prompts.load_template("score_v1").render(passage="x")


@pytest.mark.parametrize(
    ("raw", "finish", "status", "value"),
    [
        ("How do I boil an egg?", "stop", "ok", "How do I boil an egg?"),
        ('Instruction: "Explain tides."\n\nSure, tides are...', "stop", "ok", "Explain tides."),
        ("**Question:** What is DNS?", "stop", "ok", "What is DNS?"),
        ("", "stop", "empty", None),
        ("Instruction:", "stop", "empty", None),
        ("A request that never ends because", "length", "parse_error", None),
        ("I'm sorry, I can't help with that.", "stop", "refused", "I'm sorry, I can't help with that."),
    ],
)
def test_parse_instruction(raw, finish, status, value):
    p = prompts.parse_instruction(raw, finish)
    assert (p.status, p.value) == (status, value)


@pytest.mark.parametrize(
    ("raw", "status", "score", "reason"),
    [
        ("Reason: clear and expert.\nScore: 5", "ok", 5, "clear and expert."),
        ("The answer is fine.\nscore = 3", "ok", 3, None),
        ("Score: 2 at first... on reflection Score: 4", "ok", 4, None),
        ("Reason: good.\nScore: 7", "parse_error", None, None),
        ("I think it is great", "parse_error", None, None),
        (None, "empty", None, None),
    ],
)
def test_parse_score(raw, status, score, reason):
    p = prompts.parse_score(raw)
    assert (p.status, p.score, p.value) == (status, score, reason)
    if status != "ok":
        assert p.error


@pytest.mark.parametrize(
    ("raw", "status", "value"),
    [
        ("[RES] Boil the water first. [/RES]", "ok", "Boil the water first."),
        ("Here you go:\n[res]\nLine one.\nLine two.\n[/res] trailing", "ok", "Line one.\nLine two."),
        ("[RES] cut off by the token lim", "parse_error", None),
        ("Just an answer without tags.", "parse_error", None),
        ("[RES]   [/RES]", "empty", None),
        ("[RES]I'm sorry, I cannot help with that.[/RES]", "refused", "I'm sorry, I cannot help with that."),
    ],
)
def test_parse_rewrite(raw, status, value):
    p = prompts.parse_rewrite(raw)
    assert (p.status, p.value) == (status, value)


@pytest.mark.parametrize(
    ("raw", "status", "score", "reason"),
    [
        ('{"reason": "On topic and complete.", "score": 4}', "ok", 4, "On topic and complete."),
        ('{"reason": "x", "score": 7}', "parse_error", None, None),
        ('{"reason": "x", "score": true}', "parse_error", None, None),
        ('{"reason": "cut off', "parse_error", None, None),  # ran out of tokens inside the string
        ("Reason: fine.\nScore: 3", "ok", 3, "fine."),  # an engine that could not constrain decoding
        ("", "empty", None, None),
    ],
)
def test_parse_score_json(raw, status, score, reason):
    p = prompts.parse_score_json(raw)
    assert (p.status, p.score, p.value) == (status, score, reason)


@pytest.mark.parametrize(
    ("raw", "status", "score"), [("4", "ok", 4), (" 2\n", "ok", 2), ("9", "parse_error", None)]
)
def test_parse_score_choice(raw, status, score):
    p = prompts.parse_score_choice(raw)
    assert (p.status, p.score) == (status, score)


def test_curation_checks_short_and_echoed_responses():
    from backforth_spark.config import CurateConfig
    from backforth_spark.curate import REPEATS, SHORT, response_issue

    cfg = CurateConfig(min_response_words=4, max_instruction_overlap=0.8)
    assert response_issue("How do I boil an egg?", "Boil it.", cfg) == SHORT
    assert response_issue("How do I boil an egg?", "How do I boil an egg?", cfg) == REPEATS
    answer = "Put the egg in boiling water for nine minutes."
    assert response_issue("How do I boil an egg?", answer, cfg) is None


def test_chat_token_count_is_the_rendered_prompt_length():
    from transformers import AutoTokenizer

    from backforth_spark.config import load_config
    from backforth_spark.engine import count_chat_tokens
    from backforth_spark.model import resolve_model
    from tests.conftest import LOCAL_CONF

    tok = AutoTokenizer.from_pretrained(resolve_model(load_config(LOCAL_CONF).llm))
    short, long = count_chat_tokens(
        tok, [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "word " * 3000}]]
    )
    assert 3 < short < 40 and long > 3000  # a count, not the number of keys of an encoding

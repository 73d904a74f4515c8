import pytest

from backforth_spark.config import ConfigError, load_config
from backforth_spark.generation import check_config
from tests.conftest import LOCAL_CONF


def test_local_config_loads_with_dotted_override():
    cfg = load_config(LOCAL_CONF, ["chunk.max_tokens=400", "llm.score.sampling.temperature=0.5"])
    assert cfg.chunk.max_tokens == 400
    assert cfg.llm.score.sampling.temperature == 0.5
    assert cfg.llm.model == "embedded"


def test_schema_default_keeps_only_score_5_as_in_the_paper():
    assert load_config(None).curate.min_score == 5


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("chunk.max_tokenz=3", "chunk.max_tokenz"),
        ("chunk.max_tokens=abc", "chunk.max_tokens"),
        ("chunk.too_long=explode", "chunk.too_long"),
        ("nosuchsection.x=1", "nosuchsection"),
    ],
)
def test_bad_key_or_type_is_an_error_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(LOCAL_CONF, [override])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(LOCAL_CONF, ["chunk.max_tokens"])


def test_passages_must_leave_room_for_the_output():
    with pytest.raises(
        ConfigError, match=r"chunk.max_tokens \(1900\) \+ the output budget .* llm.rewrite.sampling"
    ):
        check_config(load_config(LOCAL_CONF, ["chunk.max_tokens=1900"]))


def test_flat_params_use_dotted_keys():
    flat = load_config(LOCAL_CONF).flat()
    assert flat["chunk.max_tokens"] == 512
    assert flat["llm.rewrite.template"] == "rewrite_v1"


def test_spark_conf_override_keeps_the_dotted_spark_key():
    cfg = load_config(
        LOCAL_CONF, ["spark.conf.spark.executor.memory=8g", "spark.conf.spark.sql.shuffle.partitions=64"]
    )
    assert cfg.spark.conf["spark.executor.memory"] == "8g"
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == "64"
    assert cfg.spark.conf["spark.ui.enabled"] == "false"  # the file's other keys stay


def test_json_and_choice_judging_are_for_judging_stages_only():
    check_config(load_config(None, ["llm.score.structured=choice", "llm.ground.structured=json"]))
    with pytest.raises(ConfigError, match="llm.rewrite.structured"):
        check_config(load_config(None, ["llm.rewrite.structured=choice"]))


def test_a_template_whose_placeholders_the_stage_cannot_fill_is_rejected(tmp_path):
    template = tmp_path / "needs_more.yaml"
    template.write_text("user: 'Answer {instruction} using {passage} and {source_url}'\n")
    with pytest.raises(ConfigError, match=r"llm.rewrite.template 'needs_more' uses \['source_url'\]"):
        check_config(load_config(None, [f"llm.rewrite.template={template}"]))


def test_an_llm_stage_without_settings_is_named():
    with pytest.raises(ConfigError, match="llm.extra_stages.toy"):
        load_config(None).llm.stage("toy")


def test_vllm_options_reach_the_engine_arguments_only_when_set():
    from backforth_spark.vllm_engine import vllm_engine_args

    plain = vllm_engine_args(load_config(LOCAL_CONF).llm)
    assert "speculative_config" not in plain and "max_num_seqs" not in plain
    tuned = vllm_engine_args(
        load_config(
            LOCAL_CONF,
            ["llm.max_num_seqs=64", "llm.enable_prefix_caching=true", "llm.speculative_ngram_tokens=5"],
        ).llm
    )
    assert tuned["max_num_seqs"] == 64 and tuned["enable_prefix_caching"] is True
    spec = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}
    assert tuned["speculative_config"] == spec

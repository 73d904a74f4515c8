import pytest

from backforth_spark.core.config import Config, ConfigError, load_config
from backforth_spark.core.generation import Executors, check_config, check_executors
from backforth_spark.spark.session import LOCAL_ONLY
from tests.conftest import LOCAL_CONF, REPO


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
    assert flat["llm.rewrite.template"] == "rewrite_v2"


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
    from backforth_spark.core.engines.vllm_engine import vllm_engine_args

    plain = vllm_engine_args(load_config(LOCAL_CONF).llm)
    assert "speculative_config" not in plain and "max_num_seqs" not in plain
    assert plain["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert "structured_outputs_config" not in vllm_engine_args(
        load_config(LOCAL_CONF, ["llm.compact_json=false"]).llm
    )
    tuned = vllm_engine_args(
        load_config(
            LOCAL_CONF,
            ["llm.max_num_seqs=64", "llm.enable_prefix_caching=true", "llm.speculative_ngram_tokens=5"],
        ).llm
    )
    assert tuned["max_num_seqs"] == 64 and tuned["enable_prefix_caching"] is True
    spec = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}
    assert tuned["speculative_config"] == spec


def test_the_cpu_kv_cache_size_reaches_a_cpu_build_in_bytes_and_never_a_gpu_build():
    from backforth_spark.core.engines.vllm_engine import vllm_engine_args

    llm = load_config(None, ["llm.cpu_kvcache_gib=0.5"]).llm
    assert vllm_engine_args(llm, cpu_build=True)["kv_cache_memory_bytes"] == 536870912
    # on a GPU an explicit size would override gpu_memory_utilization
    assert "kv_cache_memory_bytes" not in vllm_engine_args(llm, cpu_build=False)


@pytest.mark.parametrize(
    ("requested", "cpu_build", "native_bf16", "loaded"),
    [
        ("auto", True, False, "float32"),  # emulated bfloat16 is several times slower
        ("auto", True, True, "bfloat16"),
        ("auto", False, False, "auto"),  # a GPU build keeps the model's own dtype
        ("bfloat16", True, False, "bfloat16"),  # an explicit choice stands
    ],
)
def test_auto_dtype_on_a_cpu_build_follows_its_bfloat16_support(requested, cpu_build, native_bf16, loaded):
    from backforth_spark.core.engines.vllm_engine import vllm_engine_args

    llm = load_config(None, [f"llm.dtype={requested}"]).llm
    assert vllm_engine_args(llm, cpu_build, native_bf16)["dtype"] == loaded


def test_a_stage_names_its_own_model_and_engine_settings():
    cfg = load_config(
        LOCAL_CONF,
        ["llm.rewrite.model=/models/big", "llm.rewrite.engine_settings.tensor_parallel_size=4",
         "llm.score.engine_settings.engine=openai", "llm.score.engine_settings.openai.base_url=http://judge/v1",
         "llm.openai.concurrency=3"],
    )  # fmt: skip
    rewrite = cfg.llm.for_stage("rewrite")
    assert (rewrite.model, rewrite.tensor_parallel_size, rewrite.max_model_len) == ("/models/big", 4, 2048)
    score = cfg.llm.for_stage("score")
    # only the keys the stage gives replace llm.openai's
    assert (score.engine, score.openai.base_url, score.openai.concurrency) == ("openai", "http://judge/v1", 3)
    assert (score.model, cfg.llm.for_stage("backtranslate").model) == ("embedded", "embedded")
    assert cfg.llm.engine == "vllm" and cfg.llm.tensor_parallel_size == 1


def test_stages_without_their_own_settings_share_one_engine():
    llm = load_config(LOCAL_CONF, ["llm.rewrite.model=/models/big"]).llm
    identities = {
        name: llm.for_stage(name).engine_identity() for name in ("backtranslate", "score", "rewrite")
    }
    assert identities["backtranslate"] == identities["score"] != identities["rewrite"]


def test_config_files_are_laid_over_one_another_in_order(tmp_path):
    over = tmp_path / "over.yaml"
    over.write_text("chunk:\n  max_tokens: 256\nllm:\n  score:\n    model: /models/judge\n")
    cfg = load_config([LOCAL_CONF, over], ["chunk.min_tokens=8"])
    assert (cfg.chunk.max_tokens, cfg.chunk.min_tokens, cfg.chunk.max_passages_per_doc) == (256, 8, 3)
    assert cfg.llm.score.model == "/models/judge" and cfg.llm.score.structured == "json"


def test_the_backward_model_example_gives_each_step_its_model():
    from backforth_spark.core.generation import fingerprints

    cfg = load_config([REPO / "conf" / "databricks.yaml", REPO / "conf" / "examples" / "backward_model.yaml"])
    check_config(cfg)
    specs = fingerprints(cfg)
    assert specs["backtranslate"].template.kind == "completion"
    assert specs["backtranslate"].model.endswith("backward-8b")
    assert specs["score"].model == "meta-llama/Llama-3.1-8B-Instruct"
    assert specs["rewrite"].model == "meta-llama/Llama-3.1-70B-Instruct"
    assert cfg.llm.for_stage("rewrite").tensor_parallel_size == 4


def test_a_stage_with_its_own_context_is_checked_against_it():
    with pytest.raises(ConfigError, match=r"llm\.rewrite\.engine_settings\.max_model_len \(1024\)"):
        check_config(load_config(LOCAL_CONF, ["llm.rewrite.engine_settings.max_model_len=1024"]))


def test_rewrite_decodes_with_ngram_speculation_in_production_but_not_on_the_stand_in():
    production = load_config(REPO / "conf" / "databricks.yaml").llm
    assert production.for_stage("rewrite").speculative_ngram_tokens == 4
    assert load_config(LOCAL_CONF).llm.for_stage("rewrite").speculative_ngram_tokens is None


@pytest.mark.parametrize("conf", [None, REPO / "conf" / "databricks.yaml"], ids=["schema", "databricks"])
def test_the_default_stages_share_one_engine_which_speculates_for_rewrite(conf):
    """Rewrite's n-gram speculation would otherwise make its engine differ from the judge's on the same
    model: a worker would close one to load the same weights again."""
    llm = load_config(conf).llm
    stages = ["backtranslate", "score", "rewrite", "ground", "distill"]
    assert len({llm.for_stage(stage).engine_identity() for stage in stages}) == 1
    assert {llm.for_stage(stage).speculative_ngram_tokens for stage in stages} == {4}


def test_a_stage_on_another_model_keeps_an_engine_of_its_own_settings():
    llm = load_config(None, ["llm.backtranslate.model=org/backward-8b"]).llm
    backward, judge = llm.for_stage("backtranslate"), llm.for_stage("score")
    assert backward.engine_identity() != judge.engine_identity()
    # no stage on the backward model asks for speculation; the judge shares rewrite's engine
    assert (backward.speculative_ngram_tokens, judge.speculative_ngram_tokens) == (None, 4)


def test_stages_sharing_an_engine_take_the_most_draft_tokens_any_asks_for():
    llm = load_config(None, ["llm.ground.engine_settings.speculative_ngram_tokens=6"]).llm
    assert {llm.for_stage(stage).speculative_ngram_tokens for stage in ("score", "rewrite", "ground")} == {6}
    # a stage with other engine settings (here its own context) is not part of the shared engine
    llm = load_config(None, ["llm.distill.engine_settings.max_model_len=1024"]).llm
    drafts = {stage: llm.for_stage(stage).speculative_ngram_tokens for stage in ("distill", "score")}
    assert drafts == {"distill": None, "score": 4}


def test_production_prompts_put_fixed_text_first_and_the_stand_in_keeps_v2():
    production, stand_in = Config(), load_config(LOCAL_CONF)
    for stage in ("backtranslate", "score", "rewrite"):
        assert production.llm.stage(stage).template == f"{stage}_v3"
        assert stand_in.llm.stage(stage).template == f"{stage}_v2"


def test_scratch_tables_are_delta_unless_a_local_disk_is_said():
    assert Config().tables.staging_format == "delta"
    assert load_config(REPO / "conf" / "databricks.yaml").tables.staging_format == "delta"
    assert load_config(LOCAL_CONF).tables.staging_format == "parquet"


def test_parquet_staging_with_catalog_tables_is_refused():
    with pytest.raises(ConfigError, match="staging_format parquet is for path-based tables"):
        load_config(LOCAL_CONF, ["tables.catalog_schema=main.backforth"])


def test_parquet_staging_is_refused_on_an_object_store_workdir():
    with pytest.raises(ConfigError, match="atomic renames"):
        load_config(LOCAL_CONF, ["workdir=s3a://bucket/work"])  # conf/local.yaml stages in parquet
    with pytest.raises(ConfigError, match="atomic renames"):
        load_config(LOCAL_CONF, ["workdir=gs://bucket/work"])
    cfg = load_config(LOCAL_CONF, ["workdir=s3a://bucket/work", "tables.staging_format=delta"])
    assert cfg.workdir_uri == "s3a://bucket/work"
    # HDFS renames a folder atomically: parquet staging is fine there
    assert load_config(LOCAL_CONF, ["workdir=hdfs://nn:8020/work"]).tables.staging_format == "parquet"


def test_a_local_workdir_is_made_absolute_and_an_object_store_keeps_its_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["workdir=rel/w"]).workdir_uri == str(tmp_path / "rel" / "w")
    cfg = load_config(None, ["workdir=abfss://c@acct.dfs.core.windows.net/w/"])
    assert cfg.workdir_uri == "abfss://c@acct.dfs.core.windows.net/w"
    # the driver's own files stay on its disk when the workdir is remote
    assert cfg.driver_path == tmp_path / ".backforth-driver"
    assert load_config(None, ["workdir=rel/w", "driver_dir=logs-here"]).driver_path == tmp_path / "logs-here"


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml", "databricks.yaml"])
def test_every_shipped_config_loads_and_passes_the_checks_before_work(name):
    cfg = load_config(REPO / "conf" / name)
    check_config(cfg)
    if name != "local.yaml":  # nothing that suits one machine only
        assert cfg.spark.master is None and cfg.tables.staging_format == "delta"
        assert not LOCAL_ONLY & cfg.spark.conf.keys()


@pytest.mark.parametrize(
    ("name", "sql"),
    [
        ("main.backforth", "`main`.`backforth`"),
        ("my-catalog.raw-data", "`my-catalog`.`raw-data`"),  # Unity Catalog names may hold hyphens
        ("`odd.name`.s", "`odd.name`.`s`"),  # a back-quoted part keeps its dot
        ("`a``b`.s", "`a``b`.`s`"),  # and a doubled back-quote
    ],
)
def test_a_catalog_schema_is_accepted_and_quoted_part_by_part_for_sql(name, sql):
    from backforth_spark.core.config import TablesConfig, quote_name

    assert TablesConfig(catalog_schema=name).catalog_schema == name
    assert quote_name(name) == sql


@pytest.mark.parametrize("name", ["backforth", "a.b.c", "a.", "`a.b"])
def test_a_catalog_schema_that_is_not_two_parts_is_refused(name):
    from backforth_spark.core.config import TablesConfig

    with pytest.raises(ValueError, match="catalog"):
        TablesConfig(catalog_schema=name)


# ---- what an LLM task asks for, against its engine and the cluster's executors ----------------------


def test_tensor_parallelism_beyond_the_tasks_gpus_is_refused_naming_both_keys():
    cfg = load_config(LOCAL_CONF, ["llm.rewrite.engine_settings.tensor_parallel_size=4"])
    with pytest.raises(
        ConfigError,
        match=r"llm\.rewrite\.engine_settings\.tensor_parallel_size \(4\) is more than "
        r"llm\.gpus_per_task \(1\)",
    ):
        check_config(cfg)


@pytest.mark.parametrize("gpus", ["0.5", "1.5"])
def test_a_fraction_of_a_gpu_per_task_is_refused(gpus):
    with pytest.raises(ConfigError, match=rf"llm\.score\.engine_settings\.gpus_per_task \({gpus}\)"):
        check_config(load_config(LOCAL_CONF, [f"llm.score.engine_settings.gpus_per_task={gpus}"]))


def test_a_task_no_executor_can_hold_is_refused_naming_both_sides():
    cfg = load_config(LOCAL_CONF, ["llm.rewrite.engine_settings.gpus_per_task=2", "llm.cpus_per_task=16"])
    with pytest.raises(ConfigError) as caught:
        check_executors(cfg, ["backtranslate", "rewrite"], Executors(cores=8, gpus=1))
    message = str(caught.value)
    assert "llm.rewrite.engine_settings.gpus_per_task (2) is more than an executor offers " in message
    assert "(spark.executor.resource.gpu.amount = 1)" in message
    assert "llm.cpus_per_task (16) is more than an executor offers (spark.executor.cores = 8)" in message
    assert "no executor can run a backtranslate task" in message and "\n" not in message


def test_what_the_conf_does_not_say_about_the_executors_is_not_checked():
    cfg = load_config(LOCAL_CONF, ["llm.gpus_per_task=8", "llm.cpus_per_task=64"])
    check_executors(cfg, ["backtranslate", "score", "rewrite"], Executors(cores=None, gpus=None))


def _bundle_gpus(variables: dict[str, str]) -> float:
    """spark.executor.resource.gpu.amount of databricks.yml's job cluster, its variables as given."""
    import yaml

    bundle = yaml.safe_load((REPO / "databricks.yml").read_text())
    defaults = {name: str(v["default"]) for name, v in bundle["variables"].items() if "default" in v}
    values = {**defaults, **variables}
    (job,) = bundle["resources"]["jobs"].values()
    (cluster,) = job["job_clusters"]
    amount = cluster["new_cluster"]["spark_conf"]["spark.executor.resource.gpu.amount"]
    for name, value in values.items():
        amount = amount.replace(f"${{var.{name}}}", value)
    return float(amount)


def test_the_shipped_configs_fit_the_executors_they_are_laid_over():
    stages = ["backtranslate", "score", "rewrite"]
    # the bundle's default nodes: one GPU (g5.2xlarge, 8 cores)
    databricks = load_config(REPO / "conf" / "databricks.yaml")
    check_config(databricks)
    check_executors(databricks, stages, Executors(cores=8, gpus=_bundle_gpus({})))
    # the paper's split, on the nodes its header names (p4de.24xlarge: 8 GPUs, 96 cores)
    example = load_config(
        [REPO / "conf" / "databricks.yaml", REPO / "conf" / "examples" / "backward_model.yaml"]
    )
    check_config(example)
    check_executors(example, stages, Executors(cores=96, gpus=_bundle_gpus({"gpus_per_node": "8"})))
    with pytest.raises(ConfigError, match="spark.executor.resource.gpu.amount = 1"):
        check_executors(example, stages, Executors(cores=96, gpus=_bundle_gpus({})))
    # conf/cluster.yaml under the README's spark-submit line
    readme = (REPO / "README.md").read_text()
    line = next(x for x in readme.splitlines() if "spark.executor.resource.gpu.amount=" in x)
    cores = int(line.split("--executor-cores ")[1].split()[0])
    gpus = float(line.split("spark.executor.resource.gpu.amount=")[1].split()[0])
    check_executors(load_config(REPO / "conf" / "cluster.yaml"), stages, Executors(cores=cores, gpus=gpus))


def test_a_runs_recorded_settings_come_back_under_the_overrides_without_spark():
    import json

    from backforth_spark.core.config import recorded_settings

    secret = "spark.conf.spark.hadoop.fs.s3a.secret.key=do-not-record"
    chosen = ["llm.backtranslate.model=org/backward-8b", "curate.grounding=true", secret]
    ran = load_config(LOCAL_CONF, chosen)
    recorded = recorded_settings(ran)
    assert "do-not-record" not in recorded
    assert sorted(json.loads(recorded)) == ["chunk", "curate", "dedup", "export", "ingest", "llm"]
    back = load_config(None, ["chunk.max_tokens=100"], recorded=recorded)
    assert back.llm.stage("backtranslate").model == "org/backward-8b" and back.curate.grounding
    assert back.llm.stage("rewrite").template == "rewrite_v2"  # conf/local.yaml's, not the schema's
    assert back.chunk.max_tokens == 100  # an override wins over the record
    assert back.spark == Config().spark  # where a process runs is its own

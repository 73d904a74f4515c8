# The README's commands. Each installs what it needs first (scripts/setup.sh is idempotent).
PY := .venv/bin/python
DEMO_INPUT ?= ../shared/data/dolma-sample
WORKDIR ?= .backforth

N ?= 25000

.PHONY: lowest-spark setup demo test test-fast lint format pyfiles bench-chunk bench-dedup bench-llm bench-llm-local bench-llm-commits bench-components bench-lsh-layouts \
	bench-big-docs bench-big-file bench-injection bench-refresh bench-load bench-export bench-object-store pack-env cluster-packed clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/backforth run --config conf/local.yaml --input $(DEMO_INPUT) --workdir $(WORKDIR) \
		--summary-json $(WORKDIR)/summary.json

# the lowest supported Spark (4.0) and Delta, ingest to export on the demo input (not part of `make test`)
lowest-spark: setup
	DEMO_INPUT=$(DEMO_INPUT) bash scripts/lowest_spark.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not e2e"

pyfiles: setup
	$(PY) scripts/build_pyfiles.py dist/backforth_spark.zip

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

bench-chunk: setup
	$(PY) benchmarks/chunk.py

# The production prompts and decoding (the schema's defaults: `_v3` templates, free rewrites with n-gram
# speculation) on the stand-in model, rewrites capped at 256 tokens: the issue's bars are for the stages
# with their speedups on. `make bench-llm-local` keeps conf/local.yaml's stand-in decoding.
PRODUCTION_DECODING = --set llm.backtranslate.template=backtranslate_v3 --set llm.score.template=score_v3 \
	--set llm.rewrite.template=rewrite_v3 --set llm.rewrite.structured=none \
	--set llm.rewrite.sampling.repetition_penalty=1.0 --set llm.rewrite.sampling.max_tokens=256 \
	--set llm.rewrite.engine_settings.speculative_ngram_tokens=4

# datatrove (the peer) and psutil live in the `bench` dependency group, outside the library
bench-llm: setup
	$(PY) benchmarks/llm_stage.py --prompts $(or $(N),256) $(PRODUCTION_DECODING)

bench-llm-local: setup
	$(PY) benchmarks/llm_stage.py --prompts $(or $(N),256)

bench-components: setup
	$(PY) benchmarks/components.py

# the dedup stage with the default band layout against FineWeb's 14 x 8 on the dedup corpus (Spark path)
bench-lsh-layouts: setup
	$(PY) benchmarks/lsh_layouts.py $(if $(filter command line,$(origin N)),--docs $(N))

bench-big-docs: setup
	$(PY) benchmarks/big_documents.py --sizes-mb 10 50

bench-big-file: setup
	$(PY) benchmarks/big_file.py --gb 1.5

bench-injection: setup
	$(PY) benchmarks/injection.py --templates v1 v2

bench-dedup: setup
	.tools/venv/bin/uv sync --frozen --extra local --extra cpu --extra convert --group bench --compile-bytecode --quiet
	$(PY) benchmarks/dedup.py --docs $(N)

# commit slices of an LLM stage against targets of 10^4, 10^5 and 10^6 rows, a scripted engine (table work)
bench-llm-commits: setup
	$(PY) benchmarks/llm_commits.py

bench-refresh: setup
	$(PY) benchmarks/refresh.py --docs $(N)

# ingest, dedup and chunk of N documents with conf/local.yaml: wall time, documents/s, peak memory
bench-load: setup
	$(PY) benchmarks/load.py --docs $(N)

pack-env: setup
	bash scripts/pack_env.sh

cluster-packed: pack-env pyfiles
	$(PY) scripts/run_packed.py

bench-object-store: setup
	$(PY) benchmarks/object_store.py --docs $(or $(N),20000)

bench-export: setup
	$(PY) benchmarks/export.py --pairs $(or $(PAIRS),100000)

clean:
	rm -rf $(WORKDIR) spark-warehouse metastore_db

"""The pure core: config, text and document logic, prompts and parsers, the LLM stage records, and the
engines. Nothing here imports pyspark (tests/test_layers.py holds it)."""

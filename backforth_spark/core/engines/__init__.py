"""The engine protocol (`engine.py`) and its two implementations: vLLM in-process (`vllm_engine.py`) and
an OpenAI-compatible server (`openai_engine.py`)."""

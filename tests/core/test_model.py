"""Hub models fetched once into a cache folder (`core.model.Hub`), against a stand-in Hub
(tests/hub_stand_in.py) that serves the default model's folder behind a token, as a gated model is."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backforth_spark.core.config import load_config
from backforth_spark.core.model import Hub, ModelNotFoundError, resolve_model
from tests.conftest import LOCAL_CONF
from tests.hub_stand_in import HubStandIn

TOKEN = "hf_test-do-not-log-4242"
REPO = "stand-in/smollm2"
TOKENIZER_FILES = [
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


@pytest.fixture(scope="module")
def stand_in():
    with HubStandIn(Path(resolve_model(load_config(LOCAL_CONF).llm)), REPO, TOKEN) as hub:
        yield hub


def test_workers_fetching_at_once_download_each_file_once_into_the_cache_folder(stand_in, tmp_path):
    hub = Hub(str(tmp_path / "hub"), stand_in.endpoint, TOKEN)
    before = Counter(stand_in.downloads)
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: hub.fetch(REPO), range(3)))
    assert len(set(paths)) == 1 and Path(paths[0]).is_relative_to(tmp_path / "hub")
    downloaded = Counter(stand_in.downloads) - before
    assert downloaded == Counter({name: 1 for name in [*TOKENIZER_FILES, "model.safetensors"]})
    # a later fetch finds it there: nothing downloaded again
    assert hub.fetch(REPO) == paths[0] and Counter(stand_in.downloads) - before == downloaded


def test_a_tokenizer_fetch_leaves_the_weights_on_the_hub(stand_in, tmp_path):
    path = Hub(str(tmp_path), stand_in.endpoint, TOKEN).fetch(REPO, weights=False)
    assert sorted(p.name for p in Path(path).iterdir()) == TOKENIZER_FILES


def test_a_gated_model_without_its_token_is_one_clear_error_that_never_shows_a_token(stand_in, tmp_path):
    wrong = Hub(str(tmp_path), stand_in.endpoint, "hf_wrong-token-1234")
    with pytest.raises(ModelNotFoundError) as err:
        wrong.fetch(REPO)
    message = str(err.value)
    assert REPO in message and "HTTP 401" in message and "llm.hub_token_env" in message
    assert "hf_wrong-token-1234" not in message + repr(wrong)


def test_a_folder_or_a_hub_without_a_cache_folder_is_loaded_as_given(tmp_path):
    assert Hub(None, "http://127.0.0.1:9", TOKEN).fetch("org/model") == "org/model"
    assert Hub(str(tmp_path), "http://127.0.0.1:9", TOKEN).fetch(str(tmp_path)) == str(tmp_path)

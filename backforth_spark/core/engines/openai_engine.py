"""An engine that calls an OpenAI-compatible chat-completions server over HTTP.

Works with `vllm serve`, Databricks Model Serving and other compatible servers. Each `chat` call sends its
conversations with bounded concurrency; a request that fails with 429, a 5xx or a connection error is
retried with exponential backoff (honouring Retry-After). A request that still fails becomes that
conversation's error: the rest of the batch is kept. Prompt tokens are counted before sending with the
model's own tokenizer, so a prompt too long for the context is never sent.

The API key is resolved on the driver (`stages.generate.resolve_api_key`) and handed to the workers;
it goes only into the Authorization header, never into logs, errors, MLflow or tables.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from backforth_spark.core.config import LLMConfig, OpenAIConfig
from backforth_spark.core.engines.engine import (
    Completion,
    Conversation,
    FatalEngineError,
    GenerationParams,
    Prompt,
    count_tokens,
    per_conversation,
)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
REFUSED_CREDENTIALS = frozenset({401, 403})


class HTTPError(Exception):
    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


class CredentialsRefused(FatalEngineError):
    """The server refused the API key (401/403): no request of the stage can succeed."""


@dataclass
class OpenAIEngine:
    cfg: OpenAIConfig
    model: str  # the local model (for its tokenizer) and, unless served_model is set, the name sent
    max_model_len: int
    api_key: str | None = field(default=None, repr=False)
    tokenizer_path: str | None = None  # where the tokenizer is read from; None: `model`
    _tokenizer: object = field(default=None, repr=False)

    @classmethod
    def from_config(
        cls, cfg: LLMConfig, model: str, api_key: str | None = None, tokenizer_path: str | None = None
    ) -> OpenAIEngine:
        return cls(cfg.openai, model, cfg.max_model_len, api_key, tokenizer_path)

    # -- token counting ---------------------------------------------------------------------------

    def count_prompt_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path or self.model)
        return count_tokens(self._tokenizer, prompts)

    # -- generation -------------------------------------------------------------------------------

    def request_body(self, prompt: Prompt, params: GenerationParams) -> dict:
        """The body of a chat-completions request (a conversation) or a completions request (raw text)."""
        body: dict = {
            "model": self.cfg.served_model or self.model,
            **({"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.stop:
            body["stop"] = list(params.stop)
        if params.repetition_penalty != 1.0 and self.cfg.vllm_extensions:
            body["repetition_penalty"] = params.repetition_penalty  # vLLM's extension
        if params.json_schema and self.cfg.vllm_extensions:
            schema = json.loads(params.json_schema)
            # the request's switch is ignored by vLLM 0.32 (its server's own config decides; see
            # docs/ARCHITECTURE.md), kept for servers that read it
            body["structured_outputs"] = {"json": schema, "disable_any_whitespace": True}
        elif params.json_schema:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": json.loads(params.json_schema), "strict": True},
            }
        elif self.cfg.vllm_extensions and params.choice:
            body["structured_outputs"] = {"choice": list(params.choice)}
        elif self.cfg.vllm_extensions and params.regex:
            body["structured_outputs"] = {"regex": params.regex}
        return body

    def chat(
        self, conversations: Sequence[Conversation], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[Completion]:
        return self._all(conversations, params)

    def complete(
        self, prompts: Sequence[str], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[Completion]:
        return self._all(prompts, params)

    def close(self) -> None:
        """Nothing to release: each request opens and closes its own connection."""

    def _all(
        self, prompts: Sequence[Prompt], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[Completion]:
        if not prompts:
            return []
        refused = threading.Event()  # once the key is refused, no further request is sent

        def one(prompt: Prompt, p: GenerationParams) -> Completion:
            if refused.is_set():
                raise CredentialsRefused("the server refused the API key")
            try:
                return self._one(prompt, p)
            except CredentialsRefused:
                refused.set()
                raise

        pool = ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(prompts)))
        try:
            return list(pool.map(one, prompts, per_conversation(params, len(prompts))))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _one(self, prompt: Prompt, params: GenerationParams) -> Completion:
        path = "/completions" if isinstance(prompt, str) else "/chat/completions"
        try:
            reply = self._post_with_retries(path, self.request_body(prompt, params))
        except HTTPError as exc:
            if exc.status in REFUSED_CREDENTIALS:
                # every other request would be refused too: stop the stage, mark no row
                raise CredentialsRefused(str(exc)) from None
            return Completion(None, None, None, None, error=str(exc))
        try:
            choice = reply["choices"][0]
            usage = reply.get("usage") or {}
            text = choice["text"] if isinstance(prompt, str) else choice["message"].get("content")
            return Completion(
                text=text,
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
            )
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            return Completion(None, None, None, None, error=f"unexpected response shape: {exc!r}"[:500])

    def _post_with_retries(self, path: str, body: dict) -> dict:
        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return self._post(path, body)
            except HTTPError as exc:
                if exc.status is not None and exc.status not in RETRY_STATUS:
                    raise
                if attempt == self.cfg.max_retries:
                    raise HTTPError(exc.status, f"{exc} (after {attempt + 1} attempts)") from None
                wait = getattr(exc, "retry_after", None) or delay
                time.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            self.cfg.base_url.rstrip("/") + path, data=json.dumps(body).encode(), headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:2000].decode("utf-8", "replace")
            if self.api_key:  # a server or proxy may echo the request, Authorization header included
                detail = detail.replace(self.api_key, "<redacted>")
            detail = detail[:300]
            err = HTTPError(exc.code, f"HTTP {exc.code} from {path}: {detail}")
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            if retry_after and retry_after.isdigit():
                err.retry_after = float(retry_after)  # type: ignore[attr-defined]
            raise err from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HTTPError(None, f"cannot reach {self.cfg.base_url}: {reason}") from None
        except json.JSONDecodeError as exc:
            raise HTTPError(None, f"the server's reply is not JSON: {exc}") from None

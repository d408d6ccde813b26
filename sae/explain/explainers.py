"""The language models that write explanations and answer the scorers' yes/no questions.

    LocalLM        a causal LM in this process (the embedded smollm2, a Hugging Face id or a folder): batched,
                   left-padded generation; yes/no read off the next-token logits of "Yes" and "No"
    ChatEndpoint   any OpenAI-compatible /v1/chat/completions endpoint (vLLM, llama.cpp's server, a hosted
                   API), spoken to with urllib; the key comes from an environment variable

Both take prompts as chat messages (sae.explain.prompts) and have .name, generate() and yes_no().
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from sae.errors import UserError
from sae.explain.prompts import parse_yes_no


def _as_text(tokenizer, messages: list[dict]) -> str:
    """The chat template when the tokenizer has one, else a plain System/User/Assistant layout."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class LocalLM:
    """A Hugging Face causal LM run in this process (bf16 on CUDA, fp32 on the CPU by default)."""

    def __init__(self, name: str, device="cpu", dtype="auto", batch_size: int = 16, loaded=None):
        from sae.lm import load_model
        self.loaded = loaded if loaded is not None else load_model(name, device=device, dtype=dtype)
        if not self.loaded.is_causal or not hasattr(self.loaded.model, "generate"):
            raise UserError(f"the explainer {name!r} cannot generate text (it is not a causal language model)")
        self.name, self.batch_size = name, batch_size
        self.model = self.loaded.model.eval()
        self.tokenizer = self.loaded.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = next(self.model.parameters()).device
        self.answer_ids = {word: self._first_ids(word) for word in ("Yes", "No")}
        # an explanation is one line: generation stops at the first line break (or the end of the turn)
        newline = self.tokenizer.encode("\n", add_special_tokens=False)
        self.stop_ids = sorted({i for i in (self.tokenizer.eos_token_id, *newline[-1:]) if i is not None})

    def _first_ids(self, word: str) -> list[int]:
        ids = set()
        for variant in (word, " " + word, word.lower(), " " + word.lower()):
            encoded = self.tokenizer.encode(variant, add_special_tokens=False)
            if encoded:
                ids.add(encoded[0])
        return sorted(ids)

    def _batch(self, texts: list[str], room: int = 0):
        """Left-padded ids; a prompt longer than the model takes loses its start (room: tokens to generate)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.tokenizer.truncation_side = "left"
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                              truncation=limit is not None, max_length=None if limit is None else limit - room
                              ).to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], max_new_tokens: int = 32) -> list[str]:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [_as_text(self.tokenizer, p) for p in prompts[i:i + self.batch_size]]
            batch = self._batch(texts, room=max_new_tokens)
            try:
                generated = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                                pad_token_id=self.tokenizer.pad_token_id,
                                                eos_token_id=self.stop_ids)                    # [b, prompt + new]
            except Exception as error:  # noqa: BLE001 - a model that cannot generate: one line
                raise UserError(f"the explainer {self.name!r} could not generate: {type(error).__name__}: "
                                f"{error}") from None
            new = generated[:, batch["input_ids"].shape[1]:]
            out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return out

    @torch.no_grad()
    def yes_no(self, prompts: list[list[dict]]) -> list[bool]:
        """True where the model's next token is more likely "Yes" than "No" (one forward pass per batch)."""
        answers = []
        yes, no = torch.tensor(self.answer_ids["Yes"]), torch.tensor(self.answer_ids["No"])
        for i in range(0, len(prompts), self.batch_size):
            batch = self._batch([_as_text(self.tokenizer, p) for p in prompts[i:i + self.batch_size]])
            try:
                logits = self.model(**batch, logits_to_keep=1).logits[:, -1].float().cpu()     # [b, vocab]
            except TypeError:      # a model whose forward takes no logits_to_keep
                logits = self.model(**batch).logits[:, -1].float().cpu()
            answers += (logits[:, yes].amax(-1) > logits[:, no].amax(-1)).tolist()
        return answers


class ChatEndpoint:
    """An OpenAI-compatible chat endpoint: URL is the API base (…/v1) or the full …/chat/completions."""

    def __init__(self, url: str, model: str, key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 concurrency: int = 4):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--explainer-url must start with http:// or https:// (got {url!r})")
        if not model:
            raise UserError("--explainer-url needs --explainer-model (the model name the endpoint serves)")
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.concurrency = model, timeout, max(1, concurrency)
        self.key = os.environ.get(key_env) if key_env else None
        self.name = f"{model} @ {url}"

    def _ask(self, messages: list[dict], max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read()[:200].decode(errors="replace").strip()
            raise UserError(f"the explainer endpoint {self.url} answered HTTP {error.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise UserError(f"cannot reach the explainer endpoint {self.url}: {reason}") from None
        except ValueError:
            raise UserError(f"the explainer endpoint {self.url} did not answer JSON") from None
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"the explainer endpoint {self.url} answered without choices[0].message") from None

    def _map(self, prompts, max_tokens):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda p: self._ask(p, max_tokens), prompts))

    def generate(self, prompts: list[list[dict]], max_new_tokens: int = 32) -> list[str]:
        return self._map(prompts, max_new_tokens)

    def yes_no(self, prompts: list[list[dict]]) -> list[bool]:
        return [parse_yes_no(text) is True for text in self._map(prompts, 3)]


def make_explainer(explainer: str = "smollm2", url: str | None = None, model: str | None = None,
                   device="cpu", dtype="auto", batch_size: int = 16, key_env: str = "OPENAI_API_KEY"):
    """The explainer the options name: an endpoint when url is given, else an in-process causal LM."""
    if url:
        return ChatEndpoint(url, model, key_env=key_env)
    if model:
        raise UserError("--explainer-model names the model of an endpoint: give --explainer-url too")
    return LocalLM(explainer, device=device, dtype=dtype, batch_size=batch_size)

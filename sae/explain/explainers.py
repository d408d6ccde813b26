"""The language models that write explanations and answer the scorers' yes/no questions.

    LocalLM        a causal LM in this process (the embedded smollm2, a Hugging Face id or a folder): batched,
                   left-padded generation; yes/no questions answered as a margin, log P(Yes) - log P(No) of
                   the next token, prompts with a common start packed into one row under a block mask
    ChatEndpoint   any OpenAI-compatible /v1/chat/completions endpoint (vLLM, llama.cpp's server, a hosted
                   API), spoken to with urllib; the key comes from an environment variable

Both take prompts as chat messages (sae.explain.prompts) and have .name, generate() and yes_no(); yes_no()
gives booleans (an endpoint's answers) or margins (a local model's lean, calibrated by sae.explain.scorers).
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
    def yes_no(self, prompts: list[list[dict]], tokens_per_pass: int = 2048) -> list[float]:
        """The judge's lean for each prompt: log P(Yes) - log P(No) at its next token (> 0 leans Yes).

        Consecutive prompts that start alike (the system turn and the explanation) are packed into one row:
        their common start once, then each prompt's own tail, with a block mask and positions that make
        every tail see only the start and itself, exactly as if it had been run alone. Rows hold at most 8
        prompts (the block mask's attention grows with the square of a row) and are batched to about
        tokens_per_pass tokens a forward pass (large matrix products keep AMX/GPU units busy)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        ids = [self.tokenizer(_as_text(self.tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
        ids = [row[-limit:] if limit else row for row in ids]              # a too-long prompt loses its start
        packed = [_pack(ids[start:stop], shared) for start, stop, shared in shared_prefix_groups(ids)]
        margins: list[float] = []
        i = 0
        while i < len(packed):
            rows = [packed[i]]
            while i + len(rows) < len(packed) and \
                    (len(rows) + 1) * max(len(r[0]) for r in packed[i:i + len(rows) + 1]) <= tokens_per_pass:
                rows.append(packed[i + len(rows)])
            try:
                margins += self._packed_margins(rows)
            except Exception as error:  # noqa: BLE001 - a model that cannot run: one line
                raise UserError(f"the explainer {self.name!r} could not answer: {type(error).__name__}: "
                                f"{error}") from None
            i += len(rows)
        return margins

    def _packed_margins(self, rows) -> list[float]:
        """Margins of packed rows ((tokens, positions, segment, read) each, from _pack), in one forward pass."""
        yes, no = torch.tensor(self.answer_ids["Yes"]), torch.tensor(self.answer_ids["No"])
        width = max(len(r[0]) for r in rows)
        tokens = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        segment = torch.full((len(rows), width), -2, dtype=torch.long)   # -1: the shared start; k: tail k; -2: pad
        for r, (row_tokens, row_positions, row_segment, _) in enumerate(rows):
            n = len(row_tokens)
            tokens[r, :n], positions[r, :n], segment[r, :n] = row_tokens, row_positions, row_segment
        query, key = segment[:, :, None], segment[:, None, :]                              # [b, L, 1], [b, 1, L]
        causal = torch.ones(width, width, dtype=torch.bool).tril()                         # [L, L]
        allowed = causal & ((key == -1) | (key == query))                                  # [b, L, L]
        allowed[:, :, 0] |= segment == -2           # a pad sees the first token only (no empty softmax row)
        read = torch.cat([r[3] for r in rows])                                             # [n] positions read
        row_of = torch.cat([torch.full((len(r[3]),), i) for i, r in enumerate(rows)])      # [n]
        keep = torch.unique(read)
        mask = allowed[:, None].to(self.device)                                            # [b, 1, L, L]
        if getattr(self.model.config, "_attn_implementation", "sdpa") != "sdpa":           # eager: additive
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask,
                                                                                        torch.finfo(dtype).min)
        logits = self.model(input_ids=tokens.to(self.device), position_ids=positions.to(self.device),
                            attention_mask=mask,
                            logits_to_keep=keep.to(self.device)).logits                    # [b, |keep|, vocab]
        logp = logits[row_of, torch.searchsorted(keep, read)].float().cpu().log_softmax(-1)  # [n, vocab]
        return (logp[:, yes].logsumexp(-1) - logp[:, no].logsumexp(-1)).tolist()


def _pack(group: list[list[int]], shared: int):
    """One row for prompts whose first `shared` tokens are equal: (tokens, positions, segment ids, the
    positions where each prompt's next token is read), all 1-D int64 tensors."""
    tokens, positions, segment, read = list(group[0][:shared]), list(range(shared)), [-1] * shared, []
    for k, row in enumerate(group):
        tail = row[shared:]
        tokens += tail
        positions += range(shared, shared + len(tail))
        segment += [k] * len(tail)
        read.append(len(tokens) - 1)
    return tuple(torch.tensor(x, dtype=torch.long) for x in (tokens, positions, segment, read))


def shared_prefix_groups(ids: list[list[int]], min_shared: int = 8, keep: float = 0.8, most: int = 8):
    """(start, stop, shared) runs of at most `most` consecutive token lists whose first `shared` tokens are
    equal; a run grows while its common start stays at least `keep` of what the run's first two members
    share (and at least min_shared tokens); every member keeps one token of its own after the shared start."""
    start = 0
    while start < len(ids):
        first, shared, stop = ids[start], len(ids[start]) - 1, start + 1
        target = None
        while stop < len(ids) and stop - start < most:
            row = ids[stop]
            n, cap = 0, min(shared, len(row) - 1)
            while n < cap and first[n] == row[n]:
                n += 1
            if n < min_shared or (target is not None and n < target):
                break
            if target is None:
                target = keep * n
            shared, stop = n, stop + 1
        yield start, stop, max(0, shared) if stop > start + 1 else max(0, len(first) - 1)
        start = stop


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

"""The inference engine: requests in, a batched model step at a time, text deltas out.

`LLMEngine` is synchronous and single-threaded: `add_request`, then call `step()` until done.
It owns the scheduler, the paged KV cache, the model runner and output processing (sampling,
detokenization, stop conditions). `AsyncEngine` (async_engine.py) drives it from a thread for the
HTTP server; the CLI uses it directly.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from colossuslm.errors import ColossusError
from colossuslm.models.transformer import Transformer
from colossuslm.serve.detokenizer import IncrementalDetokenizer, StopStringMatcher, token_bytes_table
from colossuslm.serve.draft_model import DraftModelProposer, check_draft, check_draft_tokenizer
from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.kv_cache import PagedKVCache
from colossuslm.serve.loading import LoadedModel, load_for_inference
from colossuslm.serve.model_runner import StepItem, make_runner
from colossuslm.serve.request import GenerationResult, Request, RequestOutput
from colossuslm.serve.sampling import (
    LogitsAdjuster,
    SamplingParams,
    TokenLogprob,
    make_generator,
    sample,
    token_logprobs,
)
from colossuslm.serve.scheduler import ScheduledRequest, Scheduler
from colossuslm.serve.settings import EngineConfig
from colossuslm.serve.speculative import NgramProposer, SpeculativeStats, verify
from colossuslm.serve.structured_output import GrammarCompiler, advance, constrain_logits_


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float
    preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache (requests at admission)
    prefix_cache_hits: int  # of those, tokens found there and not computed again
    prompt_tokens_computed: int  # prompt tokens actually run through the model (recomputes included)
    spec_num_drafts: int = 0  # speculative verification spans
    spec_draft_tokens: int = 0  # draft tokens proposed (and verified)
    spec_accepted_tokens: int = 0  # of those, accepted
    spec_propose_seconds: float = 0.0  # wall time spent proposing drafts


class LLMEngine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        eos_token_ids: int | Sequence[int],
        config: EngineConfig | None = None,
        draft_model: Transformer | None = None,
    ):
        """`draft_model`: the draft for `speculative = "draft"` (else loaded from `config.draft_model`)."""
        self.config = config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        # Every id that ends generation (Llama 3 instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>);
        # the first is the model's EOS token.
        self.eos_token_ids = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids)
        if not self.eos_token_ids:
            raise ValueError("the engine needs at least one EOS token id")
        self.eos_token_id = self.eos_token_ids[0]
        self.device = model.tok_embeddings.weight.device
        self.vocab_size = model.cfg.vocab_size
        self._token_bytes = token_bytes_table(tokenizer)  # built once, shared by every request
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids)
        self.max_model_len = self._check_context(config.max_model_len, model.cfg.max_seq_len)
        cache_tokens = self._cache_tokens(config)
        whole_contexts = cache_tokens >= config.max_num_seqs * self.max_model_len
        block_size = config.block_size or (self.max_model_len if whole_contexts else 16)
        # This process's runner, or rank 0's of a tensor-parallel group (`colossus serve --tp N`).
        self.runner = make_runner(
            model, -(-cache_tokens // block_size), block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        cache = self.runner.cache
        default_budget = (
            config.CHUNKED_PREFILL_BUDGET if config.enable_chunked_prefill else max(2048, self.max_model_len)
        )
        self.scheduler = Scheduler(
            cache,
            config.max_num_seqs,
            config.max_num_batched_tokens or default_budget,
            # a whole-context block never grows, so nothing need be kept free
            watermark_blocks=0 if block_size >= self.max_model_len else None,
            enable_chunked_prefill=config.enable_chunked_prefill,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.prompt_tokens_computed = 0
        self.proposer = self._make_proposer(config, draft_model, cache)
        self.spec_stats = SpeculativeStats()
        self._ids = itertools.count()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str = "auto", dtype: str = "auto", config: EngineConfig | None = None
    ) -> LLMEngine:
        return cls.from_loaded(load_for_inference(path, device=device, dtype=dtype), config)

    @classmethod
    def from_loaded(
        cls, loaded: LoadedModel, config: EngineConfig | None = None, draft_model: Transformer | None = None
    ) -> LLMEngine:
        return cls(loaded.model, loaded.tokenizer, loaded.special.eos_ids, config, draft_model)

    # ----------------------------------------------------------------------------- requests

    def make_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Validate and build a request without touching engine state (safe from any thread)."""
        params.validate()
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token", param="prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        for param, ids in (
            ("logit_bias", params.logit_bias),
            ("stop_token_ids", params.stop_token_ids),
            ("allowed_token_ids", params.allowed_token_ids or ()),
        ):
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise InvalidRequestError(f"{param} token ids must be in [0, {self.vocab_size})", param=param)
        prompt_len = len(prompt_ids)
        if params.max_tokens is None:
            if prompt_len >= self.max_model_len:
                raise InvalidRequestError(
                    f"This model's maximum context length is {self.max_model_len} tokens, and the prompt "
                    f"has {prompt_len}, leaving no room for a reply. Shorten the prompt.",
                    param="messages",
                )
            max_total = self.max_model_len
        else:
            max_total = prompt_len + params.max_tokens
            if max_total > self.max_model_len:
                raise InvalidRequestError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                    f"requested {max_total} tokens ({prompt_len} in the prompt, {params.max_tokens} in the "
                    f"completion). Shorten the prompt or lower max_tokens.",
                    param="max_tokens",
                )
        stop_ids = frozenset(params.stop_token_ids).union(() if params.ignore_eos else self.eos_token_ids)
        return Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_ids=list(prompt_ids),
            params=params,
            max_total_tokens=max_total,
            stop_token_ids=stop_ids,
            generator=make_generator(params.seed, self.device),
            detokenizer=IncrementalDetokenizer(self.tokenizer, self._token_bytes),
            stop_matcher=StopStringMatcher(params.stop, keep_stop=params.include_stop_str_in_output),
            matcher=None if params.constraint is None else self.grammars.matcher(params.constraint),
            adjuster=LogitsAdjuster(params, prompt_ids, self.vocab_size, self.device, stop_ids)
            if params.adjusts_logits
            else None,
        )

    def add(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        request = self.make_request(prompt_ids, params, request_id)
        self.add(request)
        return request.request_id

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its cache blocks. False if it was not there (already finished)."""
        return bool(self._finish_requests(request_id, "abort"))

    def abort_all(self) -> None:
        """Drop every unfinished request (after a failed step: their state is unknown)."""
        self._finish_requests(list(self.scheduler.requests), "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.runner.cache.usage,
            preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
            prompt_tokens_computed=self.prompt_tokens_computed,
            spec_num_drafts=self.spec_stats.num_drafts,
            spec_draft_tokens=self.spec_stats.num_draft_tokens,
            spec_accepted_tokens=self.spec_stats.num_accepted_tokens,
            spec_propose_seconds=self.spec_stats.propose_seconds,
        )

    # ----------------------------------------------------------------------------- stepping

    def step(self) -> list[RequestOutput]:
        """Run the model once over this step's work; one output per request whose prompt is now
        fully computed (a prompt still being computed in chunks produces nothing yet)."""
        if self.proposer is not None:
            self._propose_drafts()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        out = self.runner.execute_step([self._step_item(s) for s in scheduled])
        outputs = []
        rows = [i for i, s in enumerate(scheduled) if s.completes_prompt and not s.num_draft]
        for work, hidden in zip(scheduled, out.hidden):
            request = work.request
            if work.num_draft:  # verified after every other request's bookkeeping below
                continue
            if hidden is not None:
                self._score_prompt(request, hidden, request.num_cached)
            start = request.num_cached  # prompt tokens among [start, start + n): the rest recompute outputs
            self.prompt_tokens_computed += max(0, min(start + work.num_new_tokens, len(request.prompt_ids)) - start)
            self.scheduler.record_computed(request, work.num_new_tokens)
        for work, hidden in zip(scheduled, out.hidden):
            if work.num_draft:
                outputs.append(self._verify_drafts(work, hidden))
        if not rows:
            return outputs
        ready = [scheduled[i].request for i in rows]
        logits = out.logits if len(rows) == len(scheduled) else out.logits[torch.tensor(rows, device=out.logits.device)]
        # Only requests that sample draw from their generators, so chunking never shifts a seed's stream.
        next_tokens = sample(
            self._logits_to_sample(ready, logits), [r.params for r in ready], [r.generator for r in ready]
        )
        chosen_logprobs = self._chosen_logprobs(ready, logits, next_tokens)
        for request, token, logprob in zip(ready, next_tokens, chosen_logprobs):
            if request.params.max_tokens == 0:  # the prompt was only to be scored
                outputs.append(self._finish_scored_prompt(request))
            else:
                outputs.append(self._append_token(request, token, logprob))
        return outputs

    @staticmethod
    def _logits_to_sample(ready: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """What sampling draws from: the logits with penalties and biases applied, then limited to
        what each structured-output constraint allows, for the requests that ask (a copy: the
        log-probabilities returned stay the model's own, as vLLM's raw_logprobs)."""
        constrained = [i for i, r in enumerate(ready) if r.matcher is not None]
        if not constrained and all(r.adjuster is None for r in ready):
            return logits
        logits = logits.clone()
        for row, request in enumerate(ready):
            if request.adjuster is not None:
                request.adjuster.observe(request.output_ids)
                request.adjuster.apply_(logits[row])
        if constrained:
            constrain_logits_(logits, constrained, [ready[i].matcher for i in constrained])
        return logits

    @staticmethod
    def _step_item(work: ScheduledRequest) -> StepItem:
        request, start = work.request, work.request.num_cached
        computed = work.num_new_tokens - work.num_draft
        return StepItem(
            new_tokens=request.token_range(start, start + computed) + request.draft_ids,
            start_pos=start,
            block_table=request.block_table,
            # a verification span needs the logits at every position, not just the last
            return_hidden=request.needs_prompt_hidden_states or work.num_draft > 0,
        )

    # ----------------------------------------------------------------------------- speculation

    def _make_proposer(
        self, config: EngineConfig, draft_model: Transformer | None, cache: PagedKVCache
    ) -> NgramProposer | DraftModelProposer | None:
        """The draft strategy, chosen once; None when speculation is off."""
        if config.speculative is None:
            if config.draft_model is not None or draft_model is not None:
                raise ColossusError("a draft model was given but speculative decoding is off: add --speculative draft")
            return None
        k, low, high = config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max
        if k < 1:
            raise ColossusError(f"speculative decoding needs num_speculative_tokens >= 1 (got {k})")
        if config.speculative == "draft":
            # one spare block per sequence: a draft cache holds up to k - 1 drafts past the tokens
            num_blocks = cache.num_blocks + config.max_num_seqs
            return DraftModelProposer(self._draft_model(config, draft_model), k, num_blocks, cache.block_size)
        if config.speculative != "ngram":
            raise ColossusError(
                f"speculative = {config.speculative!r} is unknown: use 'ngram' or 'draft' (or leave it off)"
            )
        if low < 1 or high < low:
            raise ColossusError(
                f"speculative decoding needs 1 <= prompt_lookup_min <= prompt_lookup_max (got {low}, {high})"
            )
        return NgramProposer(k, high, low)

    def _draft_model(self, config: EngineConfig, draft_model: Transformer | None) -> Transformer:
        """The draft model given, or the one `config.draft_model` names, loaded like the target."""
        if draft_model is None:
            if config.draft_model is None:
                raise ColossusError("speculative = 'draft' needs a draft model: add --draft CKPT_OR_HF_DIR")
            loaded = load_for_inference(
                config.draft_model, device=str(self.device), dtype=self.model.tok_embeddings.weight.dtype
            )
            check_draft_tokenizer(loaded.tokenizer, self.tokenizer)
            draft_model = loaded.model
        check_draft(draft_model, self.model, self.max_model_len)
        return draft_model

    def _propose_drafts(self) -> None:
        """Drafts for every request that is decoding (prompt computed, one token to go)."""
        started = time.perf_counter()
        self.proposer.propose_for([r for r in self.scheduler.decoding() if r.speculates])
        self.spec_stats.propose_seconds += time.perf_counter() - started  # drafts are on the host: synced

    @torch.inference_mode()
    def _verify_drafts(self, work: ScheduledRequest, hidden: torch.Tensor) -> RequestOutput:
        """Accept drafts against the model's logits at each position, emit up to the first stop,
        and count as computed only the tokens kept (rejected ones' KV slots are overwritten later)."""
        request, drafts = work.request, work.request.draft_ids
        logits = self.runner.logits(hidden)  # [1 + k, vocab]
        tokens, accepted = verify(logits, drafts, request.params, request.generator, request.draft_probs)
        request.draft_ids, request.draft_probs = [], None
        self.spec_stats.record(len(drafts), accepted)
        emitted, reason = [], None
        for token in tokens:
            emitted.append(token)
            reason = self._push_token(request, token)
            if reason is not None:
                break
        # KV now holds the last token and the accepted drafts; the final emitted token is new.
        self.scheduler.record_computed(request, 1 + min(accepted, len(emitted)))
        if reason is not None:
            self._finish(request, reason)
        else:
            self.scheduler.release_unused_blocks(request)
        logprobs = None
        if request.params.logprobs is not None:
            chosen = torch.tensor(emitted, device=logits.device)
            logprobs = token_logprobs(logits[: len(emitted)], chosen, [request.params.logprobs] * len(emitted))
        return self._output(request, emitted, reason, logprobs)

    PROMPT_LOGPROB_ROWS = 512  # positions turned into fp32 logits at a time: bounds [rows, vocab] memory

    @torch.inference_mode()
    def _score_prompt(self, request: Request, hidden: torch.Tensor, start: int) -> None:
        """Extend `request.prompt_logprobs` over the positions this step computed (`hidden`: one
        row per position from `start`): each prompt token's log-probability given the tokens
        before it (none for the first). A prompt computed in chunks is scored chunk by chunk."""
        prompt = request.prompt_ids
        scored: list[TokenLogprob | None] = [None] if start == 0 else list(request.prompt_logprobs or [])
        end = min(start + hidden.shape[0], len(prompt) - 1)  # position i predicts prompt token i + 1
        targets = torch.tensor(prompt[start + 1 : end + 1], dtype=torch.long, device=hidden.device)
        top_n = request.params.prompt_logprobs
        for first in range(0, end - start, self.PROMPT_LOGPROB_ROWS):
            last = min(first + self.PROMPT_LOGPROB_ROWS, end - start)
            logits = self.runner.logits(hidden[first:last])
            scored += token_logprobs(logits, targets[first:last], [top_n] * (last - first))
        request.prompt_logprobs = scored

    @staticmethod
    def _chosen_logprobs(batch: list[Request], logits: torch.Tensor, tokens: list[int]) -> list[TokenLogprob | None]:
        """Log-probabilities of the sampled tokens, for the requests that asked (one batched call)."""
        rows = [i for i, r in enumerate(batch) if r.params.logprobs is not None and r.params.max_tokens != 0]
        result: list[TokenLogprob | None] = [None] * len(batch)
        if rows:
            index = torch.tensor(rows, device=logits.device)
            chosen = torch.tensor([tokens[i] for i in rows], device=logits.device)
            scored = token_logprobs(logits[index], chosen, [batch[i].params.logprobs for i in rows])
            for row, value in zip(rows, scored):
                result[row] = value
        return result

    def _finish_scored_prompt(self, request: Request) -> RequestOutput:
        self._finish_requests(request.request_id, "length")
        return RequestOutput(
            request_id=request.request_id,
            text="",
            token_ids=[],
            finished=True,
            finish_reason="length",
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=0,
            logprobs=[] if request.params.logprobs is not None else None,
            prompt_logprobs=request.prompt_logprobs,
        )

    def _append_token(self, request: Request, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        reason = self._push_token(request, token)
        if reason is not None:
            self._finish(request, reason)
        return self._output(request, [token], reason, None if logprob is None else [logprob])

    @staticmethod
    def _push_token(request: Request, token: int) -> str | None:
        """Append a generated token; the finish reason if it ends the request."""
        request.output_ids.append(token)
        # before min_tokens nothing but the length ends it (stop tokens were masked when sampling)
        may_stop = len(request.output_ids) >= request.params.min_tokens
        if token in request.stop_token_ids and may_stop:
            return "stop"
        finished_constraint = request.matcher is not None and advance(request.matcher, token)
        matcher = request.stop_matcher
        matcher.add(request.detokenizer.push(token), search=may_stop)
        if matcher.stopped or finished_constraint:
            return "stop"
        return "length" if request.num_tokens >= request.max_total_tokens else None

    def _finish(self, request: Request, reason: str) -> None:
        request.stop_matcher.add(request.detokenizer.flush())
        self._finish_requests(request.request_id, reason)

    def _finish_requests(self, request_ids: str | list[str], reason: str) -> list[Request]:
        """The scheduler takes them out and frees their blocks; a draft model frees its own."""
        finished = self.scheduler.finish_requests(request_ids, reason)
        if self.proposer is not None and finished:
            self.proposer.forget(r.request_id for r in finished)
        return finished

    @staticmethod
    def _output(
        request: Request, tokens: list[int], reason: str | None, logprobs: list[TokenLogprob] | None
    ) -> RequestOutput:
        """The delta for the tokens just appended (the first output also carries prompt logprobs)."""
        return RequestOutput(
            request_id=request.request_id,
            text=request.stop_matcher.take(final=reason is not None),
            token_ids=tokens,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(request.output_ids),
            logprobs=logprobs,
            prompt_logprobs=request.prompt_logprobs if len(request.output_ids) == len(tokens) else None,
        )

    # ----------------------------------------------------------------------------- conveniences

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding deltas as they come (the CLI's path).

        This drives `step()` itself, so use it (and `generate`) only on an engine nobody else is
        stepping; outputs of other requests in the batch are not returned here.
        """
        request_id = self.add_request(prompt_ids, params)
        try:
            while True:
                for output in self.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            self.abort_request(request_id)  # no-op once finished; frees the slot if the caller stops early

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationResult]:
        """Complete every prompt, all batched together; results in prompt order."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]
        texts: dict[str, list[str]] = {i: [] for i in ids}
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id not in texts:
                    continue  # someone else's request
                texts[out.request_id].append(out.text)
                tokens[out.request_id].extend(out.token_ids)
                if out.finished:
                    done[out.request_id] = out
        return [
            GenerationResult(
                text="".join(texts[i]),
                token_ids=tokens[i],
                finish_reason=done[i].finish_reason,
                prompt_tokens=done[i].prompt_tokens,
                completion_tokens=done[i].completion_tokens,
            )
            for i in ids
        ]

    # ----------------------------------------------------------------------------- sizing

    @staticmethod
    def _check_context(asked: int | None, model_max: int) -> int:
        if asked is None:
            return model_max
        if not 1 <= asked <= model_max:
            raise ColossusError(
                f"max_model_len = {asked} is invalid: must be between 1 and the model's "
                f"max_seq_len = {model_max} (RoPE tables end there)"
            )
        return asked

    def _cache_tokens(self, config: EngineConfig) -> int:
        if config.max_num_seqs < 1 or (config.block_size is not None and config.block_size < 1):
            raise ColossusError("max_num_seqs and block_size must be at least 1")
        if config.max_num_batched_tokens is not None and config.max_num_batched_tokens < 1:
            raise ColossusError("max_num_batched_tokens must be at least 1")
        per_token = PagedKVCache.bytes_per_token(self.model.cfg, self.model.tok_embeddings.weight.dtype)
        tokens = config.kv_cache_tokens
        if tokens is None:
            tokens = min(config.max_num_seqs * self.max_model_len, config.kv_cache_bytes // per_token)
        if tokens < self.max_model_len:
            raise ColossusError(
                f"the KV cache holds {tokens} tokens, less than one full context of {self.max_model_len}; "
                f"give it more memory or lower the served context length (--max-model-len)"
            )
        return tokens


__all__ = ["EngineConfig", "EngineStats", "LLMEngine", "SamplingParams"]

"""lm-evaluation-harness on Colossus models: the `colossus` model class, and running tasks.

Importing this module registers the class with lm-eval as `colossus`. lm-eval finds external
model classes only through its registry (it reads no entry points), so its own `lm_eval` command
does not know `colossus` until this module is imported; use `colossus eval RUN --tasks ...`, or
`python -m colossuslm.eval.lm_eval --model colossus --model_args path=RUN ...`, which is lm-eval's
command line with the class registered.

Log-likelihoods come from the model's own forward (`eval.scoring`), batched; generation runs on
the serving engine (continuous batching, the same stop-string handling as the API). Tokenization
is the serving API's (`/tokenize` without special tokens added) and the context prefix is the
end-of-text token, so lm-eval's `local-completions` against `colossus serve` scores the same
tokens and gets the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (before registering: lm-eval loads its own models only into an empty registry)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer

from colossuslm.errors import ColossusError
from colossuslm.eval.scoring import score_sequences
from colossuslm.models.transformer import Transformer

log = logging.getLogger(__name__)
SHIPPED_TASKS = Path(__file__).parent / "tasks"  # colossus_mc, colossus_gen
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generation tasks that name none


@register_model("colossus")
class ColossusLM(TemplateLM):
    """A Colossus checkpoint (or an in-memory model) as an lm-eval model.

    From lm-eval: `--model colossus --model_args path=RUN_OR_CKPT,device=cpu,dtype=fp32,
    quantization=int8,max_length=N,max_gen_toks=N` and `--batch_size N`. In code: `ColossusLM.from_model(...)`.
    """

    def __init__(
        self,
        path: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | None = None,
        quantization: str = "none",
    ):
        super().__init__()
        if path is None:
            raise ColossusError("the colossus model needs a checkpoint: --model_args path=RUN_OR_CHECKPOINT_DIR")
        if max_batch_size is not None:
            raise ColossusError("max_batch_size only applies to batch_size=auto, which colossus does not support")
        from colossuslm.serve.loading import load_for_inference

        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes --device cuda:0 unless told otherwise; its own Hugging
            # Face model falls back to the CPU then, and so does this one, saying so.
            log.warning("device %s was asked for but CUDA is not available; running on the CPU", device)
            device = "cpu"
        loaded = load_for_inference(path, device=device, dtype=dtype, quantization=quantization)
        self._setup(loaded.model, loaded.tokenizer, loaded.eos_token_id, batch_size, max_length, max_gen_toks)

    @classmethod
    def from_model(
        cls,
        model: Transformer,
        tokenizer: Tokenizer,
        eos_token_id: int,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        autocast: contextlib.AbstractContextManager | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> ColossusLM:
        """Wrap a model already in memory (the trainer's, between steps); nothing is copied.
        `on_batch` is called after every batch scored or generated (the trainer's watchdog)."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._setup(model, tokenizer, eos_token_id, batch_size, max_length, max_gen_toks, autocast, on_batch)
        return lm

    def _setup(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        eos_token_id: int,
        batch_size: int | str,
        max_length: int | str | None,
        max_gen_toks: int | str,
        autocast: contextlib.AbstractContextManager | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.colossus_tokenizer = tokenizer  # not `self.tokenizer`: lm-eval takes that for a Hugging Face one
        self.eos_token_id = eos_token_id
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_length = _positive_int(max_length or model.cfg.max_seq_len, "max_length")
        if self.max_length > model.cfg.max_seq_len:
            raise ColossusError(f"max_length = {self.max_length} is longer than the model's {model.cfg.max_seq_len}")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.autocast = autocast
        self.on_batch = on_batch
        self._engine = None  # built at the first generation request

    # ------------------------------------------------------------------ what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.eos_token_id

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def tokenizer_name(self) -> str:
        return "colossus"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As the API's /tokenize with add_special_tokens=false (what lm-eval's remote tokenizer sends).
        return self.colossus_tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """What --apply_chat_template uses (lm-eval only records it): the model's own template."""
        from colossuslm.data.chat import chat_template_of

        return chat_template_of(self.colossus_tokenizer).description if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from colossuslm.data.chat import chat_template_of

        return chat_template_of(self.colossus_tokenizer).render(chat_history, add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's token logprobs, whether greedy decoding would produce it)."""
        sequences, starts = [], []
        for _, context_enc, continuation_enc in requests:
            if len(continuation_enc) > self.max_length:
                raise ColossusError(
                    f"a continuation of {len(continuation_enc)} tokens does not fit max_length = {self.max_length}"
                )
            context_enc = context_enc or [self.prefix_token_id]
            # As lm-eval's Hugging Face model: keep the last max_length + 1 tokens (the last is only a target).
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            sequences.append(whole)
            starts.append(len(whole) - len(continuation_enc))
        scored = self._score(sequences, starts)
        answers = []
        for (cache_key, _, _), result in zip(requests, scored):
            answer = (result.total, result.all_greedy)
            self.cache_hook.add_partial("loglikelihood", cache_key, answer)
            answers.append(answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods in disjoint windows of max_length, as lm-eval's models do."""
        sequences, starts, owners = [], [], []
        for index, (text,) in enumerate(request.args for request in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, predicted in map(make_disjoint_window, windows):
                sequences.append(context + predicted)
                starts.append(len(context))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, result in zip(owners, self._score(sequences, starts)):
            totals[owner] += result.total
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from colossuslm.serve.sampling import MAX_STOP_STRINGS

        prompts, params, stops = [], [], []
        for request in requests:
            context, gen_kwargs = request.args
            sampling, until, max_new = self._generation_settings(gen_kwargs)
            if max_new >= self.max_length:
                raise ColossusError(
                    f"max_gen_toks = {max_new} leaves no room for a prompt in max_length = {self.max_length}"
                )
            # Left-truncate the prompt so prompt + generation fit, as lm-eval's Hugging Face model does.
            prompt = (self.tok_encode(context) or [self.prefix_token_id])[-(self.max_length - max_new) :]
            sampling.max_tokens = max_new
            sampling.stop = until[:MAX_STOP_STRINGS]  # the engine stops on these; the rest are cut below
            prompts.append(prompt)
            params.append(sampling.validate())
            stops.append(until)
        engine, results = self._generation_engine(), []
        for first in range(0, len(prompts), self.batch_size):
            results += engine.generate(
                prompts[first : first + self.batch_size], params[first : first + self.batch_size]
            )
            if self.on_batch is not None:
                self.on_batch()
        texts = []
        for request, result, until in zip(requests, results, stops):
            text = _cut_at_first(result.text, until)
            self.cache_hook.add_partial("generate_until", request.args, text)
            texts.append(text)
        return texts

    # ------------------------------------------------------------------ internals

    def _score(self, sequences: list[list[int]], starts: list[int]):
        was_training = self.model.training
        self.model.eval()
        try:
            return score_sequences(
                self.model,
                sequences,
                starts,
                batch_size=self.batch_size,
                autocast=self.autocast,
                on_batch=self.on_batch,
            )
        finally:
            self.model.train(was_training)

    def _generation_settings(self, gen_kwargs: dict[str, Any]):
        """lm-eval's generation kwargs -> (SamplingParams, stop strings, tokens to generate).
        A key this model would not honour is an error, not ignored."""
        from colossuslm.serve.sampling import SamplingParams

        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = _positive_int(kwargs.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
        # As Hugging Face generate(): without do_sample decoding is greedy, whatever the temperature.
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0))
        sampling = SamplingParams(
            temperature=temperature if do_sample else 0.0,
            top_p=float(kwargs.pop("top_p", 1.0)),
            top_k=int(kwargs.pop("top_k", 0)),
            seed=kwargs.pop("seed", None),
        )
        if kwargs:
            raise ColossusError(
                f"generation settings {', '.join(sorted(kwargs))} are not supported by the colossus model; "
                f"it takes until, max_gen_toks, do_sample, temperature, top_p, top_k and seed"
            )
        return sampling, [s for s in until if s], max_new

    def _generation_engine(self):
        if self._engine is None:
            from colossuslm.serve.engine import EngineConfig, LLMEngine

            config = EngineConfig(max_num_seqs=self.batch_size, max_model_len=self.max_length)
            self._engine = LLMEngine(self.model, self.colossus_tokenizer, self.eos_token_id, config)
        return self._engine


def _positive_int(value: int | str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ColossusError(
            f"{name} = {value!r} is invalid: give a whole number (batch_size=auto is not supported)"
        ) from None
    if number < 1:
        raise ColossusError(f"{name} = {value!r} is invalid: it must be at least 1")
    return number


def _cut_at_first(text: str, stops: list[str]) -> str:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


# ---------------------------------------------------------------------- running tasks


def task_manager(tasks: list[str], include_paths: list[str | Path] = (), *, search_lm_eval: bool = True):
    """An lm-eval TaskManager that knows `tasks`, looking in the shipped tasks and `include_paths`
    first (fast: lm-eval's own ~15,000 task files take seconds to index) and in lm-eval's own
    tasks only if some name is not there (and `search_lm_eval`). ColossusError naming what is unknown."""
    from lm_eval.tasks import TaskManager

    paths = [SHIPPED_TASKS]
    for path in include_paths:
        if not Path(path).is_dir():
            raise ColossusError(
                f"task directory {path} does not exist; --include-path takes a directory of task YAML files"
            )
        paths.append(Path(path))
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if search_lm_eval and any(name not in manager.all_tasks for name in tasks):
        manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=True)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise ColossusError(
            f"unknown lm-eval task {', '.join(unknown)}: not in {'lm-eval, ' if search_lm_eval else ''}the shipped tasks "
            f"({', '.join(sorted(p.stem for p in SHIPPED_TASKS.glob('*.yaml')))}) or in "
            f"{', '.join(map(str, include_paths)) or 'any --include-path'}; pass --include-path DIR for your own YAML"
        )
    return manager


def run_tasks(
    lm: ColossusLM,
    tasks: list[str],
    *,
    include_paths: list[str | Path] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
    manager=None,
    reseed: bool = True,
) -> dict[str, Any]:
    """lm-eval's results dict for `tasks` (`results`, and `samples` with `log_samples`).

    `manager`: a `task_manager(...)` built earlier (the trainer checks its tasks before step 1).
    `reseed` False keeps lm-eval from reseeding Python's, NumPy's and torch's global generators,
    which a training run in progress depends on; few-shot sampling has its own seed either way.
    """
    import lm_eval

    if not tasks:
        raise ColossusError("no tasks given; name lm-eval tasks, e.g. --tasks colossus_mc,colossus_gen")
    seeds = {} if reseed else {"random_seed": None, "numpy_random_seed": None, "torch_random_seed": None}
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager or task_manager(tasks, include_paths),
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        **seeds,
    )


@contextlib.contextmanager
def quiet_lm_eval_logs(level: int = logging.ERROR):
    """lm-eval logs its progress (and, for every custom dataset, advice about --metadata) at INFO
    and WARNING; inside a training run's log those lines bury the figures."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm-eval's results: numbers only, "acc,none" named "acc" and a
    metric under a named filter "metric_filter"; standard errors kept as "acc_stderr"."""
    table: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        row = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            if math.isfinite(value):
                row[name] = float(value)
        table[task] = row
    return table


__all__ = ["SHIPPED_TASKS", "ColossusLM", "quiet_lm_eval_logs", "run_tasks", "task_manager", "task_metrics"]

"""lm-evaluation-harness adapter: the `neox_jax` model type and the local (offline) task set.

Importing this module registers `neox_jax` with lm-eval (`--model neox_jax --model_args hf=DIR` or
`checkpoint=DIR`). Scoring follows the harness's own `hf` backend token for token: the context/continuation
split of `TemplateLM._encode_pair`, the end-of-document token as the context of an empty one, left truncation
to `max_length + 1` tokens, log-softmax over the model's whole (padded) vocabulary, and the rolling windows
of `lm_eval.utils.get_rolling_token_windows`. The work is laid out differently (`neox_jax.scoring`): requests
that share a context are one prefix tree (the context's keys and values computed once for all continuations),
packed several to a row of a few fixed lengths without padding, and the output head runs only at positions
that predict a continuation token. `generate_until` runs batches of length-sorted prompts, left-padded to
fine buckets, through the on-device decode loop (`Generator`), checking stop strings between chunks of tokens.

The task definitions for LAMBADA (OpenAI), PIQA, ARC-Easy/Challenge, WinoGrande and HellaSwag live in
`configs/eval_tasks/` and read local files from `$NEOX_JAX_EVAL_DATA` (default: the full sets bundled in
`neox_jax/assets/eval/`). Any other task name is looked up in lm-eval's own registry, whose tasks download their
data from the Hugging Face hub.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import lm_eval
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from neox_jax import config as C
from neox_jax import generate as gen_lib
from neox_jax import scoring, sharding, weights
from neox_jax.data import EVAL_DATA_ENV as DATA_ENV
from neox_jax.data import tokenizer as tok_lib

TASK_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs" / "eval_tasks"
LOCAL_TASKS = ("lambada_openai", "piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

# lm-eval's bootstrap stderrs (perplexity, ...) run in a fork()ed multiprocessing Pool unless DISABLE_MULTIPROC
# is set; forking a process where JAX's threads run can deadlock (and JAX says so on stderr). Its one-process path
# draws the same resamples (random.Random(i) per chunk of 1000), so the figures do not change.
os.environ.setdefault("DISABLE_MULTIPROC", "1")


class _NoMetadataAdvice(logging.Filter):
    """Drop lm-eval's warning, logged for every task with a `custom_dataset`, that custom kwargs can be passed with
    --metadata: our local tasks' loaders take none, so it is advice about nothing, six times a run."""

    def filter(self, record):
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_NoMetadataAdvice())


@register_model("neox_jax")
class NeoXLM(TemplateLM):
    """model_args: `hf=DIR` or `checkpoint=DIR` (params dir or training workdir), `batch_size` (rows of
    `row_length` tokens per compiled scoring call, prompts per generation batch), `row_length` (default 256),
    `max_length` (default: max_position_embeddings), `dtype` (float32 | bfloat16 | float16),
    `tokenizer` (path; default the one the model was made with: the HF dir's tokenizer.json, the run's
    data.tokenizer of a params dir or workdir, else the 20B tokenizer), `max_gen_toks`,
    `tensor_parallel` (mesh: all devices, weights split tensor_parallel ways, batch rows over the rest).
    From Python, `model_config=`, `params=` (with `hf` or `checkpoint` naming their source, for the tokenizer) and a
    `neox_jax.data.tokenizer` object may be passed instead, and `stacked=True` scores with the params' stacked
    layers as they are (no per-layer copy)."""

    def __init__(self, hf: str | None = None, checkpoint: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, dtype: str | None = None, tokenizer: Any = None,
                 max_gen_toks: int = 256, tensor_parallel: int = 1, row_length: int = scoring.ROW_LENGTH,
                 model_config: Any = None, params: Any = None, mesh: Any = None, stacked: bool = False, **unused):
        super().__init__()
        if model_config is None:
            model_config, params = weights.load_model(hf=hf, checkpoint=checkpoint, dtype=dtype)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = weights.tokenizer_for(model_config, tokenizer, hf=hf, checkpoint=checkpoint)
        self.mesh = sharding.inference_mesh(int(tensor_parallel)) if mesh is None else mesh
        self._generator = gen_lib.Generator(model_config, params, vocab_limit=tokenizer.vocab_size, mesh=self.mesh,
                                            stacked=stacked)
        self.m, self.params, self.tokenizer = model_config, self._generator.params, tokenizer
        if str(batch_size).startswith("auto"):
            batch_size = 8
        self._batch_size = self._generator.rows(int(batch_size))
        self._max_length = int(max_length or model_config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self._eot = tokenizer.eod_id
        self.scorer = scoring.Scorer(model_config, self.params, max_length=self._max_length, rows=self._batch_size,
                                     row_length=int(row_length), split=sharding.batch_multiple(self.mesh),
                                     put=lambda tree: sharding.put_batch(tree, self.mesh),
                                     context=lambda: gen_lib.tracing_context(model_config, self.mesh))

    def set_params(self, params) -> None:
        """Score with other weights of the same shapes (another checkpoint of the run): nothing is compiled again."""
        self._generator.set_params(params)
        self.params = self.scorer.params = self._generator.params

    def release(self) -> None:
        """Drop the weights (until `set_params`), keeping what is compiled."""
        self.params = self.scorer.params = self._generator.params = None

    # ---- the harness's interface --------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return "neox_jax"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t != self._eot])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        return self.score_pairs(pairs, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self._eot,
                                                         max_seq_len=self.max_length, context_len=1)
            for window in map(lm_utils.make_disjoint_window, windows):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score_pairs(pairs, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tokenizer.decode([self._eot])
        results: list[str] = [""] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_new = int(kwargs["max_gen_toks"])
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} must be smaller than max_length={self.max_length}")
            sampling = gen_lib.Sampling(
                max_new_tokens=max_new, temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                seed=int(kwargs.get("seed") or 0), stop_token_ids=(self._eot,), stop_strings=tuple(u for u in until if u))
            indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in indices]
            for start in range(0, len(prompts), self.batch_size):
                done = self._generator.generate(prompts[start:start + self.batch_size], sampling, decode=self.tok_decode,
                                                batch_size=self.batch_size)
                for i, completion in zip(indices[start:start + self.batch_size], done):
                    text = postprocess_generated_text(completion.text, until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                pbar.update(len(done))
        pbar.close()
        return results

    # ---- scoring ------------------------------------------------------------------------------------------
    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = False):
        """(log p(continuation | context), continuation is greedy) for each (context ids, continuation ids)."""
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="Running loglikelihood requests") as pbar:
            return self.scorer.score(pairs, progress=pbar.update)


# ---- running the local tasks --------------------------------------------------------------------------------

def task_manager(data_dir: str | None = None, include_builtin: bool = False):
    """A TaskManager over configs/eval_tasks (plus the harness's own tasks if asked; ours win on name clashes)."""
    if data_dir is not None:
        os.environ[DATA_ENV] = os.path.abspath(data_dir)
    return _task_manager(include_builtin)


@functools.lru_cache(maxsize=2)
def _task_manager(include_builtin: bool):
    # Indexing the harness's ~15k task files takes seconds: done once. The tasks read DATA_ENV when they load.
    return TaskManager(include_path=str(TASK_DIR), include_defaults=include_builtin)


def evaluate(lm, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: int | float | None = None,
             data_dir: str | None = None, include_builtin: bool = False, bootstrap_iters: int = 0,
             seed: int = 1234, log_samples: bool = False) -> dict:
    """Run the harness on `tasks` with model `lm`; returns lm-eval's results dict. A task that is not one of
    LOCAL_TASKS comes from lm-eval's own registry (its data from the Hugging Face hub)."""
    manager = check_tasks(tasks, data_dir, include_builtin)
    hub = [t for t in tasks if t not in LOCAL_TASKS]
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                       task_manager=manager, bootstrap_iters=bootstrap_iters, random_seed=seed,
                                       numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                       log_samples=log_samples)
    except ConnectionError as e:  # what `datasets` raises for a hub it cannot reach (or may not, offline mode)
        if not hub:
            raise
        raise ValueError(f"lm-eval task(s) {', '.join(hub)} download their data from the Hugging Face hub, which "
                         f"is not reachable ({str(e).splitlines()[0]}); run where it is (with HF_HUB_OFFLINE and "
                         f"HF_DATASETS_OFFLINE unset), or use the offline tasks {', '.join(LOCAL_TASKS)}") from None


def check_tasks(tasks: Sequence[str], data_dir: str | None = None, include_builtin: bool = False):
    """The TaskManager that knows `tasks`; a ValueError naming the unknown ones (and near names) otherwise."""
    hub = check_offline(tasks)
    manager = task_manager(data_dir, include_builtin or bool(hub))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        near = {m for t in unknown for m in difflib.get_close_matches(t, LOCAL_TASKS, n=1)}
        raise ValueError(f"unknown task(s) {', '.join(unknown)}" + (f" (did you mean {', '.join(sorted(near))}?)"
                         if near else "") + f"; available: {', '.join(LOCAL_TASKS)} (task files in {TASK_DIR}) and "
                         "lm-eval's own tasks")
    return manager


def check_offline(tasks: Sequence[str]) -> list[str]:
    """The tasks that are not ours (lm-eval's, their data on the Hugging Face hub); refused at once when the hub
    is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), before a model is loaded or lm-eval tries to download."""
    hub = [t for t in tasks if t not in LOCAL_TASKS]
    offline = [v for v in OFFLINE_ENV if os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")]
    if hub and offline:
        near = {m for t in hub for m in difflib.get_close_matches(t, LOCAL_TASKS, n=1)}
        raise ValueError(f"task(s) {', '.join(hub)} are not offline tasks" + (f" (did you mean {', '.join(sorted(near))}?)"
                         if near else "") + f"; lm-eval's own tasks download their data from the Hugging Face hub "
                         f"and {offline[0]}=1 is set: unset {' and '.join(OFFLINE_ENV)} where the hub is reachable, "
                         f"or use the offline tasks {', '.join(LOCAL_TASKS)}")
    return hub


def results_table(results: dict) -> str:
    return lm_utils.make_table(results)


def scores(results: dict) -> dict[str, float]:
    """lm-eval's results as flat metrics {"piqa/acc": ..., "piqa/acc_stderr": ...} (numeric ones only)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool):  # "metric,filter"
                out[f"{task}/{key.partition(',')[0]}"] = float(value)
    return out


class LoopEvaluator:
    """train.eval_tasks scored inside the training loop on the run's own devices: `scripts/train.py` builds one
    and hands it to `trainer.train(task_eval=...)`. Called with (model config, params, mesh): the first call builds
    the lm-eval model on that mesh (an inference mesh of the same devices when it pipelines or splits sequences),
    later ones swap the new params in, so the scoring compiles once for the run; the per-layer copy of the weights
    the scoring reads is dropped after each evaluation. Returns `scores(...)`."""

    def __init__(self, config):
        t = config.train
        self.tasks = [x for x in t.eval_tasks.split(",") if x]
        self.limit = None if not t.eval_tasks_limit else (
            int(t.eval_tasks_limit) if t.eval_tasks_limit >= 1 else float(t.eval_tasks_limit))
        try:
            check_tasks(self.tasks)
        except ValueError as e:
            raise C.ConfigError(f"config field train.eval_tasks: {e}") from None
        self.tokenizer = tok_lib.load_tokenizer(config.data.tokenizer or None)
        self.lm = None

    def __call__(self, m, params, mesh) -> dict[str, float]:
        if self.lm is None:
            if any(a in mesh.axis_names for a in (sharding.STAGE_AXIS, sharding.CONTEXT_AXIS)):
                mesh = sharding.mesh_of({"data": -1, "fsdp": 1, "tensor": int(mesh.shape.get("tensor", 1))},
                                        list(mesh.devices.flat))
            self.lm = NeoXLM(model_config=m, params=params, mesh=mesh, tokenizer=self.tokenizer)
        else:
            self.lm.set_params(params)
        try:
            return scores(evaluate(self.lm, self.tasks, limit=self.limit, bootstrap_iters=100))
        finally:
            self.lm.release()  # training goes on with (and donates) the params: hold no copy between evaluations

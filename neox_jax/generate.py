"""Text generation with a KV cache: batched prefill, one compiled decode step, sampling.

Prompts of different lengths are left-padded to a bucket (two lengths per power of two: 64, 96, 128, ...) so
they share cache slots; the pads are masked out of attention and the rotary positions count only real tokens
(`cumsum(mask) - 1`), so every row sees exactly what it would see alone. The cache is an explicit pytree
(`model.init_cache`) threaded through jitted pure functions, `prefill` and `decode_step`, compiled once per
(batch, cache length). Without streaming the picks run on the device: all of them in one loop, or, with stop
strings to check on the host, DECODE_CHUNK at a time (stopping at the first chunk after every row has stopped);
with streaming a Python loop around the step checks stop conditions and streams text token by token.

A generator starts from a model and its weights (`neox_jax.weights.load_model`), a tokenizer
(`neox_jax.data.tokenizer.load_tokenizer`) and prompts (`read_prompts`, below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax import errors
from neox_jax import model as model_lib
from neox_jax import sharding


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        for field, ok, expected in (
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
        ):
            if not ok:
                raise errors.InputError(
                    f"sampling option {field} must be {expected}, got {getattr(self, field)!r}")


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # generated ids, without the stop token
    text: str | None  # decoded and cut before a stop string (None without a tokenizer)
    finish_reason: str  # "stop_token", "stop_string" or "length"


def bucket_length(n: int, minimum: int = 16, maximum: int | None = None, per_octave: int = 1) -> int:
    """The smallest of `per_octave` evenly spaced lengths per power of two that is >= n (per_octave 1: the next
    power of two; 2: ..., 64, 96, 128, 192, ...), at least `minimum`, at most `maximum` when that still holds n."""
    b = max(minimum, 1 << max(n - 1, 0).bit_length())
    if per_octave > 1 and b > minimum:
        step = max(b // 2 // per_octave, 1)
        b = max(minimum, -(-n // step) * step)
    return min(b, maximum) if maximum is not None and maximum >= n else b


def left_pad(prompts: Sequence[Sequence[int]], length: int, batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask [batch, length], each prompt right-aligned; extra rows (batch > len(prompts)) are empty."""
    batch = batch or len(prompts)
    ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, -len(p):] = p
            mask[i, -len(p):] = True
    return ids, mask


# ---- the compiled pieces ------------------------------------------------------------------------------------

def prefill(m, params, ids, mask, cache):
    """Run the left-padded prompts through the model, filling the cache.
    Returns (logits of each row's last token [B, V], cache, rotary position of that token [B])."""
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
    net = model_lib.for_params(m, params)
    x, cache = net.apply({"params": params}, ids, positions=positions, cache=cache, input_mask=mask, method="hidden")
    return model_lib.head_logits(x[:, -1], params["embed_out"]), cache, positions[:, -1]


def decode_step(m, params, tokens, positions, cache):
    """One token per row at rotary `positions` [B] -> (logits [B, V], cache)."""
    ones = jnp.ones((tokens.shape[0], 1), bool)
    net = model_lib.for_params(m, params)
    logits, cache = net.apply({"params": params}, tokens[:, None], positions=positions[:, None], cache=cache,
                              input_mask=ones)
    return logits[:, 0], cache


def pick_tokens(logits, key, *, vocab_limit: int, temperature, top_k: int, top_p: float, greedy: bool):
    """Next ids [B] from logits [B, V]; ids >= vocab_limit (embedding padding) are never chosen."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits.astype(jnp.float32), -jnp.inf)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0 or top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        threshold = jnp.full(logits.shape[:1], -jnp.inf)
        if top_k > 0:
            threshold = jnp.maximum(threshold, ordered[:, min(top_k, logits.shape[-1]) - 1])
        if top_p < 1.0:
            probs = jax.nn.softmax(ordered, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token; the top one always stays
            kept = jnp.where(before < top_p, ordered, jnp.inf)
            threshold = jnp.maximum(threshold, jnp.min(kept, axis=-1))
        logits = jnp.where(logits >= threshold[:, None], logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _pick_and_feed(m, params, key, start, **options):
    """The loop body of the on-device decoders: pick number start + i, feed it back through the model."""
    pick = functools.partial(pick_tokens, **options)

    def body(i, carry):
        logits, positions, cache, out = carry
        tokens = pick(logits, jax.random.fold_in(key, start + i))
        logits, cache = decode_step(m, params, tokens, positions + 1, cache)
        return logits, positions + 1, cache, out.at[:, i].set(tokens)

    return pick, body


def decode_loop(m, params, logits, positions, cache, key, *, steps: int, vocab_limit: int, temperature, top_k: int,
                top_p: float, greedy: bool):
    """All `steps` picks on the device (`lax.fori_loop`): no host round trip per token. Same keys, so the same
    tokens, as the streaming loop. Returns ids [B, steps]."""
    pick, body = _pick_and_feed(m, params, key, 0, vocab_limit=vocab_limit, temperature=temperature, top_k=top_k,
                                top_p=top_p, greedy=greedy)
    out = jnp.zeros((logits.shape[0], steps), jnp.int32)
    logits, _, _, out = jax.lax.fori_loop(0, steps - 1, body, (logits, positions, cache, out))
    return out.at[:, steps - 1].set(pick(logits, jax.random.fold_in(key, steps - 1)))


def decode_chunk(m, params, logits, positions, cache, key, start, *, steps: int, vocab_limit: int, temperature,
                 top_k: int, top_p: float, greedy: bool):
    """Picks start .. start + steps - 1 on the device, each fed back (the cache needs `steps` free slots).
    Returns (ids [B, steps], logits, positions, cache) to continue from: with stop strings the host checks the
    text between chunks, one round trip per DECODE_CHUNK tokens instead of per token."""
    _, body = _pick_and_feed(m, params, key, start, vocab_limit=vocab_limit, temperature=temperature, top_k=top_k,
                             top_p=top_p, greedy=greedy)
    out = jnp.zeros((logits.shape[0], steps), jnp.int32)
    logits, positions, cache, out = jax.lax.fori_loop(0, steps, body, (logits, positions, cache, out))
    return out, logits, positions, cache


PROMPT_BUCKETS_PER_OCTAVE = 2  # prompt lengths 16, 24, 32, 48, 64, 96, ...: prefill pads at most a third
DECODE_CHUNK = 16  # picks per on-device loop between the host's stop-string checks


class Generator:
    """Holds the jitted prefill/step for one model; `generate` runs the loop."""

    def __init__(self, m, params, vocab_limit: int | None = None, mesh=None, stacked: bool = False):
        """With a `mesh` (see `sharding.inference_mesh`) params are placed by the logical rules (tensor-parallel
        weights), and batch rows and the cache are split over the data axes.

        By default the generator keeps its own copy of the weights with one buffer per layer (and a per-layer
        cache) and decodes through an unrolled layer loop: 1.35-1.7x the decode speed of the layer scan on CPU (see
        README, Benchmarks). Drop other references to `params` to free the stacked copy; `stacked=True` uses
        `params` as they are."""
        self.m, self.mesh, self.stacked = m, mesh, stacked
        self.set_params(params)
        self.vocab_limit = vocab_limit or m.vocab_size
        self._prefill = jax.jit(functools.partial(prefill, m), donate_argnums=(3,))
        self._step = jax.jit(functools.partial(decode_step, m), donate_argnums=(3,))
        self._pick = jax.jit(pick_tokens, static_argnames=("vocab_limit", "top_k", "top_p", "greedy"))
        # The loop returns only tokens, so donating the cache would free nothing (JAX warns it is unusable).
        self._loop = jax.jit(functools.partial(decode_loop, m),
                             static_argnames=("steps", "vocab_limit", "top_k", "top_p", "greedy"))
        self._chunk = jax.jit(functools.partial(decode_chunk, m), donate_argnums=(3,),
                              static_argnames=("steps", "vocab_limit", "top_k", "top_p", "greedy"))

    def set_params(self, params) -> None:
        """Hold `params` (placed on the mesh, one buffer per layer unless stacked); other weights of the same shapes
        (another checkpoint of a run) reuse every compiled function."""
        self.params = params if self.mesh is None else sharding.place_params(params, model_lib.param_shapes(self.m),
                                                                             self.mesh)
        if not self.stacked:
            self.params = model_lib.unstack_layers(self.params)

    def init_cache(self, batch: int, max_len: int) -> dict:
        return model_lib.init_cache(self.m, batch, max_len, stacked=self.stacked)

    def rows(self, batch_size: int) -> int:
        """`batch_size` rounded up to a multiple of the data-parallel split."""
        return _round_up(batch_size, sharding.batch_multiple(self.mesh))

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
                 decode: Callable[[list[int]], str] | None = None,
                 on_text: Callable[[int, str], None] | None = None, batch_size: int | None = None) -> list[Completion]:
        """Complete every prompt (lists of ids). `decode` (ids -> text) enables stop strings and `on_text(row,
        new_text)` streaming. Batches of `batch_size` rows (default: all at once); results in prompt order."""
        if not prompts:
            return []
        self.check(prompts, sampling, decode)
        batch_size = self.rows(batch_size or len(prompts))
        out: list[Completion] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            stream = None if on_text is None else (lambda row, text, s=start: on_text(s + row, text))
            out += self._generate_batch(chunk, sampling, decode, stream, batch_size)
        return out

    def check(self, prompts: Sequence[Sequence[int]], sampling: Sampling, decode=None) -> None:
        """Refuse, naming the prompt, what `generate` cannot do: an empty prompt, one longer than the context."""
        if any(len(p) == 0 for p in prompts):
            raise errors.InputError("generate: every prompt needs at least one token")
        if sampling.stop_strings and decode is None:
            raise errors.InputError("generate: stop_strings need a `decode` function (a tokenizer)")
        longest = int(np.argmax([len(p) for p in prompts]))
        if len(prompts[longest]) + sampling.max_new_tokens > self.m.max_position_embeddings:
            raise errors.InputError(
                f"generate: prompt {longest} has {len(prompts[longest])} tokens, and with max_new_tokens="
                f"{sampling.max_new_tokens} that exceeds the model's context of max_position_embeddings="
                f"{self.m.max_position_embeddings} tokens; shorten the prompt or lower max_new_tokens")

    def _generate_batch(self, prompts, sampling, decode, on_text, batch_size):
        n, greedy, new = len(prompts), sampling.temperature == 0.0, sampling.max_new_tokens
        length = bucket_length(max(len(p) for p in prompts), per_octave=PROMPT_BUCKETS_PER_OCTAVE)
        ids, mask = left_pad(prompts, length, batch_size)
        mask[n:, -1] = True  # filler rows attend to one token so their softmax stays finite
        chunked = on_text is None and bool(sampling.stop_strings)
        cache = self.init_cache(batch_size, length + (_round_up(new, DECODE_CHUNK) if chunked else new))
        ids, mask, cache = sharding.put_batch((ids, mask, cache), self.mesh)
        with tracing_context(self.m, self.mesh):
            logits, cache, positions = self._prefill(self.params, ids, mask, cache)
        root = jax.random.PRNGKey(sampling.seed)
        options = dict(vocab_limit=self.vocab_limit, temperature=max(sampling.temperature, 1e-6),
                       top_k=sampling.top_k, top_p=sampling.top_p, greedy=greedy)
        pick = functools.partial(self._pick, **options)
        rows = [_Row(sampling, decode, on_text, i) for i in range(n)]
        if on_text is None and not sampling.stop_strings:  # nothing to do per token on the host: loop on device
            with tracing_context(self.m, self.mesh):
                out = self._loop(self.params, logits, positions, cache, root, steps=sampling.max_new_tokens,
                                 **options)
            for row, tokens in zip(rows, np.asarray(out)):
                for token in tokens:
                    row.add(int(token))
            return [r.result() for r in rows]
        if chunked:  # stop strings, nothing streamed: chunks of picks on the device, stop checks in between
            for start in range(0, new, DECODE_CHUNK):
                with tracing_context(self.m, self.mesh):
                    out, logits, positions, cache = self._chunk(self.params, logits, positions, cache, root,
                                                                jnp.int32(start), steps=DECODE_CHUNK, **options)
                for row, tokens in zip(rows, np.asarray(out)[:, :new - start]):
                    for token in tokens:
                        row.add(int(token))
                if all(r.finish_reason for r in rows):
                    break
            return [r.result() for r in rows]
        for step in range(sampling.max_new_tokens):
            tokens = pick(logits, jax.random.fold_in(root, step))
            host_tokens = np.asarray(tokens)
            for row, token in zip(rows, host_tokens):
                row.add(int(token))
            if all(r.finish_reason for r in rows) or step == sampling.max_new_tokens - 1:
                break
            positions = positions + 1
            with tracing_context(self.m, self.mesh):
                logits, cache = self._step(self.params, tokens, positions, cache)
        return [r.result() for r in rows]


class _Row:
    """Stop checks and streaming for one prompt."""

    def __init__(self, sampling: Sampling, decode, on_text, index: int):
        self.sampling, self.decode, self.on_text, self.index = sampling, decode, on_text, index
        self.tokens: list[int] = []
        self.text = "" if decode else None
        self.finish_reason = ""

    def add(self, token: int):
        if self.finish_reason:
            return
        if token in self.sampling.stop_token_ids:
            self.finish_reason = "stop_token"
            return
        self.tokens.append(token)
        if self.decode is None:
            if len(self.tokens) == self.sampling.max_new_tokens:
                self.finish_reason = "length"
            return
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.sampling.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            text, self.finish_reason = text[:cut], "stop_string"
        elif len(self.tokens) == self.sampling.max_new_tokens:
            self.finish_reason = "length"
        # hold back a trailing partial UTF-8 character (and a possible start of a stop string) from the stream
        ready = text if self.finish_reason else _stable_prefix(text, self.sampling.stop_strings)
        if self.on_text and len(ready) > len(self.text):
            self.on_text(self.index, ready[len(self.text):])
        self.text = ready if not self.finish_reason else text

    def result(self) -> Completion:
        if self.decode is not None and not self.finish_reason:
            self.text = self.decode(self.tokens)
        return Completion(self.tokens, self.text, self.finish_reason or "length")


def _stable_prefix(text: str, stops: Sequence[str]) -> str:
    text = text.rstrip("\ufffd")
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold]


# ---- prompts ----------------------------------------------------------------------------------------------

def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file ({"prompt": ...} per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} not found")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                prompts.append(line.rstrip("\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise errors.InputError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise errors.InputError(f'{path}, line {number}: expected an object with a string "prompt" field')
            prompts.append(record["prompt"])
    if not prompts:
        raise errors.InputError(f"prompt file {path} holds no prompts")
    return prompts


@contextlib.contextmanager
def tracing_context(m, mesh):
    """What a step is traced under: the model's logical activation constraints (with a mesh), and full-precision
    matmuls for float32 models (GPUs otherwise use TF32, which moves log-likelihoods by more than 1e-3)."""
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(sharding.activation_rules(mesh, zero_stage=0))
        if jnp.dtype(m.dtype) == jnp.float32:
            stack.enter_context(jax.default_matmul_precision("highest"))
        yield


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple

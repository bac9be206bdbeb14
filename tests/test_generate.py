"""KV-cache generation against references: full recomputation of the logits, HF `generate`, single-device runs."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from neox_jax import config as cfg
from neox_jax import convert
from neox_jax import generate as G
from neox_jax import model as model_lib
from neox_jax import sharding, weights
from neox_jax.data import default_paths
from tiny_configs import tiny_model

VOCAB, PADDED = 500, 512  # ids 500..511 are embedding padding: never to be generated


@pytest.fixture(scope="module")
def tiny():
    m = tiny_model(vocab_size=VOCAB, padded_vocab_size=PADDED, max_position_embeddings=128)
    return m, random_params(m, 0)


@pytest.fixture(scope="module")
def gen(tiny):
    """One per-layer generator for the tests that only call it: its jitted prefill, loops and picks compile once
    per shape (NEW new tokens) and serve them all."""
    return G.Generator(*tiny)


NEW = 10  # max_new_tokens of the tests sharing `gen`: one cache length, so one compiled prefill and step


def random_params(m, seed):
    return jax.jit(lambda key: model_lib.init_params(m, key))(jax.random.PRNGKey(seed))


PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 300]]


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [True, False])
def test_kv_cache_decode_equals_full_recomputation(tiny, stacked):
    """Left-padded batch: each step's logits equal a fresh forward over that row's whole (unpadded) sequence.
    (The model is causal, so one forward over the final sequence gives every step's recomputed logits.)
    Decoding from stacked params (the layer scan) and from per-layer params and caches alike."""
    m, full_params = tiny
    params = full_params if stacked else model_lib.unstack_layers(full_params)
    length, steps = 16, 6
    ids, mask = G.left_pad(PROMPTS, length)
    cache = model_lib.init_cache(m, len(PROMPTS), length + steps, stacked=stacked)
    logits, cache, positions = jax.jit(functools.partial(G.prefill, m))(params, ids, mask, cache)
    step_fn = jax.jit(functools.partial(G.decode_step, m))
    seqs, step_logits = [list(p) for p in PROMPTS], [logits]
    for _ in range(steps):
        tokens = jnp.argmax(logits[:, :VOCAB], axis=-1).astype(jnp.int32)
        for seq, t in zip(seqs, np.asarray(tokens)):
            seq.append(int(t))
        positions = positions + 1
        logits, cache = step_fn(params, tokens, positions, cache)
        step_logits.append(logits)
    right_padded = np.zeros((len(seqs), max(map(len, seqs))), np.int32)  # causal: trailing pads change nothing
    for row, seq in enumerate(seqs):
        right_padded[row, :len(seq)] = seq
    full = jax.jit(model_lib.GPTNeoX(m).apply)({"params": full_params}, right_padded)
    for row, prompt in enumerate(PROMPTS):
        for step, logits in enumerate(step_logits[:-1]):
            np.testing.assert_allclose(np.asarray(logits[row]), np.asarray(full[row, len(prompt) - 1 + step]),
                                       atol=1e-4, rtol=0, err_msg=f"row {row}, step {step}")


@pytest.mark.slow
def test_greedy_equals_hf_generate(name="tiny-gpt-neox-parallel"):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = FIXTURES / "hf_reference" / name
    config, params = convert.load_hf(path)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[3, 14, 15, 92, 65], [1, 2], [100, 200, 300, 400, 7, 8, 9, 10, 11]]
    new = 20
    ours = G.Generator(config.model, params).generate(prompts, G.Sampling(max_new_tokens=new))
    for prompt, completion in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        assert completion.tokens == out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_sampling_is_seeded_and_respects_filters(gen):
    sample = lambda **kw: [c.tokens for c in gen.generate(PROMPTS, G.Sampling(max_new_tokens=NEW, temperature=1.5,
                                                                             **kw))]  # noqa: E731
    first = sample(seed=3)
    assert sample(seed=3) == first
    assert sample(seed=4) != first
    assert all(t < VOCAB for row in first + sample(seed=5, top_p=0.5) for t in row)
    greedy = [c.tokens for c in gen.generate(PROMPTS, G.Sampling(max_new_tokens=NEW))]
    assert sample(seed=9, top_k=1) == greedy
    assert sample(seed=9, top_p=1e-6) == greedy


@pytest.mark.slow
def test_device_loop_equals_streaming_loop(gen):
    """Without streaming or stop strings the picks run in one on-device loop; tokens must not change."""
    for sampling in (G.Sampling(max_new_tokens=NEW), G.Sampling(max_new_tokens=NEW, temperature=1.2, top_k=20, seed=1)):
        on_device = [c.tokens for c in gen.generate(PROMPTS, sampling)]
        streamed = [c.tokens for c in gen.generate(PROMPTS, sampling, on_text=lambda row, text: None,
                                                   decode=lambda ids: " ".join(map(str, ids)))]
        assert on_device == streamed


def test_device_loop_warns_of_nothing(tiny):
    """The on-device loop returns only tokens: no cache donation for JAX to call unusable. (A generator of its
    own: JAX warns when it compiles.) The fast tier's generate test too: each greedy pick is the argmax over the
    real vocabulary of one forward over the final sequence (causal: it holds every step's logits)."""
    import warnings

    m, params = tiny
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = G.Generator(m, params).generate(PROMPTS, G.Sampling(max_new_tokens=4))
    assert not [w for w in caught if "donated" in str(w.message)]
    seqs = np.zeros((len(PROMPTS), 16), np.int32)  # right-padded: trailing pads change nothing before them
    for row, (prompt, c) in enumerate(zip(PROMPTS, done)):
        seqs[row, :len(prompt) + 4] = list(prompt) + c.tokens
    logits = np.asarray(jax.jit(model_lib.GPTNeoX(m).apply)({"params": params}, seqs))
    for row, (prompt, c) in enumerate(zip(PROMPTS, done)):
        assert c.tokens == logits[row, len(prompt) - 1:len(prompt) + 3, :VOCAB].argmax(-1).tolist()


@pytest.mark.slow
def test_per_layer_generator_equals_stacked(tiny, gen):
    """The default generator (its own per-layer weight copy, unrolled layer loop) picks the tokens the layer
    scan over the stacked training-layout params picks, greedy and sampled."""
    stacked, per_layer = G.Generator(*tiny, stacked=True), gen
    assert "layers" in stacked.params and "layers_1" in per_layer.params
    for sampling in (G.Sampling(max_new_tokens=NEW), G.Sampling(max_new_tokens=NEW, temperature=0.8, seed=3)):
        assert [c.tokens for c in per_layer.generate(PROMPTS, sampling)] == \
            [c.tokens for c in stacked.generate(PROMPTS, sampling)]


@pytest.mark.slow
def test_pick_tokens_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05, 0.9]]))  # id 4 is padding (vocab_limit 4)
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    pick = lambda **kw: set(np.asarray(jax.jit(jax.vmap(functools.partial(
        G.pick_tokens, logits, vocab_limit=4, temperature=1.0, greedy=False, **kw)))(keys))[:, 0].tolist())
    assert pick(top_k=0, top_p=1.0) == {0, 1, 2, 3}
    assert pick(top_k=2, top_p=1.0) == {0, 1}
    assert pick(top_k=0, top_p=0.7) == {0, 1}  # 0.5 alone < 0.7; 0.5 + 0.3 covers it
    assert pick(top_k=0, top_p=0.81) == {0, 1, 2}
    assert int(G.pick_tokens(logits, keys[0], vocab_limit=4, temperature=1.0, top_k=0, top_p=1.0, greedy=True)[0]) == 0


@pytest.mark.slow
def test_stop_tokens_stop_strings_and_streaming(gen):
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)
    free = gen.generate(PROMPTS, G.Sampling(max_new_tokens=NEW), decode=decode)
    assert [c.finish_reason for c in free] == ["length", "length"]
    stop_id = free[0].tokens[3]
    by_token = gen.generate(PROMPTS[:1], G.Sampling(max_new_tokens=NEW, stop_token_ids=(stop_id,)))[0]
    assert by_token.finish_reason == "stop_token"
    assert by_token.tokens == free[0].tokens[:free[0].tokens.index(stop_id)]
    stop = free[1].text[4:6]
    streamed = {}
    by_string = gen.generate(PROMPTS, G.Sampling(max_new_tokens=NEW, stop_strings=(stop,)), decode=decode,
                             on_text=lambda row, text: streamed.__setitem__(row, streamed.get(row, "") + text))
    assert by_string[1].finish_reason == "stop_string"
    assert by_string[1].text == free[1].text[:free[1].text.index(stop)]
    assert [streamed.get(i, "") for i in range(2)] == [c.text for c in by_string]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gen.generate(PROMPTS, G.Sampling(max_new_tokens=200))
    with pytest.raises(ValueError, match="top_p"):
        G.Sampling(top_p=0.0)


@pytest.mark.slow
def test_stop_strings_on_device_in_chunks_equal_streaming(gen):
    """Stop strings without streaming: DECODE_CHUNK picks at a time on the device, checked between chunks; the
    same tokens, texts and finish reasons as the token-by-token loop, greedy and sampled, stopping past the
    first chunk and at a max_new_tokens that is no multiple of the chunk."""
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    for sampling in (G.Sampling(max_new_tokens=37), G.Sampling(max_new_tokens=37, temperature=1.0, seed=2)):
        free = gen.generate(PROMPTS, sampling, decode=decode)
        stop = free[1].text[G.DECODE_CHUNK + 3:G.DECODE_CHUNK + 6]
        stopping = dataclasses.replace(sampling, stop_strings=(stop,))
        chunked = gen.generate(PROMPTS, stopping, decode=decode)
        streamed = gen.generate(PROMPTS, stopping, decode=decode, on_text=lambda row, text: None)
        assert [(c.tokens, c.text, c.finish_reason) for c in chunked] == \
            [(c.tokens, c.text, c.finish_reason) for c in streamed]
        assert chunked[1].finish_reason == "stop_string" and len(chunked[1].tokens) > G.DECODE_CHUNK


@pytest.mark.slow
def test_sharded_generation_equals_single_device(tiny, gen):
    single = gen.generate(PROMPTS, G.Sampling(max_new_tokens=NEW))
    mesh = sharding.inference_mesh(tensor_parallel=2)  # 8 CPU devices: data 4 x tensor 2
    sharded = G.Generator(*tiny, mesh=mesh)
    assert sharded.params["embed_in"].sharding.spec[0] == "tensor"
    assert [c.tokens for c in sharded.generate(PROMPTS, G.Sampling(max_new_tokens=NEW))] == [c.tokens for c in single]


@pytest.mark.slow
def test_generate_script_writes_jsonl(tiny, tmp_path, capsys):
    import scripts.generate as script

    m, params = tiny
    m = tiny_model(vocab_size=50277, max_position_embeddings=128)  # the 20B tokenizer's vocabulary
    config = cfg.default_config()
    config.model = m
    config.train.seq_len = 128
    weights.save_params(config, random_params(m, 1), tmp_path / "params")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello world"}) + "\n" + json.dumps({"prompt": "The cat"}) + "\n")
    tokenizer = default_paths()["tokenizer"]
    script.main(["--checkpoint", str(tmp_path / "params"), "--tokenizer", tokenizer, "--prompt_file", str(prompts),
                 "--output", str(tmp_path / "out.jsonl"), "--max_new_tokens", "5", "--ignore_eod"])
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello world", "The cat"]
    assert all(len(r["tokens"]) == 5 and r["finish_reason"] == "length" for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        script.main(["--checkpoint", str(tmp_path / "params"), "--tokenizer", tokenizer, "--prompt_file", str(bad)])
    assert e.value.code == 2 and "bad.jsonl, line 2" in capsys.readouterr().err


def test_prefill_runs_the_head_on_the_last_positions_only(tiny):
    """The prompt's logits are needed at each row's last position alone: the compiled prefill never forms the
    [B, T, vocab] logits (a 2,048-token prompt's would be ~400 MB per row in fp32)."""
    m, params = tiny
    b, t = 2, 16
    cache = model_lib.init_cache(m, b, t + NEW)
    ids, mask = np.ones((b, t), np.int32), np.ones((b, t), bool)
    hlo = jax.jit(functools.partial(G.prefill, m)).lower(params, ids, mask, cache).as_text()
    assert f"{b}x{PADDED}xf32" in hlo
    assert f"{b}x{t}x{PADDED}xf32" not in hlo and f"{b * t}x{PADDED}xf32" not in hlo

"""The lm-eval adapter against the harness's own `hf` backend on the same (random) weights and the local tasks."""

import json
import resource
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from conftest import FIXTURES, ROOT, script_env  # noqa: E402
from neox_jax import evaluate as E  # noqa: E402
from neox_jax.data import default_paths  # noqa: E402

TOKENIZER_VOCAB, PADDED = 50277, 50304
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
PYTHIA_70M = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048)


def make_hf_model(path, shape, seed=0, max_positions=2048):
    """A random GPTNeoXForCausalLM + tokenizer files built from the 20B tokenizer JSON, loadable offline."""
    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(vocab_size=PADDED, max_position_embeddings=max_positions, rotary_pct=0.25,
                                        hidden_act="gelu", use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
                                        tie_word_embeddings=False, **shape)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # make the LayerNorms matter too
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=default_paths()["tokenizer"],
                                               bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                               unk_token="<|endoftext|>", pad_token="<|padding|>")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("hf_small"), SMALL)


def hf_backend(path, **kw):
    return HFLM(pretrained=str(path), tokenizer=str(path), device="cpu", dtype="float32", batch_size=8, **kw)


def run_both(path, tasks, limit, **lm_kw):
    ours = E.NeoXLM(hf=str(path), batch_size=8, **lm_kw)
    theirs = hf_backend(path, **lm_kw)
    results = []
    for lm in (ours, theirs):
        results.append(E.evaluate(lm, tasks, limit=limit, log_samples=True))
    return results


def compare(ours, theirs, tasks, tol=1e-3):
    for task in tasks:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) > 0
        for da, db in zip(a, b):
            assert da["arguments"] == db["arguments"], task
            for ra, rb in zip(da["resps"], db["resps"]):  # one [(logprob, is_greedy)] per request of the doc
                (lp_a, greedy_a), (lp_b, greedy_b) = ra[0], rb[0]
                assert abs(lp_a - lp_b) <= tol, (task, da["doc_id"], lp_a, lp_b)
                assert greedy_a == greedy_b, (task, da["doc_id"])
        for metric in ("acc,none", "acc_norm,none"):
            if metric in theirs["results"][task]:
                assert ours["results"][task][metric] == theirs["results"][task][metric], (task, metric)


@pytest.mark.slow
def test_loglikelihood_matches_hf_backend_on_local_tasks(small_hf):
    ours, theirs = run_both(small_hf, list(E.LOCAL_TASKS), limit=3)
    compare(ours, theirs, E.LOCAL_TASKS)
    assert ours["results"]["lambada_openai"]["perplexity,none"] == pytest.approx(
        theirs["results"]["lambada_openai"]["perplexity,none"], rel=1e-3)


@pytest.mark.slow
def test_pythia_70m_shape_matches_hf_backend_limit_20(tmp_path):
    path = make_hf_model(tmp_path / "hf70m", PYTHIA_70M, seed=1)
    ours, theirs = run_both(path, list(E.LOCAL_TASKS), limit=20)
    compare(ours, theirs, E.LOCAL_TASKS)


@pytest.mark.slow
def test_rolling_and_generate_until_match_hf_backend(small_hf):
    texts = [(FIXTURES / "text" / "tinyshakespeare_head.txt").read_text()[:1500], "Hello world", "a"]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours, theirs = E.NeoXLM(hf=str(small_hf), max_length=64), hf_backend(small_hf, max_length=64)
    np.testing.assert_allclose(ours.loglikelihood_rolling(requests), theirs.loglikelihood_rolling(requests),
                               atol=1e-3, rtol=0)
    gen_kwargs = {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False}
    prompts = ["The quick brown fox", "Question: What is 2 + 2?\nAnswer:", "Once upon a time there was a"]
    ours_out = ours.generate_until([Instance("generate_until", {}, (p, gen_kwargs), i) for i, p in enumerate(prompts)])
    # HF's generate may pick the embedding's padding ids (>= 50277), which neox_jax never emits; suppress them there.
    hf_kwargs = dict(gen_kwargs, suppress_tokens=list(range(TOKENIZER_VOCAB, PADDED)))
    theirs_out = theirs.generate_until([Instance("generate_until", {}, (p, hf_kwargs), i) for i, p in enumerate(prompts)])
    assert ours_out == theirs_out
    assert all("\n" not in s and "." not in s for s in ours_out)


def greedy_tokens(hf_model, context, n):
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context):]


@pytest.mark.slow
def test_packed_scoring_edge_cases_match_hf_backend(small_hf):
    """Shared contexts (one-token, repeated, prefix and greedy continuations, one position predicting many
    targets), contexts longer than max_length (truncated differently per continuation length), a continuation of
    max_length, requests of one length, rows of every length (row_length 16 of max_length 64), a single request;
    every log-likelihood and greedy flag as the hf backend's."""
    ours = E.NeoXLM(hf=str(small_hf), batch_size=8, max_length=64, row_length=16)
    theirs = hf_backend(small_hf, max_length=64)
    rng = np.random.default_rng(0)
    tok = lambda n: rng.integers(1, TOKENIZER_VOCAB, n).tolist()  # noqa: E731
    ctx, long_ctx, many = tok(10), tok(100), tok(3)
    cont, greedy = tok(5), greedy_tokens(theirs.model, ctx, 3)
    pairs = [(ctx, tok(1)), (ctx, cont), (ctx, cont), (ctx, cont[:3]), (ctx, cont + tok(2)), (ctx, greedy),
             (ctx, greedy[:1]), (long_ctx, tok(1)), (long_ctx, tok(7)), (long_ctx, tok(64)),
             *[(tok(20), tok(3)) for _ in range(5)], (tok(40), tok(30)), *[(many, [t]) for t in tok(40)]]
    requests = [(("", ""), c, x) for c, x in pairs]
    for batch in (requests, requests[:1]):
        mine, ref = ours._loglikelihood_tokens(batch), theirs._loglikelihood_tokens(batch)
        np.testing.assert_allclose([lp for lp, _ in mine], [lp for lp, _ in ref], atol=1e-4, rtol=0)
        assert [g for _, g in mine] == [g for _, g in ref]
        if len(batch) > 1:
            assert mine[5][1] and mine[6][1]  # the model's own greedy continuation
    assert len(ours.scorer.stats.body_shapes) >= 3  # rows of 16, 32 and 64 tokens were used
    with pytest.raises(ValueError, match="continuation of 0 tokens"):
        ours._loglikelihood_tokens([(("", ""), ctx, [])])


def test_requests_score_as_the_hf_models_own_logits(small_hf):
    """The adapter's core, in brief (the tests above hold it to the hf backend at length): a request's
    log-likelihood and greedy flag from the model's log-softmax at the continuation's positions."""
    model = transformers.GPTNeoXForCausalLM.from_pretrained(small_hf).eval()
    ctx = [11, 250, 3000, 7]
    conts = [greedy_tokens(model, ctx, 2), [42, 9001]]
    mine = E.NeoXLM(hf=str(small_hf), max_length=64)._loglikelihood_tokens([(("", ""), ctx, c) for c in conts])
    for (lp, greedy), cont in zip(mine, conts):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:], -1)
        assert lp == pytest.approx(sum(float(logprobs[i, t]) for i, t in enumerate(cont)), abs=1e-4)
        assert greedy == (logprobs.argmax(-1).tolist() == cont)
    assert [g for _, g in mine] == [True, False]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_missing_or_malformed_task_files_name_the_file(small_hf, tmp_path, monkeypatch):
    monkeypatch.setenv(E.DATA_ENV, str(tmp_path))  # restored after the test; evaluate(data_dir=) sets it too
    lm = E.NeoXLM(hf=str(small_hf))
    with pytest.raises(ValueError, match=r"lambada_test\.jsonl not found"):
        E.evaluate(lm, ["lambada_openai"], limit=1, data_dir=tmp_path)
    write(tmp_path / "lambada" / "lambada_test.jsonl", '{"text": "a b"}\n{"text": "c d"\n')
    with pytest.raises(ValueError, match=r"lambada_test\.jsonl, line 2: not valid JSON"):
        E.evaluate(lm, ["lambada_openai"], limit=1, data_dir=tmp_path)
    write(tmp_path / "arc" / "arc_easy.jsonl", json.dumps({"query": "Question: q", "choices": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=r"arc_easy\.jsonl, line 1: missing field\(s\) gold"):
        E.evaluate(lm, ["arc_easy"], limit=1, data_dir=tmp_path)
    write(tmp_path / "piqa" / "valid.jsonl", json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    write(tmp_path / "piqa" / "valid-labels.lst", "0\n1\n")
    with pytest.raises(ValueError, match=r"valid-labels\.lst: expected 1 lines"):
        E.evaluate(lm, ["piqa"], limit=1, data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"task\(s\) lambada_opnai are not offline tasks "
                                         r"\(did you mean lambada_openai\?\)"):
        E.evaluate(lm, ["lambada_opnai"], limit=1, data_dir=tmp_path)


def test_other_task_names_go_to_lm_evals_registry(small_hf):
    """A name that is not one of ours is lm-eval's own task; offline (as here) that is one clear error at once."""
    lm = E.NeoXLM(hf=str(small_hf))
    with pytest.raises(ValueError, match=r"^task\(s\) sciq are not offline tasks; lm-eval's own tasks download their "
                                         r"data from the Hugging Face hub and HF_HUB_OFFLINE=1 is set"):
        E.evaluate(lm, ["sciq"], limit=1)
    with pytest.raises(ValueError, match=r"task\(s\) hellaswagg are not offline tasks \(did you mean hellaswag\?\)"):
        E.evaluate(lm, ["hellaswagg"], limit=1)


def evaluate_script(*args):
    """The script's result, its wall seconds and its CPU seconds (steadier on a loaded machine)."""
    env = script_env(PYTHONPATH=str(ROOT))  # this checkout's neox_jax, whatever the venv points at
    start, cpu = time.monotonic(), _children_cpu()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args], capture_output=True,
                          text=True, timeout=600, env=env)
    return done, time.monotonic() - start, _children_cpu() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow
def test_evaluate_script_forks_nothing_and_warns_nothing(small_hf):
    """Bootstrap stderrs (LAMBADA's perplexity) without a fork()ed pool beside JAX's threads, and none of lm-eval's
    "Custom kwargs" advice for our local tasks."""
    done, *_ = evaluate_script("--hf", str(small_hf), "--tasks", "lambada_openai,piqa", "--limit", "3",
                               "--bootstrap_iters", "100")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "os.fork()" not in done.stderr and "Custom kwargs" not in done.stderr
    assert "lambada_openai" in done.stdout and "perplexity" in done.stdout


@pytest.mark.slow
def test_evaluate_script_refuses_a_hub_task_offline_at_once(small_hf):
    done, seconds, cpu_seconds = evaluate_script("--hf", str(small_hf), "--tasks", "sciq")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FATAL: task(s) sciq are not offline tasks"), done.stderr
    # bounds, not timing goals: no model load (3.5 CPU-s measured, the imports), no download retries (their waits)
    assert cpu_seconds < 10 and seconds < 60


@pytest.mark.slow
def test_bundled_eval_sets_are_the_full_sets(monkeypatch):
    """Without $NEOX_JAX_EVAL_DATA the tasks read the copies in neox_jax/assets/eval: every item of each set (the
    published sizes), LAMBADA byte for byte the file lm-eval checks (its sha256)."""
    import bz2
    import hashlib
    import importlib.util

    monkeypatch.delenv(E.DATA_ENV, raising=False)
    spec = importlib.util.spec_from_file_location("eval_task_utils", E.TASK_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    sizes = {name: sum(len(split) for split in getattr(utils, f"load_{name}")().values())
             for name in ("lambada", "piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag")}
    assert sizes == {"lambada": 5153, "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267,
                     "hellaswag": 10042}
    lambada = bz2.decompress(utils.data_path("lambada/lambada_test.jsonl").read_bytes())
    assert hashlib.sha256(lambada).hexdigest().startswith("4aa8d02cd17c7191")

"""What a train step needs per device, from a formula in the config's sizes: the analytic memory model.

The compiled view (XLA's memory analysis and the temp's breakdown into the parts named here) is in `layout.py`;
this model checks it, predicts layouts that were not compiled (`fit.settings_that_fit`), and says what a change
would save. It holds for every remat policy, on the CPU compile that stands in for a GPU and on the CUDA compiler
(README, "What a step needs per device").

Sizes: rows = sequences per device per micro-batch, T = train.seq_len, N = rows x T tokens, H, F (mlp per device),
n (heads per device), L (layers per stage), S stages, M micro-batches, V (padded vocabulary per device), b = the
compute dtype's bytes, b_g = the params' (gradients') bytes, P = layer parameters per device, G = bytes of the fp32
gradients at their ZeRO placement.

  kept for the backward        L x N x KEPT_PER_TOKEN x b      what the remat policy saves of every layer
                               full: H (the layer's input); attention_out: 2H; dots_no_batch: 4H + F (qkv, the
                               attention dense, the first MLP matmul); dots: the same, plus outside cuDNN every
                               layer's fp32 T x T scores; none: 15H + 4F (every intermediate), plus with XLA
                               attention its fp32 probabilities
  one layer's backward         N x WORK x b                    the layer being recomputed and differentiated
                               (+ SCORE_BUFFERS x rows x n x q x T x 4 outside cuDNN: q = T for XLA, the chunk
                               for chunked attention)
  output head                  N / loss_chunks x V x (4 + b)   one head slice's fp32 logits and their gradient (x 8
                               unsliced); at the peak instead of the layer's work when it is larger
  pipeline stage inputs        (M + S - 1) x rows x T x H x b  one per tick, kept until the backward
  pipeline head inputs         (M + S - 1) x rows x T/S x H x b
  gradients                    pipeline: P x b_g; micro-batches with ZeRO-1: G (the accumulator; each
                               micro-batch's are reduce-scattered into it); micro-batches otherwise:
                               2 G + G b_g / 4 (accumulator, one micro-batch's, its 16-bit form)
  optimizer update (ZeRO-1)    the Adam moments' bytes         copies XLA keeps of the donated moments (master
                                                               weights)

The per-token constants are the slopes (kept) and intercepts (work) of compiles of pythia-160m and 1.4b at two
depths; tests/test_memory.py holds the model to recorded compiles of pythia-160m, 1b and 1.4b in every policy.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from neox_jax import config as cfg
from neox_jax import model as model_lib
from neox_jax import sharding
from neox_jax.setup import RunSetup

# Named parts of a step's temp memory, in the order reports print them (the compiled breakdown uses the same).
STAGE_INPUTS = "pipeline: stage inputs kept per tick"
HEAD_INPUTS = "pipeline: head inputs kept per tick"
STORED = "kept for the backward, every layer"
ATTENTION = "attention scores"
HEAD = "output head: logits and their gradient"
GRADIENTS = "gradients (param-sized)"
SHARDS = "optimizer update (ZeRO-shard-sized)"
ACTIVATIONS = "activations of the layer being computed"
COLLECTIVES = "collective buffers"
OTHER = "other"
UNATTRIBUTED = "allocator padding and reuse"
PARTS = (STAGE_INPUTS, HEAD_INPUTS, STORED, ATTENTION, HEAD, GRADIENTS, SHARDS, ACTIVATIONS, COLLECTIVES, OTHER,
         UNATTRIBUTED)

# What each remat policy keeps of a layer (the label of STORED in reports).
KEPT = {
    "none": "every intermediate (no remat)",
    "full": "each layer's input (full remat)",
    "dots": "inputs and every matmul's output (remat dots)",
    "dots_no_batch": "inputs and the weight matmuls' outputs (remat dots_no_batch)",
    "attention_out": "inputs and attention outputs (remat attention_out)",
}

# Per token of a layer, in elements of the compute dtype, as (x H, x F): what each policy keeps for the backward
# (with no remat: the input, LayerNorm outputs, qkv, rotated q and k, attention and MLP outputs, the MLP's
# F-sized activations and their fp32 forms; dots_no_batch: qkv, the attention dense and the first MLP matmul, whose
# outputs the backward reads), and what the layer being recomputed and differentiated holds at once (`WORK`; XLA:CPU
# computes it in fp32, with no remat it recomputes nothing). Counted from compiles of pythia-160m and 1.4b at two
# depths (the slope is what a layer keeps, the intercept the work), CPU and CUDA.
KEPT_PER_TOKEN = {"none": (15, 4), "full": (1, 0), "attention_out": (2, 0), "dots_no_batch": (4, 1), "dots": (4, 1)}
WORK = {("cpu", False): (6, 4), ("cpu", True): (14, 9), ("gpu", False): (14, 4), ("gpu", True): (14, 4)}
# Score-sized fp32 buffers of the layer being differentiated, outside cuDNN: XLA:CPU holds the scores, the
# probabilities and their gradient; the GPU compiler fuses them into one.
SCORE_BUFFERS = {"cpu": 3, "gpu": 1}


def label(part: str, policy: str) -> str:
    """A part's name as reports print it: STORED says what the policy keeps."""
    return f"{part}: {KEPT[policy]}" if part == STORED else part


def state_bytes(run: RunSetup) -> dict:
    """Per-device bytes of the train state and its gradients: params (the state's dtype), optimizer (the optax
    state and, with master weights, the fp32 master placed like the moments) and fp32 gradients."""
    mesh, place = run.mesh, run.placement
    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    weights = jax.tree.map(lambda b: b.value, run.param_shapes, is_leaf=is_boxed)
    shapes = jax.tree.leaves(weights)

    def local(shape, dtype, spec) -> int:
        return int(np.prod(NamedSharding(mesh, spec).shard_shape(tuple(shape)))) * np.dtype(dtype).itemsize

    def total(arrays, specs, dtype=None) -> int:
        return sum(local(a.shape, dtype or a.dtype, s) for a, s in zip(arrays, jax.tree.leaves(specs, is_leaf=is_spec)))

    opt = jax.tree.leaves(jax.eval_shape(run.optimizer.init, weights))
    out = {"params": total(shapes, place.params, cfg.state_param_dtype(run.config)),
           "optimizer": total(opt, place.opt_state),
           "grads": total(shapes, place.grads, np.float32)}
    if run.config.precision.mode == "master_weights":
        out["optimizer"] += total(shapes, place.master, np.float32)
    return out


TPU_LANES = 128  # a TPU tile's minor dim


def dcn_bytes(run: RunSetup, platform: str = "tpu") -> int:
    """Bytes per device per step that cross slices (DCN) when only the data-parallel gradient reduction does.

    Each parameter's gradient (the params' dtype; split as the params are: tensor, and fsdp (x context) at ZeRO-3)
    is summed over the batch axes and the context axis, hierarchically: reduce-scattered inside the slice over the r devices of its group there,
    each 1/r piece all-reduced across slices, all-gathered inside the slice. So bytes / r cross DCN per reduction:
    once per step, or at ZeRO-3 once per micro-batch (each layer's gradient is reduce-scattered in its backward).
    XLA:CPU, simulating slices, reduces flat: its report shows more. On TPU the transfers carry the arrays in its
    tiles, whose minor dim is 128 lanes: a head dim (`kv`) below a multiple of 128 is padded up (GPT-NeoX-20B's
    96 travels as 128); `platform` says whether to count that."""
    c, mesh = run.config, run.mesh
    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    boxed = jax.tree.leaves(run.param_shapes, is_leaf=is_boxed)
    specs = jax.tree.leaves(run.placement.params, is_leaf=lambda x: isinstance(x, P))
    itemsize = np.dtype(cfg.state_param_dtype(c)).itemsize
    # the axes a gradient is summed over: the batch's, and the context axis's tokens
    reducing = {a: n for a, n in mesh.shape.items() if a in ("data", "fsdp", "context")}
    reduced_inside = math.prod(reducing.values()) // c.mesh.slices
    total = 0
    head_dim = cfg.head_dim(run.model_config)
    lanes = -(-head_dim // TPU_LANES) * TPU_LANES / head_dim if platform == "tpu" else 1.0
    for b, spec in zip(boxed, specs):
        named = {a for e in spec for a in (e if isinstance(e, tuple) else (e,))}
        inside = reduced_inside // math.prod(n for a, n in reducing.items() if a in named)
        padded = lanes if "kv" in b.names else 1.0
        total += int(np.prod(NamedSharding(mesh, spec).shard_shape(tuple(b.value.shape)))) * itemsize * padded / max(1, inside)
    return int(total * (c.train.micro_batches if c.zero_stage == 3 else 1))


def analytic_memory(run: RunSetup, platform: str = "cpu") -> dict:
    """Per-device bytes of `run`'s train step compiled for `platform`: {"state", "temp", "parts", "peak"}."""
    c, m, mesh = run.config, run.model_config, run.mesh
    state = state_bytes(run)
    stages = sharding.num_stages(mesh)
    tensor = int(mesh.shape["tensor"])
    rows = c.train.batch_size // c.train.micro_batches // sharding.batch_split(mesh)
    t, h = c.train.seq_len, m.hidden_size
    tokens = rows * t
    f, heads = cfg.ffn_size(m) // tensor, m.num_heads // tensor
    b_act = np.dtype(m.dtype).itemsize
    b_grad = np.dtype(cfg.state_param_dtype(c)).itemsize
    layers = m.num_layers // stages
    attention = model_lib.attention_impl_for(m, platform, seq_len=c.train.seq_len)
    flash = attention in ("cudnn", "splash")  # one kernel call: no T x T scores, nothing a dots policy saves
    policy = m.remat_policy
    out = {}
    if stages > 1:
        ticks = c.train.micro_batches + stages - 1
        out[STAGE_INPUTS] = ticks * rows * t * h * b_act
        out[HEAD_INPUTS] = ticks * rows * (t // stages) * h * b_act
    query = min(m.attention_chunk, t) if attention == "chunked" else t
    kept_h, kept_f = KEPT_PER_TOKEN[policy]
    kept = layers * tokens * (kept_h * h + kept_f * f) * b_act
    if (policy == "dots" and not flash) or (policy == "none" and attention == "xla"):
        # every layer's fp32 scores (dots: the score matmul's output; chunked attention recomputes them otherwise)
        kept += layers * rows * heads * t * t * 4
    out[STORED] = int(kept)
    work_h, work_f = WORK[("cpu" if platform == "cpu" else "gpu", policy != "none")]
    work = tokens * (work_h * h + work_f * f) * b_act
    if not flash:
        work += SCORE_BUFFERS["cpu" if platform == "cpu" else "gpu"] * rows * heads * query * t * 4
    vocab = cfg.padded_vocab(m, tensor)
    # one head slice's fp32 logits and their gradient (the sliced head keeps the gradient in the compute dtype)
    head = tokens // c.train.loss_chunks * (vocab // tensor) * (8 if c.train.loss_chunks == 1 else 4 + b_act)
    # the head runs before the layers' backward, the layer's work during it: the larger of the two is at the peak
    if head > work:
        out[HEAD] = head
    else:
        out[ACTIVATIONS] = work
    embeddings = 2 * vocab * h // tensor // (sharding.batch_split(mesh) if c.zero_stage == 3 else 1)
    params = state["params"] // b_grad - embeddings  # layer parameters per device
    if stages > 1:
        out[GRADIENTS] = params * b_grad
    elif c.train.micro_batches > 1 and c.zero_stage == 1:
        out[GRADIENTS] = state["grads"]
    elif c.train.micro_batches > 1:
        out[GRADIENTS] = 2 * state["grads"] + state["grads"] * b_grad // 4
    if c.zero_stage == 1 and c.precision.mode == "master_weights":
        out[SHARDS] = state["optimizer"] * 2 // 3  # the moments: 8 of the 12 bytes per parameter
    temp = sum(out.values())
    held = state["params"] + state["optimizer"]
    return {"state": held, "temp": temp, "parts": out, "peak": held + temp}

"""Every Pythia size as it was trained: `--config configs/pythia.py:410m` (14m, 31m, 70m, 160m, 410m, 1b, 1.4b,
2.8b, 6.9b, 12b).

Source: the training configs in EleutherAI/pythia `models/<size>/pythia-<size>.yml` (run with GPT-NeoX on
NVIDIA A100-SXM4-40GB), and neox_reference.md for sizes and learning rates. Every size: batch 1,024 x 2,048 tokens,
143,000 steps, AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1, warmup 1% then cosine to 10%, clip 1.0, fp16 with
dynamic loss scaling (initial 2^12, window 1,000, hysteresis 2, min 1) except 1b, trained in bf16 (the Pythia README:
fp16 gave it an unrecoverable loss spike), ZeRO stage 1 (0 for 14m and 31m) and activation checkpointing of every
layer (none for 14m and 31m).

How the recipe maps here: fp16/bf16 with DeepSpeed's fp32 master in the optimizer state is
`precision.mode=master_weights`; checkpoint-activations is `model.remat_policy=full`; GPT-NeoX's
`train_micro_batch_size_per_gpu` x `gradient_accumulation_steps` is `train.micro_batches` = 1,024 / (micro-batch x
data-parallel size); the model-parallel size is `mesh.tensor`. The data axis takes the remaining devices
(`mesh.data=-1`), so on the GPU count of the table each device sees the published micro-batch; on fewer, raise
`train.micro_batches` (the memory check at start-up names the settings that fit). One change GPT-NeoX did not
need: its vocab-parallel cross-entropy reads fp16 logits, ours are fp32, so the head runs in `train.loss_chunks`
slices of the sequence (256 tokens) and the fp32 [micro-batch, 2048, 50304] logits never exist whole.

Per-device memory of each size on the GPU count it was trained on, compiled by the CUDA compiler for H100-80GB
and A100-40GB: README, "Pythia as trained: per-device memory" (`scripts/inspect_sharding.py --presets pythia`).
"""

from neox_jax.config import default_config

# name: (layers, hidden, heads, lr, padded vocab, A100s it was trained on, tensor parallel, micro-batch per GPU)
SIZES = {
    "14m": (6, 128, 4, 1.0e-3, 50304, 32, 1, 32),
    "31m": (6, 256, 8, 1.0e-3, 50304, 32, 1, 32),
    "70m": (6, 512, 8, 1.0e-3, 50304, 32, 1, 32),
    "160m": (12, 768, 12, 6.0e-4, 50304, 32, 1, 32),
    "410m": (24, 1024, 16, 3.0e-4, 50304, 32, 1, 32),
    "1b": (16, 2048, 8, 2.5e-4, 50304, 64, 1, 16),
    "1.4b": (24, 2048, 16, 2.0e-4, 50304, 64, 1, 16),
    "2.8b": (32, 2560, 32, 1.6e-4, 50304, 64, 1, 16),
    "6.9b": (32, 4096, 32, 1.2e-4, 50432, 128, 2, 8),  # x 2 gradient accumulation steps
    "12b": (36, 5120, 40, 1.2e-4, 50688, 256, 4, 8),  # x 2 gradient accumulation steps
}
BATCH = 1024
SMALL = ("14m", "31m")  # ZeRO stage 0 and no activation checkpointing


def devices(size: str) -> int:
    """The number of GPUs `size` was trained on (the mesh its micro-batches are sized for)."""
    return SIZES[size][5]


def get_config(arg="70m"):
    if arg not in SIZES:
        raise ValueError(f"configs/pythia.py: unknown size {arg!r}; choose one of {', '.join(SIZES)}")
    layers, hidden, heads, lr, vocab, gpus, tensor, micro = SIZES[arg]
    c = default_config()
    m = c.model
    m.num_layers, m.hidden_size, m.num_heads, m.padded_vocab_size = layers, hidden, heads, vocab
    m.max_position_embeddings = 2048
    m.hidden_act = "gelu"
    if arg in ("6.9b", "12b"):
        m.init = "normal"  # with scaled_normal output projections
    m.dtype = "bfloat16" if arg == "1b" else "float16"
    m.remat_policy = "none" if arg in SMALL else "full"
    c.precision.mode = "master_weights"
    c.precision.loss_scale = "none" if arg == "1b" else "dynamic"
    c.zero_stage = 0 if arg in SMALL else 1
    c.mesh.tensor = tensor
    c.optimizer.lr = lr
    c.optimizer.weight_decay = 0.1
    c.train.steps = 143_000
    c.train.batch_size = BATCH
    c.train.micro_batches = BATCH // (micro * gpus // tensor)
    c.train.seq_len = 2048
    c.train.loss_chunks = 8
    c.train.log_every = 10
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    return c

"""GPT-NeoX-20B as trained (configs/20B.yml): 44 layers, 6144 hidden, 64 heads, vocab padded for TP 2.

The paper's run: 96 A100-40GB, tensor 2 x pipeline 4 x data 12, ZeRO-1, activation checkpointing,
batch 1,536 x 2,048, 150,000 steps, fp16 with dynamic loss scaling.
"""

from neox_jax.config import default_config


def devices(arg=None) -> int:
    """The A100-40GB GPUs the paper trained on."""
    return 96


def get_config(arg=None):
    c = default_config()
    m = c.model
    m.num_layers, m.hidden_size, m.num_heads = 44, 6144, 64
    m.padded_vocab_size = 50432
    m.max_position_embeddings = 2048
    m.hidden_act = "gelu_fast"
    m.remat_policy = "full"
    m.dtype = "float16"
    c.precision.mode = "master_weights"  # fp16 weights and gradients, fp32 master in the ZeRO-1 optimizer state
    c.precision.loss_scale = "dynamic"
    c.mesh.tensor = 2
    c.zero_stage = 1
    c.optimizer.lr = 0.97e-4
    c.optimizer.weight_decay = 0.01
    c.train.steps = 150_000
    c.train.batch_size = 1536
    c.train.micro_batches = 32  # 4 sequences per GPU x data 12 x 32 accumulation steps (20B.yml)
    c.train.seq_len = 2048
    return c

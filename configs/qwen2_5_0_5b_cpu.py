"""Dr. GRPO on a real 0.5B checkpoint (Qwen2.5-0.5B class) on one CPU machine with 24 GB of RAM.

The way to try a real pretrained checkpoint without an accelerator: point `model.path` at a
Hugging Face directory (or an r1zero-jax checkpoint) and run

    r1zero-jax plan configs/qwen2_5_0_5b_cpu.py --set model.path=DIR     # host RAM it needs
    r1zero-jax train configs/qwen2_5_0_5b_cpu.py --set model.path=DIR

The paper's recipe (qwen_math template, temperature 1, Dr. GRPO loss, lr 1e-6, betas 0.9/0.95,
clip 1.0, no KL) scaled down: 4 prompts x 4 samples per rollout, 128 new tokens, and, as in the
paper, 8 optimizer steps per rollout (here of 2 sequences each). float32 master weights
(bfloat16 ones lose lr-1e-6 updates to rounding) and float32 compute (XLA:CPU has no fast
bfloat16 matmuls).

One CPU device, which XLA:CPU runs on all cores: virtual devices (mesh.num_cpu_devices > 1) all
live in the same RAM, and each holds its own copy of every weight the program all-gathers (the
LM head, a layer at a time): with 4 of them the same run needs 20+ GB instead of about 10.
Microbatch = minibatch, so there is no gradient accumulation buffer (another 2 GB), and a small
one: XLA:CPU keeps most of every layer's activations for the backward pass even with remat
(about 0.3 GB per layer at 8 sequences of 384 tokens). Measured peak RSS in BENCHMARKS.md
("Host memory of a real-vocabulary CPU run").
"""

from r1zero_jax.config import (CheckpointConfig, DataConfig, EvalConfig, LogConfig, MeshConfig,
                               ModelConfig, OptimConfig, RLConfig, RunConfig, SamplingConfig,
                               TrainConfig)


def config() -> RunConfig:
    return RunConfig(
        name="qwen2_5_0_5b_cpu",
        model=ModelConfig(preset="qwen2.5-0.5b", path="models/Qwen2.5-0.5B", dtype="float32",
                          param_dtype="float32", remat=True),
        mesh=MeshConfig(spec="data=1", num_cpu_devices=1),
        data=DataConfig(source="math_lvl3to5_8k", template="qwen_math", max_prompt_tokens=256),
        sampling=SamplingConfig(max_new_tokens=128, temperature=1.0, top_p=1.0),
        rl=RLConfig(loss="dr_grpo", group_size=4, rollout_batch_size=16, kl_beta=0.0),
        optim=OptimConfig(learning_rate=1e-6, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(steps=20, minibatch_size=2, microbatch_size=2, logits_chunk=64),
        eval=EvalConfig(source="", every=0),
        checkpoint=CheckpointConfig(every=10, keep_last=1, async_save=False),
        log=LogConfig(tensorboard=False, plot=True),
    )

"""The README's main job: Dr. GRPO on an 8-device CPU mesh (data 4 x tensor 2), offline.

A tiny Qwen2-architecture model learns sums of three digits (r1zero_jax/data/synthetic.py) with
answers in \\boxed{} graded by the real grader. A random model earns no reward, so a short
supervised warm-up first makes a weak base model that can work a sum out (`3+5=8 8+4=12
\\boxed{12}`) but mostly guesses instead (wrong); RL then has to discover that working pays.
About 2-3 minutes on a 2-core laptop (held-out greedy accuracy 16% -> 70% here); accuracy before
vs after RL goes to summary.json.
"""

from r1zero_jax.config import (CheckpointConfig, DataConfig, EvalConfig, LogConfig, MeshConfig,
                               ModelConfig, OptimConfig, RLConfig, RunConfig, SamplingConfig,
                               TrainConfig)


def config() -> RunConfig:
    return RunConfig(
        name="cpu_smoke",
        model=ModelConfig(preset="custom", vocab_size=32, hidden_size=64, intermediate_size=256,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=128,
                          dtype="float32", param_dtype="float32"),
        mesh=MeshConfig(spec="data=4,tensor=2", num_cpu_devices=8),
        data=DataConfig(source="synthetic", template="no", max_prompt_tokens=16),
        sampling=SamplingConfig(max_new_tokens=48, temperature=1.0),
        rl=RLConfig(loss="dr_grpo", group_size=8, rollout_batch_size=256),
        optim=OptimConfig(learning_rate=2e-4, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(steps=30, minibatch_size=128, warmup_sft_steps=400,
                          warmup_sft_habit_steps=100, warmup_sft_lr=3e-3, warmup_sft_batch=32),
        eval=EvalConfig(source="synthetic", size=0, every=10, batch_size=100),
        checkpoint=CheckpointConfig(every=10, keep_last=1, async_save=True),
        log=LogConfig(tensorboard=True, plot=True),
    )

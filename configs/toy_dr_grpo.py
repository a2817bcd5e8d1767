"""Length-bias toy (notebooks/length_bias.ipynb, RESULTS.md), Dr. GRPO side; toy_grpo.py differs
only in `rl.loss`.

The synthetic digit-sum task (r1zero_jax/data/synthetic.py) and a tiny Qwen2-architecture model.
The supervised warm-up makes a base model whose wrong answers come in two lengths, a bare guess
and a guess after a variable number of "hmm" (1-6), and whose right answers are worked sums,
sometimes re-checked. Length is then free to move without changing the reward, which is what
the paper's bias acts on. A 2-device CPU mesh keeps it to minutes on a 2-core laptop; run both
losses over seeds with `python benchmarks/length_bias.py`.
"""

from r1zero_jax.config import (CheckpointConfig, DataConfig, EvalConfig, LogConfig, MeshConfig,
                               ModelConfig, OptimConfig, RLConfig, RunConfig, SamplingConfig,
                               TrainConfig)


def config() -> RunConfig:
    return RunConfig(
        name="toy_dr_grpo",
        model=ModelConfig(preset="custom", vocab_size=0, hidden_size=64, intermediate_size=256,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=128,
                          dtype="float32", param_dtype="float32"),
        mesh=MeshConfig(spec="data=-1", num_cpu_devices=2),
        data=DataConfig(source="synthetic", template="no", max_prompt_tokens=16),
        sampling=SamplingConfig(max_new_tokens=48, temperature=1.0),
        rl=RLConfig(loss="dr_grpo", group_size=8, rollout_batch_size=128),
        optim=OptimConfig(learning_rate=2e-4, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(steps=60, minibatch_size=64, warmup_sft_steps=400,
                          warmup_sft_habit_steps=100, warmup_sft_lr=3e-3, warmup_sft_batch=32),
        eval=EvalConfig(source=""),
        checkpoint=CheckpointConfig(every=0, keep_last=1, async_save=False),
        log=LogConfig(tensorboard=False, plot=False),
    )

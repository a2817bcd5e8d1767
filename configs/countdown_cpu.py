"""A task of your own on the CPU mesh: countdown (configs/tasks/countdown.py), with its own
rows, tokenizer and exact reward, trained by Dr. GRPO from a random tiny model. Nothing here is
about math: the task is named by import path and the grader workers run its reward function."""

from pathlib import Path

from r1zero_jax.config import (DataConfig, EvalConfig, MeshConfig, ModelConfig, OptimConfig,
                               RLConfig, RunConfig, SamplingConfig, TrainConfig)


def config() -> RunConfig:
    return RunConfig(
        name="countdown_cpu",
        model=ModelConfig(preset="custom", vocab_size=32, hidden_size=64, intermediate_size=256,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          max_position_embeddings=64, dtype="float32", param_dtype="float32"),
        mesh=MeshConfig(spec="data=4,tensor=2", num_cpu_devices=8),
        data=DataConfig(source="", task=f"{Path(__file__).with_name('tasks') / 'countdown.py'}:Countdown",
                        template="no", max_prompt_tokens=16),
        sampling=SamplingConfig(max_new_tokens=12, temperature=1.0),
        rl=RLConfig(loss="dr_grpo", group_size=8, rollout_batch_size=128),
        optim=OptimConfig(learning_rate=1e-3, clip_norm=1.0),
        train=TrainConfig(steps=20, minibatch_size=128),
        eval=EvalConfig(source="task", every=0, batch_size=64, size=64),
    )

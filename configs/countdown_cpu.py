"""A task of your own on the CPU mesh: countdown (configs/tasks/countdown.py), with its own
rows, tokenizer, exact reward and warm-up data, trained by Dr. GRPO. Nothing here is about math:
the task is named by import path and the grader workers run its reward function.

As in the main job, a short supervised warm-up first makes a weak base model of a random one:
it can solve a problem but mostly just adds the numbers up (well formed, wrong: reward 0.1); RL
then has to find that solving pays. About 2 minutes on a 2-core laptop.
"""

import dataclasses
from pathlib import Path

from r1zero_jax.config import (DataConfig, EvalConfig, OptimConfig, RLConfig, RunConfig,
                               SamplingConfig, TrainConfig, load_config)


def config() -> RunConfig:
    main_job = load_config("cpu_smoke")  # the same tiny model on the same mesh
    return RunConfig(
        name="countdown_cpu",
        model=dataclasses.replace(main_job.model, max_position_embeddings=64),
        mesh=main_job.mesh,
        data=DataConfig(source="",
                        task=f"{Path(__file__).with_name('tasks') / 'countdown.py'}:Countdown",
                        template="no", max_prompt_tokens=16),
        sampling=SamplingConfig(max_new_tokens=10, temperature=1.0),
        rl=RLConfig(loss="dr_grpo", group_size=8, rollout_batch_size=256),
        optim=OptimConfig(learning_rate=2e-4, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(steps=30, minibatch_size=128, warmup_sft_steps=300,
                          warmup_sft_habit_steps=100, warmup_sft_lr=3e-3, warmup_sft_batch=32),
        # The task brings its held-out rows: any non-empty source turns the eval on.
        eval=EvalConfig(source="task", every=10, batch_size=64, size=64),
    )

"""A task of your own on the CPU mesh: countdown (configs/tasks/countdown.py), with its own
rows, tokenizer, exact reward and warm-up data, trained by Dr. GRPO. Nothing here is about math:
the task is named by import path and the grader workers run its reward function.

As in the main job, a short supervised warm-up first makes a weak base model of a random one:
it can solve a problem but mostly just adds the numbers up (well formed, wrong: reward 0.1); RL
then has to find that solving pays. About 2 minutes on a 2-core laptop.
"""

import dataclasses
from pathlib import Path

from r1zero_jax.config import (CheckpointConfig, DataConfig, EvalConfig, RunConfig,
                               SamplingConfig, load_config)


def config() -> RunConfig:
    """The main job's model, mesh and Dr. GRPO settings (configs/cpu_smoke.py) on countdown."""
    main_job = load_config("cpu_smoke")
    return dataclasses.replace(
        main_job,
        name="countdown_cpu",
        model=dataclasses.replace(main_job.model, max_position_embeddings=64),
        data=DataConfig(source="",
                        task=f"{Path(__file__).with_name('tasks') / 'countdown.py'}:Countdown",
                        template="no", max_prompt_tokens=16),
        sampling=SamplingConfig(max_new_tokens=10, temperature=1.0),
        train=dataclasses.replace(main_job.train, warmup_sft_steps=300),
        # The task brings its held-out rows: any non-empty source turns the eval on.
        eval=EvalConfig(source="task", every=10, batch_size=64, size=64),
        checkpoint=CheckpointConfig(),
    )

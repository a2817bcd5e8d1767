"""The paper's Dr. GRPO recipe (Liu et al. 2025) for Qwen2.5-Math-1.5B on a TPU v4-32 (16 chips).

MATH levels 3-5, qwen_math template, 128 prompts x 8 samples per rollout, 128 sequences per
optimizer step (8 steps per rollout), temperature 1, 3,000 new tokens, lr 1e-6 constant,
betas (0.9, 0.95), global-norm clip 1.0, no KL (beta = 0, so no reference model).

Mesh: 16 chips = data 4 x fsdp 4. Per-device batch: microbatch 16 / (data 4 x fsdp 4) = 1
sequence of up to ~3.5k tokens, with 8 accumulation steps per optimizer step. Compiled for the
slice (`r1zero-jax plan ... --compile`), microbatch 32 peaks at 14.9 GiB per chip in the learner:
fine on a v4-32 (32 GiB) but over 90% of a v5e-16's 16 GiB, so the recipe uses 16, which fits both
(BENCHMARKS.md, "Compiled for TPU"); on a v4-32 alone, --set train.microbatch_size=32 halves the
weight gathers per optimizer step. Other slices: v5p-32 (16 chips) as is; v4-64 / v5p-64:
data=8,fsdp=4.
"""

from r1zero_jax.config import (CheckpointConfig, DataConfig, EvalConfig, MeshConfig, ModelConfig,
                               OptimConfig, RLConfig, RunConfig, SamplingConfig, TrainConfig)


def config() -> RunConfig:
    return RunConfig(
        name="qwen2_5_math_1_5b_dr_grpo",
        model=ModelConfig(preset="qwen2.5-math-1.5b", path="models/Qwen2.5-Math-1.5B",
                          dtype="bfloat16", param_dtype="float32", remat=True),
        mesh=MeshConfig(spec="data=4,fsdp=4"),
        data=DataConfig(source="math_lvl3to5_8k", template="qwen_math", max_prompt_tokens=512),
        sampling=SamplingConfig(max_new_tokens=3000, temperature=1.0, top_p=1.0,
                                prompts_per_call=64),
        rl=RLConfig(loss="dr_grpo", group_size=8, rollout_batch_size=1024, clip_low=0.2,
                    clip_high=0.2, kl_beta=0.0),
        optim=OptimConfig(learning_rate=1e-6, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0,
                          warmup_steps=0),
        train=TrainConfig(steps=200, minibatch_size=128, microbatch_size=16, logits_chunk=512),
        eval=EvalConfig(source="math500", every=25, max_new_tokens=3000, batch_size=128),
        checkpoint=CheckpointConfig(every=10, keep_last=2, keep_every=50, async_save=True),
    )

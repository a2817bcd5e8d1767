"""The paper's Dr. GRPO recipe for Qwen2.5-Math-7B on a TPU v4-64 (32 chips).

Same recipe as the 1.5B config (MATH levels 3-5, qwen_math, 128 x 8, temperature 1, 3,000 new
tokens, lr 1e-6 constant, betas (0.9, 0.95), clip 1.0, beta = 0).

Mesh: 32 chips = data 4 x fsdp 4 x tensor 2 (28 query / 4 KV heads split over tensor 2).
Per-device batch: microbatch 16 / (data 4 x fsdp 4) = 1 sequence of up to ~3.5k tokens, with
8 accumulation steps per optimizer step; layers rematerialised. On a v5p-64 (32 chips) the same
mesh applies; on v5e-64 (16 GB HBM per chip) use --set mesh.spec=data=2,fsdp=16,tensor=2
--set train.microbatch_size=32 (the microbatch must divide over data x fsdp = 32).
"""

from r1zero_jax.config import (CheckpointConfig, DataConfig, EvalConfig, MeshConfig, ModelConfig,
                               OptimConfig, RLConfig, RunConfig, SamplingConfig, TrainConfig)


def config() -> RunConfig:
    return RunConfig(
        name="qwen2_5_math_7b_dr_grpo",
        model=ModelConfig(preset="qwen2.5-math-7b", path="models/Qwen2.5-Math-7B",
                          dtype="bfloat16", param_dtype="float32", remat=True),
        mesh=MeshConfig(spec="data=4,fsdp=4,tensor=2"),
        data=DataConfig(source="math_lvl3to5_8k", template="qwen_math", max_prompt_tokens=512),
        sampling=SamplingConfig(max_new_tokens=3000, temperature=1.0, top_p=1.0,
                                prompts_per_call=32),
        rl=RLConfig(loss="dr_grpo", group_size=8, rollout_batch_size=1024, clip_low=0.2,
                    clip_high=0.2, kl_beta=0.0),
        optim=OptimConfig(learning_rate=1e-6, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0,
                          warmup_steps=0),
        train=TrainConfig(steps=200, minibatch_size=128, microbatch_size=16, logits_chunk=512),
        eval=EvalConfig(source="math500", every=25, max_new_tokens=3000, batch_size=64),
        checkpoint=CheckpointConfig(every=10, keep_last=2, keep_every=50, async_save=True),
    )

"""The published setting, for a GPU: Qwen2.5-0.5B-Instruct, a 300-step router warm-up, 3,000 LoRA steps of batch 8."""

from layerroute.recipe import TrainingConfig

config = TrainingConfig(model="Qwen/Qwen2.5-0.5B-Instruct", router_warmup=300, steps=3000, batch_size=8, lr=2e-4,
                        max_length=1536)

"""What runs in minutes on a 2-core CPU (finetune.py's default): the embedded SmolLM2-135M-Instruct and corpus, a
40-step router warm-up, 70 LoRA steps of batch 4."""

from layerroute.recipe import TrainingConfig

config = TrainingConfig()

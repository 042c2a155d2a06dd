"""Alignment: SFT, LoRA, the conditional reward model (COOL RLHF), online PPO with the Fast
Path, and DPO. They share the data formats in `data.py`, the losses in `losses.py` and the
fine-tuning runner in `trainer.py` (itself built on `internlm2.train.loop`)."""

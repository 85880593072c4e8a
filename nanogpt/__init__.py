"""What the scripts at the top share, one module per concern: runtime (the machine and its
processes), checkpoints (ckpt.pt, out_dir and Hugging Face files), dataloader (datasets and
batches), tokenizer, muon (the optimizer), lora (adapters) and batching (serve.py's engine)."""

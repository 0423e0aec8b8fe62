"""Datasets as Task objects: conversations to train on and graders to evaluate with, e.g.
`GSM8K(split="test", step=10)[0]` is the first of every tenth test problem. Set NANOCHAT_TASK_DATA to a
folder of per-task JSONL folders (arc/, gsm8k/, ...) to read them instead of the Hugging Face hub."""

"""Datasets as Task objects: conversations to train on and graders to evaluate with, e.g.
`GSM8K(split="test", step=10)[0]` is the first of every tenth test problem. Set NANOCHAT_TASK_DATA to a
folder laid out like shared/data/tasks/ to read local files instead of the Hugging Face hub."""

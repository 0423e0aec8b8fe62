"""Datasets as Task objects: conversations to train on and graders to evaluate with.

    from tasks.gsm8k import GSM8K
    task = GSM8K(split="test", step=10)   # every tenth test problem
    conversation = task[0]                # {"messages": [...]}
    task.evaluate(conversation, "... #### 18")

Set NANOCHAT_TASK_DATA to a folder laid out like shared/data/tasks/ to read local files
instead of the Hugging Face hub.
"""

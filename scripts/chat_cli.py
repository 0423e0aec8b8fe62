"""
Chat with a trained model in the terminal.

    python -m scripts.chat_cli                      # interactive, the last SFT checkpoint
    python -m scripts.chat_cli -i rl -p "What is 12*7?"   # one reply, then exit

Design choices:
- The whole conversation is kept and re-rendered every turn with `fit_to_context`, which
  drops the oldest turns when it would not fit the model's context with room for the reply,
  so a long chat never crashes or silently truncates the newest message.
- Replies stream token by token through `ReplyDecoder`: ordinary tokens go through the
  tokenizer's `StreamDecoder` (an emoji or a CJK character split across tokens is printed only
  once complete); the calculator's special tokens are shown as `<<expr=result>>`, the notation
  of GSM8K's worked answers, so the tool call and its forced output are visible.
- The assistant's reply is stored back into the conversation as structured parts (text,
  python, python_output) rebuilt from the generated ids, so the next turn re-renders the tool
  call with its special tokens, exactly as the model produced it.
- `ReplyDecoder` and `assistant_content` live in nanochat/tokenizer.py: the web server uses
  the same ones.
- Commands: `quit`/`exit` leave, `clear` starts a new conversation. Ctrl-D / Ctrl-C leave too.
"""

from __future__ import annotations

import argparse

from nanochat.tokenizer import ReplyDecoder, assistant_content

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


def stream_reply(engine, tokenizer, tokens: list[int], max_tokens: int, temperature: float, top_k, seed: int):
    """Yields the reply's token ids as they are generated, stopping at the end-of-turn tokens."""
    stop = {tokenizer.encode_special(name) for name in STOP_TOKENS}
    for token_column, _ in engine.generate(
        tokens, num_samples=1, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed
    ):
        if token_column[0] in stop:
            return
        yield token_column[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Chat with a trained nanochat model in the terminal.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="model stage"
    )
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the deepest d<N>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-p", "--prompt", default="", help="answer this one prompt and exit")
    parser.add_argument(
        "-t", "--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)"
    )
    parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k filtering (0: none)")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed of the first turn (+1 per turn)")
    parser.add_argument(
        "--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect"
    )
    args = parser.parse_args()
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")

    from nanochat.checkpoint_manager import load_model
    from nanochat.common import compute_init, setup_logging
    from nanochat.engine import Engine, fit_to_context

    setup_logging()
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, _ = load_model(
        args.source, device, phase="eval", model_tag=args.model_tag, step=args.step
    )
    engine = Engine(model, tokenizer)
    context = model.config.sequence_len
    reserve = min(args.max_tokens, context // 2)  # room kept free for the reply

    if not args.prompt:
        print("nanochat: type a message; 'clear' starts over, 'quit' or 'exit' leaves.")
    messages: list[dict] = []
    turn = 0
    while True:
        # ---- read the user's turn
        if args.prompt:
            user_text = args.prompt
        else:
            try:
                user_text = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if user_text.lower() in ("quit", "exit"):
                break
            if user_text.lower() == "clear":
                messages = []
                print("(conversation cleared)")
                continue
            if not user_text:
                continue
        messages.append({"role": "user", "content": user_text})

        # ---- generate and stream the reply
        tokens = fit_to_context(tokenizer, {"messages": messages}, context, reserve)
        budget = max(1, min(args.max_tokens, context - len(tokens)))
        if not args.prompt:
            print("\nAssistant: ", end="", flush=True)
        decoder = ReplyDecoder(tokenizer)
        reply_ids = []
        try:
            for token_id in stream_reply(
                engine, tokenizer, tokens, budget, args.temperature, args.top_k or None, args.seed + turn
            ):
                reply_ids.append(token_id)
                print(decoder.push(token_id), end="", flush=True)
        except KeyboardInterrupt:  # stop this reply, keep the chat
            print(" [interrupted]", end="")
        print(decoder.flush(), flush=True)
        messages.append({"role": "assistant", "content": assistant_content(tokenizer, reply_ids)})
        turn += 1
        if args.prompt:
            break


if __name__ == "__main__":
    main()

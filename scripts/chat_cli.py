"""
Chat with a trained model in the terminal.

    python -m scripts.chat_cli                      # interactive, the last SFT checkpoint
    python -m scripts.chat_cli -i rl -p "What is 12*7?"   # one reply, then exit

`quit`/`exit` (or Ctrl-D) leave, `clear` starts over; Ctrl-C stops the current reply (what was said
so far stays) or clears the line being typed, and never quits.
"""

import argparse
import contextlib
from collections.abc import Iterator

from nanochat.common import HelpFormatter, compute_init, exit_on_user_error, in_range, setup_logging
from nanochat.flags import add_decode_flag, add_model_flags, compile_decode


def parse_args() -> argparse.Namespace:
    """The flags; torch-free, so that --help answers before the heavy imports."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.chat_cli",
        description="Chat with a trained nanochat model in the terminal.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add_model_flags(parser, "sft")
    add("-p", "--prompt", default="", help="answer this one prompt and exit")
    add("-t", "--temperature", type=in_range(float, 0), default=0.6, help="sampling temperature (0: greedy)")
    add("-k", "--top-k", type=in_range(int, 0), default=50, help="top-k filtering (0: none)")
    reply = dict(metavar="N", type=in_range(int, 1), default=512, help="longest reply, in tokens")
    add("--max-new-tokens", "--max-tokens", **reply)
    add("--seed", type=int, default=42, help="sampling seed of the first turn (+1 per turn)")
    add("--system", default="", metavar="TEXT", help="a system message that opens the conversation")
    add_decode_flag(parser)
    return parser.parse_args()


if __name__ == "__main__":
    parse_args()  # --help and a bad flag answer here, before the imports below load torch; main parses again

from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine, Request, prompt_and_budget
from nanochat.tokenizer import ReplyDecoder, assistant_content


def stream_reply(engine: Engine, tokens: list[int], budget: int, *sampling) -> list[int]:
    """Prints the reply to `tokens` as it comes (Ctrl-C stops it; what was said stays); its token ids.
    `sampling`: temperature, top_k, seed."""
    decoder, reply_ids = ReplyDecoder(engine.tokenizer), []  # as the web server's: never half a character

    def show(token: int | None) -> None:
        if token is not None:
            reply_ids.append(token)
            print(decoder.push(token), end="", flush=True)

    try:
        engine.run([Request(tokens, budget, *sampling, sink=show)])
    except KeyboardInterrupt:  # stop this reply, keep the chat
        print(" [interrupted]", end="")
    print(decoder.flush(), flush=True)
    return reply_ids


def typed_messages() -> Iterator[str | None]:
    """What the user types, turn by turn (None: 'clear'), until 'quit', 'exit' or Ctrl-D."""
    with contextlib.suppress(ImportError):  # Windows has none
        import readline  # noqa: F401  importing it gives input() line editing and history
    print("nanochat: type a message; 'clear' starts over, 'quit' or 'exit' (or Ctrl-D) leaves.")
    while True:
        try:
            text = input("\nUser: ").strip()
        except KeyboardInterrupt:  # drop the line being typed, ask again
            print()
            continue
        except EOFError:
            print()
            return
        if text.lower() in ("quit", "exit"):
            return
        if text:
            yield None if text.lower() == "clear" else text


def main() -> None:
    args = parse_args()

    setup_logging()
    _, _, _, _, device = compute_init(args.device_type)
    with exit_on_user_error("chat_cli"):
        model, tokenizer, _ = load_model(
            args.source, device, "eval", args.model_tag, args.model_step, args.verify
        )
    engine = Engine(model, tokenizer, max_batch=1, compile=compile_decode(args.decode, device))

    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages, turn = list(opening), 0
    for user_text in [args.prompt] if args.prompt else typed_messages():
        if user_text is None:
            messages = list(opening)
            print("(conversation cleared)")
            continue
        messages.append({"role": "user", "content": user_text})
        # the whole chat re-rendered, minus the oldest turns that leave no room for the reply
        tokens, budget = prompt_and_budget(
            tokenizer, {"messages": messages}, engine.context, args.max_new_tokens
        )
        if not args.prompt:
            print("\nAssistant: ", end="", flush=True)
        sampling = (args.temperature, args.top_k or None, args.seed + turn)
        reply_ids = stream_reply(engine, tokens, budget, *sampling)
        # stored as structured parts, so that the next turn renders a calculator call as produced
        messages.append({"role": "assistant", "content": assistant_content(tokenizer, reply_ids)})
        turn += 1


if __name__ == "__main__":
    main()

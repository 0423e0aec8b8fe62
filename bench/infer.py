"""
Inference benchmark: prefill and decode speed of the KV-cached Engine against naive full
recompute, and the throughput of the web server under concurrent streaming clients.

    uv run python bench/infer.py [--depth 4] [--prompt-len 256] [--gen-tokens 256] [--skip-web]

A random model (decode_speed.random_model: every greedy run generates exactly the requested number
of tokens) with the vocabulary of the tokenizer in $NANOCHAT_BASE_DIR (or of a throwaway one
trained on the offline corpus). Then
`scripts.chat_web` serves the same model (saved as an SFT checkpoint in a temp base dir) to 1, 4 and
8 clients streaming at once; tokens are counted by the server's `/stats`. Prints one JSON line.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: make the repo importable
from decode_speed import random_model, sync, timed  # noqa: E402  (bench/ is on the path: run as a file)

from nanochat.checkpoint_manager import save_checkpoint  # noqa: E402
from nanochat.common import autocast, autodetect_device_type  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import config_from_depth  # noqa: E402
from nanochat.tokenizer import Tokenizer, get_tokenizer  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from test_engine import generate_naive  # noqa: E402  the tests' full-recompute reference

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--max-seq-len", type=int, default=1024, help="the model's sequence length")
parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens for prefill/decode timing")
parser.add_argument("--gen-tokens", type=int, default=256, help="generated tokens per timed run")
parser.add_argument("--compare-prompt-len", type=int, default=32, help="prompt for the KV vs naive run")
parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
parser.add_argument("--web-clients", default="1,4,8", help="concurrent streaming clients, comma-separated")
parser.add_argument("--web-max-tokens", type=int, default=64, help="tokens each web client asks for")
parser.add_argument("--web-rounds", type=int, default=2, help="requests each client sends in a row")
parser.add_argument("--skip-web", action="store_true", help="skip the web server part")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"])
parser.add_argument("--decode", default="compiled", choices=["compiled", "eager"], help="the decode step")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)  # a busy small machine runs tiny matmuls fastest on one thread

device = torch.device(args.device_type or autodetect_device_type())
result: dict = {"device": str(device), "depth": args.depth, "torch_threads": torch.get_num_threads()}
if device.type == "cuda":
    result["gpu"] = torch.cuda.get_device_name(device)


def median_time(fn) -> tuple[float, object]:
    """Median wall time of fn() over --repeats runs (after one warm-up), and its last result."""
    _, seconds, out = timed(fn, device, args.repeats, statistics.median)
    return seconds, out


# -----------------------------------------------------------------------------
# Tokenizer and model

workdir = Path(tempfile.mkdtemp(prefix="nanochat_bench_infer_"))
try:
    tokenizer = get_tokenizer()
    result["tokenizer"] = "NANOCHAT_BASE_DIR"
except Exception:  # no trained tokenizer: a throwaway one on the offline corpus
    from nanochat.dataset import build_offline, parquets_iter_batched

    build_offline(data_dir=workdir / "data", max_chars=1_000_000)
    docs = (doc for batch in parquets_iter_batched("train", data_dir=workdir / "data") for doc in batch)
    tokenizer = Tokenizer.train_from_iterator(docs, 2048)
    result["tokenizer"] = "throwaway (offline corpus)"
vocab_size = tokenizer.get_vocab_size()
config = config_from_depth(args.depth, vocab_size, args.max_seq_len)
model = random_model(tokenizer, config, device)
engine = Engine(model, tokenizer, compile=args.decode == "compiled")
result["decode"] = args.decode
if engine.compiled:  # every batch shape up to 8, before anything is timed
    result["compile_s"] = round(engine.warm_up(), 1)
result.update(vocab_size=vocab_size, num_params=model.num_params(), sequence_len=args.max_seq_len)

generator = torch.Generator().manual_seed(1)
plain = torch.randint(0, 256, (args.prompt_len,), generator=generator).tolist()  # byte tokens: never special
prompt = [tokenizer.get_bos_token_id()] + plain[: args.prompt_len - 1]
N = args.gen_tokens

# -----------------------------------------------------------------------------
# Engine: prefill, first token, decode


def prefill() -> torch.Tensor:
    engine.cache.clear(0)
    return engine.prefill(0, [prompt])


with torch.no_grad():
    t_prefill, _ = median_time(prefill)
result["prefill_tokens_per_s"] = round(len(prompt) / t_prefill, 1)
t_first, _ = median_time(lambda: engine.generate_batch(prompt, max_tokens=1, temperature=0.0))
result["time_to_first_token_ms"] = round(1000 * t_first, 2)
t_gen, out = median_time(lambda: engine.generate_batch(prompt, max_tokens=N, temperature=0.0))
assert len(out[0][0]) == len(prompt) + N, "a greedy run stopped early"
result["decode_tokens_per_s"] = round((N - 1) / (t_gen - t_first), 1)
t_gen8, out8 = median_time(
    lambda: engine.generate_batch(prompt, num_samples=8, max_tokens=N, temperature=1.0, top_k=50)
)
result["decode_tokens_per_s_batch8"] = round(
    sum(len(r) - len(prompt) for r in out8[0]) / (t_gen8 - t_first), 1
)

# the same greedy generation by full recompute (one run each: naive is the slow one)
short = prompt[: args.compare_prompt_len]
sync(device)
t0 = time.perf_counter()
kv_tokens = engine.generate_batch(short, max_tokens=N, temperature=0.0)[0][0][len(short) :]
sync(device)
t_kv = time.perf_counter() - t0
with autocast(device):
    t0 = time.perf_counter()
    naive_tokens = generate_naive(model, short, N)
    sync(device)
    t_naive = time.perf_counter() - t0
result["kv_vs_naive"] = {
    "prompt_tokens": len(short),
    "generated_tokens": N,
    "kv_cached_s": round(t_kv, 3),
    "full_recompute_s": round(t_naive, 3),
    "speedup": round(t_naive / t_kv, 2),
    "same_tokens": kv_tokens == naive_tokens,
}

# -----------------------------------------------------------------------------
# Web server: aggregate tokens/s with concurrent streaming clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_web() -> dict:
    import httpx

    base = workdir / "base"
    tokenizer.save(base / "tokenizer")
    save_checkpoint(base / "chatsft_checkpoints" / f"d{args.depth}", 0, model, None, {"bench": "random init"})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    JSON = {"Content-Type": "application/json"}
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    command = [sys.executable, "-m", "scripts.chat_web", "-i", "sft", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--device-type", device.type, "--max-batch", "8"]
    command += ["--decode", args.decode]
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log = open(workdir / "chat_web.log", "w")
    started = time.perf_counter()
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 900  # a compiled decode step warms up first (minutes on a busy CPU)
        while True:
            if server.poll() is not None:
                tail = (workdir / "chat_web.log").read_text()[-1500:]
                return {"skipped": f"chat_web exited with {server.returncode}: {tail}"}
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                return {"skipped": "chat_web did not answer /health within 900 s"}
            time.sleep(0.5)

        def stream(i: int, counts: list[int]) -> None:
            body = {
                "messages": [{"role": "user", "content": f"Tell me a story, number {i}."}],
                "max_tokens": args.web_max_tokens,
                "temperature": 0.0,
                "top_k": 0,
            }
            for _ in range(args.web_rounds):
                # http.client, reading the whole stream: the client's own CPU is small (httpx parsing each
                # event took ~0.8 ms per token, as much CPU as the server's on a 2-core machine)
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                connection.request("POST", "/chat/completions", json.dumps(body), JSON)
                response = connection.getresponse()
                assert response.status == 200, f"HTTP {response.status}"
                counts[i] += response.read().count(b'data: {"token"')
                connection.close()

        def generated() -> int:
            return httpx.get(f"{url}/stats", timeout=10).json()["tokens_generated"]

        def run_clients(n: int) -> dict:
            counts = [0] * n
            before = generated()
            threads = [threading.Thread(target=stream, args=(i, counts)) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            tokens = generated() - before
            return {
                "tokens": tokens,
                "events": sum(counts),
                "seconds": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 1),
            }

        web: dict = {"startup_s": round(time.perf_counter() - started, 1)}  # warm-up included
        clients = [int(c) for c in args.web_clients.split(",")]
        # warm-up at the largest batch: on a GPU the first pass through each batch size pays one-time
        # kernel selection (an H200 ran 4 clients at 65 tokens/s cold, 291 warm)
        run_clients(max(clients))
        web |= {"max_tokens_per_request": args.web_max_tokens, "requests_per_client": args.web_rounds}
        for n in clients:
            result = run_clients(n)
            # a count given twice is measured twice (e.g. 1,8,1,8 shows whether the first pass was a warm-up)
            web.setdefault(f"clients_{n}", result)
            web.setdefault("runs", []).append({"clients": n, **result})
        if "clients_1" in web and "clients_8" in web:
            web["speedup_8_vs_1"] = round(
                web["clients_8"]["tokens_per_s"] / web["clients_1"]["tokens_per_s"], 2
            )
        return web
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


try:
    result["web"] = {"skipped": "--skip-web"} if args.skip_web else bench_web()
finally:
    shutil.rmtree(workdir, ignore_errors=True)
print(json.dumps(result))

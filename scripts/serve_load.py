"""A bounded load test of `adapt serve`: C clients each sending R requests, with and without batching.

For each --max-batch given, the script starts `adapt serve MODEL` on a free port, asks every prompt
once alone (the reference answers: greedy, so each is the one right answer), then lets C clients send
R requests each at once, every client one request after another, and checks that every request was
answered (none lost) with its prompt's reference text (none wrong). It prints, per batch size: the
requests' p50 and p95 latency, the requests per second, and the tokens per second (the positions the
server generated, max_tokens a request, over the wall-clock time of the load).

The prompts are the default prompts of the samples task cut to their first --prompt-tokens tokens, so
that they agree in length (the server batches only prompts of one length).

    python scripts/serve_load.py runs/smollm2-diffusion --max-batch 1 8 --clients 8 --requests 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a diffusion checkpoint folder")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 8], help="server batch sizes to compare")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (one step per token)")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="tokens of each prompt")
    parser.add_argument("--dtype", help="the server's --dtype")
    args = parser.parse_args()
    prompts = _prompts(args.model, args.prompt_tokens, args.clients)
    results = [_measure(args, prompts, batch) for batch in args.max_batch]
    print(json.dumps(results, indent=2))


def _prompts(model: str, tokens: int, count: int) -> list[str]:
    """`count` prompts of `tokens` tokens each (by the model's tokenizer), cycling over the default prompts."""
    from transformers import AutoTokenizer

    from adapt.evaluate.samples import DEFAULT_PROMPTS

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens])
               for text in DEFAULT_PROMPTS]
    return [prompts[i % len(prompts)] for i in range(count)]


def _measure(args, prompts: list[str], max_batch: int) -> dict:
    import httpx
    import openai

    from tests.tiny_runs import free_port

    port = free_port()
    command = [sys.executable, "-m", "adapt", "serve", args.model, "--port", str(port), "--max-batch", str(max_batch),
               "--max-queue", str(args.clients * args.requests), "--max-tokens", str(args.max_tokens),
               "--temperature", "0"] + (["--dtype", args.dtype] if args.dtype else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        while not _up(httpx, url):
            if server.poll() is not None:
                raise SystemExit(f"serve_load: the server exited ({server.returncode}); run {' '.join(command)} to see why")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

        def ask(prompt: str) -> tuple[str | None, float]:
            """The answer's text (None: refused or failed, a lost request) and how long it took."""
            start = time.perf_counter()
            try:
                text = client.completions.create(model=args.model, prompt=prompt).choices[0].text
            except openai.APIError:
                text = None
            return text, time.perf_counter() - start

        reference = {prompt: ask(prompt)[0] for prompt in set(prompts)}
        before = httpx.get(f"{url}/health").json()

        def run_client(prompt: str) -> list[tuple[str, float]]:
            return [ask(prompt) for _ in range(args.requests)]

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            answers = list(pool.map(run_client, prompts))
        seconds = time.perf_counter() - start
        health = httpx.get(f"{url}/health").json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    latencies = sorted(latency for client_answers in answers for _, latency in client_answers)
    answered = sum(text is not None for client_answers in answers for text, _ in client_answers)
    wrong = sum(text is not None and text != reference[prompt] for prompt, client_answers in zip(prompts, answers)
                for text, _ in client_answers)
    count = args.clients * args.requests
    return {"max_batch": max_batch, "requests": count, "answered": answered, "wrong": wrong,
            "seconds": round(seconds, 2), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
            "requests_per_s": round(count / seconds, 3), "tokens_per_s": round(count * args.max_tokens / seconds, 1),
            "batches": health["batches"] - before["batches"],
            "mean_rows_per_batch": round((health["rows"] - before["rows"]) / (health["batches"] - before["batches"]), 2)}


def _up(httpx, url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    main()

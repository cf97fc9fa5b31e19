#!/usr/bin/env python3
"""Aggregate generation throughput of a running `wgpt serve`, with the official openai client:
N clients at once, each asking for greedy completions of --tokens tokens, for 1 and for N clients.

    wgpt serve --model MODEL --max-batch 8 --port 8000 &
    python3 scripts/bench_serve.py --url http://127.0.0.1:8000/v1 --clients 8 --tokens 64
"""
import argparse
import json
import threading
import time

from openai import OpenAI

MODEL = ""


def run(client, clients, tokens, rounds):
    done = []
    lock = threading.Lock()

    def worker(i):
        for r in range(rounds):
            c = client.completions.create(model=MODEL, prompt=f"Request {i} round {r}:", max_tokens=tokens,
                                          temperature=0, extra_body={"ignore_eos": True})
            with lock:
                done.append(c.usage.completion_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    return sum(done) / dt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    client = OpenAI(base_url=a.url, api_key=a.api_key)
    global MODEL
    MODEL = client.models.list().data[0].id
    client.completions.create(model=MODEL, prompt="warm up", max_tokens=4)
    one = run(client.with_options(), 1, a.tokens, a.rounds)
    many = run(client, a.clients, a.tokens, a.rounds)
    print(f"1 client: {one:.1f} tokens/s | {a.clients} clients: {many:.1f} tokens/s aggregate ({many / one:.2f}x)")
    print(json.dumps({"one_client_tokens_per_s": one, "clients": a.clients, "aggregate_tokens_per_s": many, "speedup": many / one}))


if __name__ == "__main__":
    main()

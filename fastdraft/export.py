"""`fastdraft export`: a draft in the formats engines load, checked against its source after every export.

    fastdraft export runs/demo/drafts/FT --format openvino --out exports/demo-ov            # int8 IR for GenAI
    fastdraft export jobs/recipes/demo.yaml --format hf --out exports/demo-hf             # transformers assistant
    fastdraft export runs/demo --format openvino --weights int4 --with-target --out exports/pair
    fastdraft export runs/demo --format gguf --out exports/demo-gguf                      # q8_0 draft for llama.cpp -md

The source is a draft directory, a recipe (its final draft, as `fastdraft run` leaves it) or a run's workdir
(the draft that went through the most stages). An export folder holds:

    <out>/draft/        the draft: safetensors + tokenizer (hf), a stateful IR (openvino) or draft.gguf (gguf)
    <out>/target/       the target in the same format (openvino, gguf with `with_target`): a deployable pair
    <out>/export.json   what was exported from what, and the check's numbers
    <out>/README.md     the model card: target, tokenizer fingerprint, stages, measured AR and speedup, how to load

The check runs the exporting engine on the target's greedy decoding of built-in instruction prompts: the target
alone, the source draft (float32) and the exported draft, each with the same gamma. It reports the acceptance
rate (GenAI's own counters; for transformers, which reports none, fastdraft's exact offline greedy acceptance),
whether the speculative output equals the target's own token for token, and wall-clock speedup over the target
alone in that engine (metric definitions: fastdraft.evaluation.metrics). A GGUF draft (fastdraft.gguf_format) is
checked in transformers, loaded with `gguf_file=` (transformers dequantizes it: the weights are the file's, the
arithmetic float32), and its logits are compared with the source's on the check's sequences (`logits_max_abs_diff`).
llama.cpp itself is not run here.

A draft with a trimmed head (fastdraft.models.SubsetHead, `head_tokens`) keeps its -inf logits outside the subset
in OpenVINO (the IR computes the subset's logits and scatters them into a -inf vector, as fastdraft does). Plain
transformers has no such layer and Llama's output layer has no bias, so the hf export writes a full, untied output
layer whose rows outside the subset are the *mean* of the subset's rows: each such token's logit is then the mean
of the subset's logits, which is below their maximum unless all of them are equal, so greedy decoding never
proposes one (exact, by linearity). Sampling is not exact: those tokens get a little probability (see the card).
The gguf export writes the same full output layer (`output.weight`), for the same reason: llama.cpp has no such
layer either.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fastdraft.checkpoint import METADATA_FILE, DraftMetadata, load_model, read_metadata
from fastdraft.errors import FastdraftError, require
from fastdraft.gguf_format import GGUF_WEIGHTS

FORMATS = ("hf", "openvino", "gguf")
WEIGHTS = {"hf": ("f32", "f16"), "openvino": ("int8", "int4", "f16", "f32"), "gguf": GGUF_WEIGHTS}
# int8 / q8_0: the draft's AR barely moves (see the README)
DEFAULT_WEIGHTS = {"hf": "f32", "openvino": "int8", "gguf": "q8_0"}
WEIGHTS_HINTS = {"hf": "; int8/int4 come with --format openvino, q8_0 with --format gguf",
                 "openvino": "", "gguf": "; gguf's int8 is q8_0"}
GGUF_FILES = {"draft": "draft/draft.gguf", "target": "target/target.gguf"}
EXPORT_RECORD = "export.json"
AR_GOAL_POINTS = 2.0
"""An exported draft should accept within this many AR points of its float32 source."""


SOURCE_LABEL = "source draft (f32)"


@dataclass(frozen=True)
class CheckSettings:
    """How the post-export check decodes: greedy, `prompts` built-in instructions, `gamma` drafts per round."""

    prompts: int = 8
    max_new_tokens: int = 64
    gamma: int = 4
    threads: int = 0
    """OpenVINO inference threads (0: the plugin's default)."""


@dataclass
class CheckRow:
    """One line of the check: a model run in the exporting engine over the check's prompts."""

    label: str
    seconds: float
    drafted: int = 0
    accepted: int = 0
    identical: bool | None = None
    """Whether the speculative output equals the target's own greedy output on every prompt (None: the target)."""
    speedup: float | None = None
    logits_max_abs_diff: float | None = None
    """transformers check: the largest |logit - source logit| over the check's sequences (finite source logits)."""

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


# ---------------------------------------------------------------------------------------------------------------
# What to export, from what, to where: every refusal happens here, before anything is written
# ---------------------------------------------------------------------------------------------------------------

def check_request(fmt: str, weights: str | None, with_target: bool) -> str:
    """Validate the format and weights (and that the format's extra is installed); returns the weights to use."""
    if fmt not in FORMATS:
        raise FastdraftError(f"unknown export format {fmt!r} (expected one of {', '.join(FORMATS)})")
    weights = weights or DEFAULT_WEIGHTS[fmt]
    if weights not in WEIGHTS[fmt]:
        raise FastdraftError(f"--weights {weights} is not available for --format {fmt} "
                             f"(choose {', '.join(WEIGHTS[fmt])}{WEIGHTS_HINTS[fmt]})")
    if with_target and fmt == "hf":
        raise FastdraftError("--with-target is for --format openvino or gguf: an hf target already is a transformers "
                             "checkpoint")
    if fmt == "openvino":
        purpose = f"--format openvino --weights {weights}"
        for module in ("openvino", "openvino_genai", "openvino_tokenizers") + (("nncf",) if weights.startswith("int") else ()):
            require(module, "openvino", purpose)
    return weights


def resolve_draft(source: str | Path) -> Path:
    """The draft a source names: a draft directory, a recipe's final draft, or the most-trained draft of a workdir."""
    from fastdraft.config import load_recipe
    from fastdraft.pipeline import final_draft

    path = Path(source)
    if (path / METADATA_FILE).is_file():
        return path
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        draft = final_draft(load_recipe(path))
        if draft is None:
            raise FastdraftError(f"recipe {path} has no trained draft yet: run `fastdraft run {path}` first")
        return draft
    drafts = sorted(path.glob(f"drafts/*/{METADATA_FILE}")) if path.is_dir() else []
    if not drafts:
        raise FastdraftError(f"{source} is neither a draft directory ({METADATA_FILE}), a recipe (.yaml) nor a "
                             f"workdir with drafts/")
    # The draft through the most stages (PT -> CP -> FT), the latest finished among equals.
    def progress(meta_file: Path) -> tuple[int, float]:
        history = read_metadata(meta_file.parent).history
        return len(history), max((r.finished_at for r in history), default=0.0)

    return max(drafts, key=progress).parent


def check_target(draft_dir: Path, target: str | None) -> Path:
    """The draft's target directory (its metadata's unless `target` is given), refused unless it is the target
    the draft's tokenizer was made for."""
    from fastdraft.assets import resolve_model_path
    from fastdraft.tokenizer import check_compatible, check_fingerprints, load_tokenizer, tokenizer_fingerprint

    meta = read_metadata(draft_dir)
    target_dir = resolve_model_path(target or meta.target)
    target_tok = load_tokenizer(target_dir)
    if (draft_dir / "tokenizer.json").is_file() or (draft_dir / "tokenizer_config.json").is_file():
        check_compatible(target_tok, draft_dir, left=f"target {target_dir}", right=f"draft {draft_dir}")
    check_fingerprints(tokenizer_fingerprint(target_tok), meta.tokenizer_fingerprint, f"target {target_dir}",
                       f"draft {draft_dir} ({METADATA_FILE})")
    return target_dir


def check_out_dir(out: Path) -> None:
    """An export goes to a new or empty folder, or replaces a previous export (it has EXPORT_RECORD)."""
    if out.exists() and not out.is_dir():
        raise FastdraftError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_RECORD).is_file():
        raise FastdraftError(f"--out {out} is not empty and holds no previous export ({EXPORT_RECORD}): "
                             f"choose an empty or new folder; nothing was written")


# ---------------------------------------------------------------------------------------------------------------
# Output layers for engines that know no SubsetHead
# ---------------------------------------------------------------------------------------------------------------

class CompactSubsetHead(torch.nn.Module):
    """A SubsetHead whose rows are a matrix of their own, so the exported graph holds a plain [k, hidden] MatMul
    (compressible like any layer, read k rows per token) and scatters its logits into a -inf vector."""

    def __init__(self, rows: torch.Tensor, ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(rows.detach().clone(), requires_grad=False)
        self.register_buffer("ids", ids.long())
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from fastdraft.models import scatter_to_vocab

        return scatter_to_vocab(torch.nn.functional.linear(hidden, self.weight), self.ids, self.vocab_size)


def compact_head(model: PreTrainedModel) -> PreTrainedModel:
    """Replace a SubsetHead by a CompactSubsetHead (in place); a full head is left as it is."""
    from fastdraft.models import head_token_ids

    ids = head_token_ids(model)
    if ids is not None:
        head = model.get_output_embeddings()
        model.set_output_embeddings(CompactSubsetHead(head.weight[ids], ids, head.vocab_size))
    return model


def full_vocab_head(model: PreTrainedModel) -> PreTrainedModel:
    """Replace a SubsetHead by an untied full-vocabulary Linear whose rows outside the subset are the mean of the
    subset's rows (in place; see the module docstring for why greedy then never leaves the subset)."""
    from fastdraft.models import head_token_ids

    ids = head_token_ids(model)
    if ids is None:
        return model
    subset = model.get_output_embeddings().weight[ids].detach()
    rows = subset.mean(0).expand(model.config.vocab_size, -1).clone()
    rows[ids] = subset
    head = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False, dtype=rows.dtype)
    head.weight = torch.nn.Parameter(rows, requires_grad=False)
    model.config.tie_word_embeddings = False  # the input embeddings stay the draft's own
    model.set_output_embeddings(head)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------------

def write_hf(draft_dir: Path, target_dir: Path, out: Path, weights: str) -> Path:
    """The draft as a plain transformers checkpoint (safetensors) with the target's tokenizer files."""
    from fastdraft.models import TOKENIZER_FILES

    model = full_vocab_head(load_model(draft_dir))
    model.to(torch.float16 if weights == "f16" else torch.float32).save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (target_dir / name).is_file():
            shutil.copy2(target_dir / name, out / name)
    return out


def write_gguf_model(model_dir: Path, target_dir: Path, path: Path, weights: str, name: str) -> Path:
    """A draft or target directory as one GGUF file with the target's tokenizer (fastdraft.gguf_format); a trimmed
    head is written over the full vocabulary, as for hf."""
    from fastdraft.gguf_format import write_gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(full_vocab_head(load_model(model_dir)), target_dir, path, weights, name)


def load_gguf(path: Path) -> PreTrainedModel:
    """A GGUF file as transformers loads it (`gguf_file=`, dequantized to float32): no fastdraft code."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                local_files_only=True).eval()


def write_openvino(model_dir: Path, out: Path, weights: str, tokenizer: PreTrainedTokenizerBase) -> Path:
    """A draft or target directory as a stateful IR for openvino_genai (weights compressed by NNCF for int8/int4),
    with `tokenizer` converted so that the folder takes text."""
    from fastdraft.speculative.openvino import export_ir

    return export_ir(compact_head(load_model(model_dir)), out, weights, tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------------------

def check_prompts(target_dir: Path, count: int) -> list[list[int]]:
    """The first `count` built-in instruction prompts, in the target's chat template when it has one."""
    from fastdraft.evaluation.tasks import iter_instruction_texts
    from fastdraft.tokenizer import load_tokenizer

    tok = load_tokenizer(target_dir)
    texts = [t for _, t in zip(range(count), iter_instruction_texts())]
    if tok.chat_template:
        return [list(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"]) for t in texts]
    return [tok(t)["input_ids"] for t in texts]


def _timed(run, prompts: list[list[int]]) -> tuple[list, float]:
    run(prompts[0][:4])  # warm-up: first-call allocations and kernel choices are not the model's speed
    start = time.perf_counter()
    outputs = [run(p) for p in prompts]
    return outputs, time.perf_counter() - start


def _hf_greedy(target: PreTrainedModel, prompt: list[int], max_new_tokens: int,
               assistant: PreTrainedModel | None = None) -> list[int]:
    extra = {"assistant_model": assistant} if assistant is not None else {}
    with torch.inference_mode():
        out = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                              pad_token_id=target.generation_config.pad_token_id or 0, **extra)
    return out[0, len(prompt):].tolist()


def max_logit_diff(source: PreTrainedModel, exported: PreTrainedModel, sequences: list[list[int]]) -> float:
    """The largest |exported logit - source logit| over `sequences`, where the source's logit is finite (a SubsetHead
    source is -inf outside its tokens)."""
    worst = 0.0
    with torch.inference_mode():
        for seq in sequences:
            ids = torch.tensor([seq])
            want, got = source(ids).logits[0].float(), exported(ids).logits[0].float()
            finite = torch.isfinite(want)
            worst = max(worst, (got - want)[finite].abs().max().item())
    return worst


def check_hf(target: PreTrainedModel, drafts: dict[str, PreTrainedModel], prompts: list[list[int]],
             settings: CheckSettings) -> list[CheckRow]:
    """transformers' `generate` alone and with each draft as `assistant_model`; AR is fastdraft's offline greedy
    acceptance (exact under greedy: transformers itself reports no counters). Each draft but the source also gets
    its logits' largest difference from the source's, on the prompts followed by the target's answers."""
    from fastdraft.evaluation.acceptance import Continuation, offline_sweep
    from fastdraft.speculative.types import SamplingParams

    n = settings.max_new_tokens
    refs, alone = _timed(lambda p: _hf_greedy(target, p, n), prompts)
    rows = [CheckRow("target alone", alone)]
    continuations = [Continuation(p, r) for p, r in zip(prompts, refs)]
    source = drafts.get(SOURCE_LABEL)
    for label, draft in drafts.items():
        # A constant gamma, drafted to the end: the settings the AR and the other engine's rows assume.
        draft.generation_config.num_assistant_tokens = settings.gamma
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0
        outs, seconds = _timed(lambda p: _hf_greedy(target, p, n, draft), prompts)
        stats = offline_sweep(target, draft, continuations, SamplingParams(temperature=0.0), [settings.gamma], n)[settings.gamma]
        diff = None if source is None or draft is source else \
            max_logit_diff(source, draft, [p + r for p, r in zip(prompts, refs)])
        rows.append(CheckRow(label, seconds, int(stats.drafted), int(stats.accepted), outs == refs, alone / seconds, diff))
    return rows


def check_openvino(target_ir: Path, drafts: dict[str, Path], prompts: list[list[int]],
                   settings: CheckSettings) -> list[CheckRow]:
    """openvino_genai's LLMPipeline alone and with each draft IR as its `draft_model`; AR from GenAI's counters."""
    from fastdraft.speculative.openvino import GenAIPipeline

    n, g = settings.max_new_tokens, settings.gamma
    pipe = GenAIPipeline(target_ir, threads=settings.threads)
    refs, alone = _timed(lambda p: pipe.generate(p, n), prompts)
    rows = [CheckRow("target alone", alone)]
    for label, draft_ir in drafts.items():
        pipe = GenAIPipeline(target_ir, draft_ir, threads=settings.threads)
        runs, seconds = _timed(lambda p: pipe.run(p, n, g), prompts)
        rows.append(CheckRow(label, seconds, sum(r.drafted for r in runs), sum(r.accepted for r in runs),
                             [r.tokens for r in runs] == refs, alone / seconds))
    return rows


def export_and_check_transformers(fmt: str, draft_dir: Path, target_dir: Path, staging: Path, weights: str,
                                  with_target: bool, prompts: list[list[int]], settings: CheckSettings) -> list[CheckRow]:
    """hf or gguf: write the export, then check it loaded as any transformers user would (no fastdraft code, no
    metadata). With `with_target` (gguf) the target is exported too and the check decodes with the exported target."""
    target = None
    if fmt == "hf":
        exported_dir = write_hf(draft_dir, target_dir, staging / "draft", weights)
        exported = AutoModelForCausalLM.from_pretrained(exported_dir, dtype="auto", local_files_only=True).eval()
    else:
        if with_target:
            target = load_gguf(write_gguf_model(target_dir, target_dir, staging / GGUF_FILES["target"], weights,
                                                "fastdraft target"))
        exported = load_gguf(write_gguf_model(draft_dir, target_dir, staging / GGUF_FILES["draft"], weights,
                                              "fastdraft draft"))
    drafts = {SOURCE_LABEL: load_model(draft_dir), f"exported draft ({weights})": exported}
    return check_hf(load_model(target_dir) if target is None else target, drafts, prompts, settings)


def export_and_check_openvino(draft_dir: Path, target_dir: Path, staging: Path, weights: str, with_target: bool,
                              prompts: list[list[int]], settings: CheckSettings) -> list[CheckRow]:
    from fastdraft.tokenizer import load_tokenizer

    tok = load_tokenizer(target_dir)  # the pair takes text in GenAI: both folders get the target's tokenizer
    write_openvino(draft_dir, staging / "draft", weights, tok)
    with tempfile.TemporaryDirectory(prefix="fastdraft-export-") as tmp:
        # Without --with-target the check still needs the target in GenAI: float32, thrown away afterwards.
        target_ir = write_openvino(target_dir, staging / "target", weights, tok) if with_target else \
            write_openvino(target_dir, Path(tmp) / "target", "f32", tok)
        drafts = {f"exported draft ({weights})": staging / "draft"}
        if weights != "f32":  # the float32 reference, in the same engine and with the same counters
            drafts = {"source draft (f32)": write_openvino(draft_dir, Path(tmp) / "source", "f32", tok), **drafts}
        return check_openvino(target_ir, drafts, prompts, settings)


# ---------------------------------------------------------------------------------------------------------------
# The export: validate, write into a staging folder, check, record, then publish
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out: Path
    rows: list[CheckRow]
    record: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.record["check"]["identical"]


def export_draft(source: str | Path, fmt: str, out: str | Path, weights: str | None = None, target: str | None = None,
                 with_target: bool = False, settings: CheckSettings = CheckSettings()) -> ExportResult:
    """Export a draft (see `resolve_draft`) as `fmt` with `weights` to `out`, check it, write the card.

    Args:
        target: the target to check against (default: the one the draft's metadata names).
        with_target: also export the target (openvino), so `out` holds a deployable pair.
    Raises:
        FastdraftError: an unknown format or weights, a missing extra, a source that is no draft, a target whose
            tokenizer differs, or an `out` folder that holds something other than a previous export. Nothing is
            written then; a previous export in `out` is replaced only once the new one is written and checked.
    """
    weights = check_request(fmt, weights, with_target)
    draft_dir = resolve_draft(source)
    target_dir = check_target(draft_dir, target)
    if fmt == "gguf":
        from fastdraft.checkpoint import load_config
        from fastdraft.gguf_format import check_gguf_config, check_gguf_tokenizer

        check_gguf_tokenizer(target_dir)
        for model_dir in (draft_dir, target_dir) if with_target else (draft_dir,):
            check_gguf_config(load_config(model_dir))
    out = Path(out)
    check_out_dir(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        prompts = check_prompts(target_dir, settings.prompts)
        if fmt == "openvino":
            rows = export_and_check_openvino(draft_dir, target_dir, staging, weights, with_target, prompts, settings)
        else:
            rows = export_and_check_transformers(fmt, draft_dir, target_dir, staging, weights, with_target, prompts,
                                                 settings)
        meta = read_metadata(draft_dir)
        record = export_record(fmt, weights, with_target, draft_dir, target_dir, meta, rows, settings, staging)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
        (staging / "README.md").write_text(model_card(record, meta))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out)
    return ExportResult(out, rows, record)


def publish(staging: Path, out: Path) -> None:
    """Move the finished export to `out`, replacing a previous export there only now."""
    if out.exists():
        old = out.with_name(out.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def export_record(fmt: str, weights: str, with_target: bool, draft_dir: Path, target_dir: Path, meta: DraftMetadata,
                  rows: list[CheckRow], settings: CheckSettings, folder: Path) -> dict:
    """export.json: provenance, the check's rows with the AR drop from the float32 source in points, and for gguf
    what the written file holds as gguf's own reader sees it (`folder`: where the export was written)."""
    from fastdraft.models import HEAD_TOKENS_KEY

    from fastdraft.gguf_format import gguf_summary

    by_label = {r.label: r for r in rows}
    source, exported = by_label.get(SOURCE_LABEL), by_label[f"exported draft ({weights})"]
    drop = None if source is None or None in (source.acceptance_rate, exported.acceptance_rate) else \
        round(100 * (source.acceptance_rate - exported.acceptance_rate), 2)
    return {
        "format": fmt, "weights": weights, "source": str(draft_dir.resolve()), "target": meta.target, "target_dir": str(target_dir),
        "tokenizer_fingerprint": meta.tokenizer_fingerprint, "stages": [asdict(r) for r in meta.history],
        "tokens_seen": meta.tokens_seen, "head_tokens": len(meta.extra.get(HEAD_TOKENS_KEY) or []) or None,
        "files": dict(GGUF_FILES, target=GGUF_FILES["target"] if with_target else None) if fmt == "gguf" else
                 {"draft": "draft", "target": "target" if with_target else None},
        "gguf": gguf_summary(folder / GGUF_FILES["draft"]) if fmt == "gguf" else None,
        "check": {"engine": "openvino_genai" if fmt == "openvino" else "transformers", **asdict(settings),
                  "ar_source": "GenAI's counters" if fmt == "openvino" else "fastdraft offline greedy acceptance",
                  "rows": [{**asdict(r), "acceptance_rate": r.acceptance_rate} for r in rows],
                  "identical": all(r.identical for r in rows if r.identical is not None),
                  "ar_drop_points": drop, "ar_goal_points": AR_GOAL_POINTS,
                  "ar_goal_met": None if drop is None else drop <= AR_GOAL_POINTS,
                  "logits_max_abs_diff": exported.logits_max_abs_diff},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def check_table(rows: list[CheckRow]) -> str:
    """The check as a small Markdown table (printed by the CLI, embedded in the card)."""
    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = ["| model | AR | accepted / drafted | greedy = target's | seconds | speedup |", "|---|---|---|---|---|---|"]
    for r in rows:
        same = "" if r.identical is None else ("yes" if r.identical else "**NO**")
        counts = f"{r.accepted} / {r.drafted}" if r.drafted else ""
        lines.append(f"| {r.label} | {fmt(r.acceptance_rate, '.1%')} | {counts} | {same} | {r.seconds:.2f} | "
                     f"{fmt(r.speedup, '.2f')}{'x' if r.speedup else ''} |")
    return "\n".join(lines)


LOAD_SNIPPETS = {
    "hf": '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

target = AutoModelForCausalLM.from_pretrained("{target_dir}")
draft = AutoModelForCausalLM.from_pretrained("{out}/draft")          # a plain {arch}: no fastdraft code needed
tok = AutoTokenizer.from_pretrained("{out}/draft")
inputs = tok.apply_chat_template([{{"role": "user", "content": "Why does ice float?"}}], add_generation_prompt=True,
                                 return_tensors="pt", return_dict=True)
out = target.generate(**inputs, assistant_model=draft, do_sample=False, max_new_tokens=128)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:]))
```''',
    "openvino": '''```python
import openvino_genai as ov_genai

draft = ov_genai.draft_model("{out}/draft", "CPU")
pipe = ov_genai.LLMPipeline("{target_ir}", "CPU", draft_model=draft)
config = ov_genai.GenerationConfig(max_new_tokens=128, num_assistant_tokens={gamma})
print(pipe.generate("Why does ice float?", config))
```''',
    "gguf": '''llama.cpp (speculative decoding with this draft; `-md` is an option of llama-speculative and llama-server):

```bash
llama-speculative -m {target_gguf} -md ./draft/draft.gguf --draft-max {gamma} --temp 0 -n 128 -p "Why does ice float?"
llama-server -m {target_gguf} -md ./draft/draft.gguf --draft-max {gamma}
```

transformers (dequantizes the file):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

target = AutoModelForCausalLM.from_pretrained("{target_dir}")
draft = AutoModelForCausalLM.from_pretrained("./draft", gguf_file="draft.gguf")
tok = AutoTokenizer.from_pretrained("./draft", gguf_file="draft.gguf")
inputs = tok.apply_chat_template([{{"role": "user", "content": "Why does ice float?"}}], add_generation_prompt=True,
                                 return_tensors="pt", return_dict=True)
out = target.generate(**inputs, assistant_model=draft, do_sample=False, max_new_tokens=128)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:]))
```''',
}


def model_card(record: dict, meta: DraftMetadata) -> str:
    """README.md of an export folder: what the draft is for, what it saw, what the check measured, how to load it."""
    check, fmt = record["check"], record["format"]
    rows = [CheckRow(**{k: v for k, v in r.items() if k != "acceptance_rate"}) for r in check["rows"]]
    stages = "\n".join(f"| {r.stage} | {r.tokens:,} | {r.data} |" for r in meta.history) or "| (untrained) | 0 | |"
    # Without --with-target the card cannot name a target IR: the user exports it the same way.
    target_ir = "./target" if record["files"]["target"] else "TARGET_IR"
    target_gguf = f"./{record['files']['target']}" if record["files"]["target"] else "TARGET_GGUF"
    snippet = LOAD_SNIPPETS[fmt].format(out=".", target_dir=record["target_dir"], target_ir=target_ir,
                                        target_gguf=target_gguf, gamma=check["gamma"], arch=_architecture(record))
    if fmt == "openvino" and target_ir == "TARGET_IR":
        snippet += ("\n\nTARGET_IR: the target as an IR folder, e.g. `fastdraft export SOURCE --format openvino "
                    "--with-target --out DIR` writes the pair (DIR/target, DIR/draft).")
    if fmt == "gguf" and target_gguf == "TARGET_GGUF":
        snippet += ("\n\nTARGET_GGUF: the target as a GGUF file, e.g. `fastdraft export SOURCE --format gguf "
                    "--with-target --out DIR` writes DIR/target/target.gguf, or the target's own published GGUF "
                    "(llama.cpp checks that the two vocabularies agree).")
    drop = check["ar_drop_points"]
    verdict = "" if drop is None else (f"\nAR of the {record['weights']} draft: {drop:+.2f} points below the float32 source "
                                       f"(goal: within {check['ar_goal_points']:g}): "
                                       f"{'met' if check['ar_goal_met'] else 'NOT met'}.\n")
    if check.get("logits_max_abs_diff") is not None:
        verdict += (f"\nLogits of the exported draft vs the float32 source on the check's sequences: largest "
                    f"difference {check['logits_max_abs_diff']:.2g}.\n")
    if record.get("gguf"):
        g = record["gguf"]
        verdict += (f"\n`{g['file']}`: {g['bytes'] / 2**20:.1f} MiB, architecture `{g['architecture']}`, {g['tensors']} "
                    f"tensors ({', '.join(f'{n} {k}' for k, n in g['tensor_types'].items())}), tokenizer "
                    f"`{g['tokenizer']}` (pre `{g['tokenizer_pre']}`, {g['tokens']:,} tokens)"
                    f"{', output layer tied to the embeddings' if g['tied_output'] else ''}. Checked in transformers "
                    f"(`gguf_file=`), not in llama.cpp.\n")
    head = "" if not record["head_tokens"] else _head_note(fmt, record["head_tokens"])
    return f"""# fastdraft draft for `{record['target']}` ({fmt}, {record['weights']} weights)

A draft model for speculative decoding, trained by fastdraft in the target's exact tokenizer.

- target: `{record['target']}` (checked against `{record['target_dir']}`)
- tokenizer fingerprint: `{record['tokenizer_fingerprint']}` (fastdraft.tokenizer: vocabulary, merges, specials, chat template)
- source draft: `{record['source']}`
- tokens seen: {record['tokens_seen']:,}
{head}
## Training stages

| stage | tokens | data |
|---|---|---|
{stages}

## Check after export

{check['engine']}, greedy, {check['prompts']} built-in instruction prompts, {check['max_new_tokens']} new tokens,
gamma {check['gamma']}; AR from {check['ar_source']}; speedup = time(target alone) / time(speculative) in the same engine.

{check_table(rows)}
{verdict}
## Load it

{snippet}
"""


def _architecture(record: dict) -> str:
    config = Path(record["target_dir"]) / "config.json"
    return (json.loads(config.read_text()).get("architectures") or ["causal LM"])[0] if config.is_file() else "causal LM"


def _head_note(fmt: str, count: int) -> str:
    if fmt == "openvino":
        return (f"- output layer: {count:,} tokens (the draft proposes only those; the IR gives every other token "
                f"logit -inf, exactly as fastdraft's SubsetHead)\n")
    engine = "plain transformers" if fmt == "hf" else "llama.cpp (`output.weight`)"
    return (f"- output layer: trained over {count:,} tokens, written over the whole vocabulary for {engine}: "
            f"every other token's row is the mean of the trained rows, so its logit is the mean of theirs and greedy "
            f"decoding never proposes it. Under sampling those tokens keep a little probability (the target's "
            f"verification keeps the output exact either way); the full layer also reads more weights per token "
            f"than the trimmed one\n")

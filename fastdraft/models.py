"""Draft factory: the target's architecture family, scaled down, in the target's exact vocabulary.

FastDraft's drafts keep the target's `model_type`, vocabulary size, special token ids, head size and
rope settings, and shrink depth and width. Depth drives draft latency most (speedup vs depth is an
inverted U), so for a given budget we prefer few, wide-enough layers.

    fastdraft make-draft --target embedded:smollm2-135m-instruct --params 10M --out runs/draft0
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from fastdraft.checkpoint import DraftMetadata, load_config, save_draft
from fastdraft.errors import FastdraftError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "added_tokens.json")


@dataclass
class DraftShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int


def _head_dim(cfg: PretrainedConfig) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def shape_for_hidden(target: PretrainedConfig, hidden: int, layers: int) -> DraftShape:
    """Heads keep the target's head size and GQA ratio; the MLP keeps its width ratio."""
    head_dim = _head_dim(target)
    heads = max(1, hidden // head_dim)
    group = max(1, target.num_attention_heads // (getattr(target, "num_key_value_heads", None) or target.num_attention_heads))
    kv_heads = max(1, heads // group)
    while heads % kv_heads:
        kv_heads -= 1
    ratio = target.intermediate_size / target.hidden_size
    intermediate = max(head_dim, int(round(hidden * ratio / 32)) * 32)
    return DraftShape(layers, heads * head_dim, heads, kv_heads, intermediate)


def draft_config(target: PretrainedConfig, shape: DraftShape) -> PretrainedConfig:
    """The target's config with size fields replaced; vocabulary, special ids and rope are kept."""
    data = target.to_dict()
    for key in ("quantization_config", "_name_or_path", "auto_map", "architectures", "layer_types", "max_window_layers"):
        data.pop(key, None)
    data.update(
        num_hidden_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
        # Drafts tie input and output embeddings: for a large vocabulary they are most of the weights.
        tie_word_embeddings=True,
    )
    if "head_dim" in data:
        data["head_dim"] = _head_dim(target)
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    return cfg


def count_params(cfg: PretrainedConfig) -> tuple[int, int]:
    """(total parameters, embedding + head parameters) of a config, counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    emb = model.get_input_embeddings().weight.numel()
    if not cfg.tie_word_embeddings:
        emb += model.get_output_embeddings().weight.numel()
    return total, emb


def choose_shape(target: PretrainedConfig, params: int | None, layers: int | None, hidden: int | None) -> DraftShape:
    """Pick depth and width for a parameter budget (either may be fixed by the caller)."""
    if target.model_type not in SUPPORTED_FAMILIES:
        raise FastdraftError(
            f"model type '{target.model_type}' is not supported by the draft factory (supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    head_dim = _head_dim(target)
    if hidden is not None and layers is not None:
        return shape_for_hidden(target, hidden, layers)
    if params is None:
        raise FastdraftError("make-draft needs a parameter budget (--params) or both --layers and --hidden")
    widths = [hidden] if hidden else [h for h in range(head_dim, target.hidden_size + 1, head_dim)]
    best = None
    for h in widths:
        base = shape_for_hidden(target, h, 1)
        one, _ = count_params(draft_config(target, base))
        zero = count_params(draft_config(target, shape_for_hidden(target, h, 2)))[0]
        per_layer = zero - one
        emb_and_norm = one - per_layer
        exact = (params - emb_and_norm) / per_layer
        for n in [layers] if layers else sorted({max(1, int(exact)), max(1, int(exact) + 1)}):
            if emb_and_norm + n * per_layer > params * 1.1 or n > target.num_hidden_layers:
                continue
            # Within 10% of the budget, prefer >= 2 layers, then about one layer per 96 hidden units,
            # capped at 12 (depth costs latency), then the closest count.
            err = abs(emb_and_norm + n * per_layer - params) / params
            score = (err > 0.1, n < 2, abs(n - min(12, max(2, h / 96))), err)
            if best is None or score < best[0]:
                best = (score, shape_for_hidden(target, h, n))
    if best is None:
        raise FastdraftError(
            f"a budget of {params:,} parameters is too small for even one layer with this target's "
            f"{target.vocab_size:,}-token vocabulary (embeddings alone take {count_params(draft_config(target, shape_for_hidden(target, widths[0], 1)))[1]:,})"
        )
    return best[1]


class SubsetHead(torch.nn.Module):
    """An output layer over some of the vocabulary: the rows `ids` of the (tied) embedding matrix.

    The draft then proposes only those tokens (probability 0 for the rest). Speculative decoding stays exact:
    verification and rejection sampling use the target's full distribution, and q = 0 outside the subset only
    means those tokens are never proposed (they come from the residual distribution). On a small target the
    head is most of the draft's cost, so reading 8k of 49k rows is most of the saving.

    Its logits are [..., vocab] with -inf outside the subset, so every consumer of full logits (the losses, the
    offline acceptance, transformers' own generate) works unchanged; the matrix product covers the subset only.
    """

    def __init__(self, weight: torch.nn.Parameter, ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.weight = weight  # the same Parameter as the tied embedding: save_pretrained still ties them
        self.register_buffer("ids", ids.long(), persistent=False)
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return scatter_to_vocab(torch.nn.functional.linear(hidden, self.weight[self.ids]), self.ids, self.vocab_size)


def scatter_to_vocab(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits over the tokens `ids` [..., len(ids)] -> [..., vocab_size], -inf for every other token."""
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    return full.index_copy_(-1, ids, logits)


HEAD_TOKENS_KEY = "head_tokens"
"""`fastdraft.json` extra: the token ids the draft's output layer covers (absent: the whole vocabulary)."""


def restrict_head(model: PreTrainedModel, ids: list[int] | torch.Tensor) -> PreTrainedModel:
    """Give `model` a `SubsetHead` over `ids` (in place); returns the model."""
    head = model.get_output_embeddings()
    weight = head.weight
    ids = torch.as_tensor(ids, dtype=torch.long, device=weight.device)
    model.set_output_embeddings(SubsetHead(weight, ids, weight.shape[0]))
    return model


def apply_head_tokens(model: PreTrainedModel, extra: dict) -> PreTrainedModel:
    """Restrict `model`'s head to the ids a draft's metadata `extra` lists under HEAD_TOKENS_KEY (if any)."""
    ids = extra.get(HEAD_TOKENS_KEY)
    return restrict_head(model, ids) if ids else model


def head_token_ids(model: torch.nn.Module) -> torch.Tensor | None:
    """The ids a `SubsetHead` covers, or None for a full-vocabulary head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.ids if isinstance(head, SubsetHead) else None


def token_counts(token_arrays, vocab_size: int):
    """How often each id occurs over `token_arrays` (an iterable of int arrays): int64 [vocab_size]."""
    import numpy as np

    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids in token_arrays:
        ids = np.asarray(ids).ravel()
        counts += np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)
    return counts


def top_tokens(counts, count: int, always=()) -> list[int]:
    """The ids of the `count` largest `counts` (ties towards lower ids: deterministic), `always` included, sorted."""
    import numpy as np

    counts = np.array(counts, dtype=np.float64)
    forced = sorted({int(i) for i in always if 0 <= int(i) < len(counts)})
    counts[forced] = -1  # counted apart
    ranked = np.lexsort((np.arange(len(counts)), -counts))  # by count descending, then id
    return sorted(set(forced) | {int(i) for i in ranked[: max(0, count - len(forced))]})


def frequent_tokens(token_arrays, count: int, vocab_size: int, always=()) -> list[int]:
    """The `count` most frequent ids over `token_arrays`, plus `always` (special tokens), sorted."""
    return top_tokens(token_counts(token_arrays, vocab_size), count, always)


def target_layers_draft(target: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A draft made of the target's first `layers` decoder layers, its embeddings, final norm and head (weights
    copied): a layer-pruned target, initialized where the target already is (Intel publishes such drafts)."""
    from fastdraft.speculative.pairs import truncated_copy

    if layers > target.config.num_hidden_layers:
        raise FastdraftError(f"draft.layers={layers} but the target has only {target.config.num_hidden_layers} layers")
    return truncated_copy(target, layers)


def make_draft(
    target: str | Path, out: str | Path, params: int | None = None, layers: int | None = None, hidden: int | None = None,
    seed: int = 0, trust_remote_code: bool = False, init: str = "scratch",
) -> tuple[Path, str]:
    """Build an untrained draft for `target` and save it (safetensors + tokenizer + metadata) to `out`.

    Args:
        init: "scratch" (random weights in a scaled-down shape: the paper's recipe) or "target" (the target's first
            `layers` layers with its embeddings, final norm and head; `hidden` must be unset or the target's).
    Returns the directory and a short human summary (parameter count, embedding share).
    """
    from fastdraft.assets import resolve_model_path
    from fastdraft.checkpoint import load_model
    from fastdraft.tokenizer import load_tokenizer, tokenizer_fingerprint

    target_dir = resolve_model_path(str(target))
    tcfg = load_config(target_dir, trust_remote_code)
    tok = load_tokenizer(target_dir, trust_remote_code)  # checks the target has tokenizer files before writing
    if init == "target":
        if tcfg.model_type not in SUPPORTED_FAMILIES:
            raise FastdraftError(f"model type '{tcfg.model_type}' is not supported by the draft factory")
        if layers is None:
            raise FastdraftError("draft.init: target needs draft.layers (how many of the target's layers to keep)")
        if hidden not in (None, tcfg.hidden_size):
            raise FastdraftError(f"draft.init: target keeps the target's width {tcfg.hidden_size}; unset draft.hidden (got {hidden})")
        model = target_layers_draft(load_model(target_dir, trust_remote_code=trust_remote_code), layers)
        cfg = model.config
        shape = DraftShape(layers, tcfg.hidden_size, tcfg.num_attention_heads,
                           getattr(tcfg, "num_key_value_heads", None) or tcfg.num_attention_heads, tcfg.intermediate_size)
    elif init == "scratch":
        shape = choose_shape(tcfg, params, layers, hidden)
        cfg = draft_config(tcfg, shape)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    else:
        raise FastdraftError(f"unknown draft init {init!r} (expected 'scratch' or 'target')")
    total, emb = count_params(cfg)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = DraftMetadata(target=str(target), tokenizer_fingerprint=tokenizer_fingerprint(tok),
                         extra={"init": "random" if init == "scratch" else "target-layers", "seed": seed, "params": total})
    save_draft(model, None, tmp, meta)
    for name in TOKENIZER_FILES:  # copy the target's tokenizer files byte for byte
        if (target_dir / name).is_file():
            shutil.copy2(target_dir / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # nothing partial is left at `out` if anything above failed
    share = emb / total
    summary = (
        f"draft for {target} ({cfg.model_type}): {total / 1e6:.1f}M parameters, {shape.layers} layers, hidden {shape.hidden}, "
        f"{shape.heads} heads ({shape.kv_heads} kv), MLP {shape.intermediate}; embeddings+head {emb / 1e6:.1f}M = {share:.0%} of the total"
    )
    if share > 0.5:
        summary += f" (the {cfg.vocab_size:,}-token vocabulary dominates the budget: the transformer body is only {(total - emb) / 1e6:.1f}M)"
    return out, summary

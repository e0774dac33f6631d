"""OpenVINO GenAI, the paper's own deployment path on Intel CPUs: export a pair and run its speculative pipeline.

    from fastdraft.speculative.openvino import export_ir, GenAIPipeline
    export_ir(target, "runs/ov/target"); export_ir(draft, "runs/ov/draft")
    pipe = GenAIPipeline("runs/ov/target", "runs/ov/draft", threads=2)
    tokens = pipe.generate(prompt_ids, max_new_tokens=128, gamma=5)       # greedy, exactly 128 tokens

`export_ir` writes the stateful IR that `openvino_genai.LLMPipeline` reads (inputs input_ids, attention_mask,
position_ids, beam_idx; logits out; the KV cache as internal state) from the transformers model in memory, with the
project's own transformers (optimum-intel, the usual exporter, pins transformers < 5.6). Weights are stored float32
(the default), float16, or compressed to int8/int4 by NNCF (as `fastdraft export` does); computation stays float32.
GenAI's speculative pipeline insists on a tokenizer even when it is given token ids, so the folder also gets either
the model's own tokenizer, converted (text in), or a word-level tokenizer over its vocabulary (ids in, ids out).
Needs the `openvino` extra.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from fastdraft.errors import FastdraftError, require

# Float32 everywhere (the CPU plugin's KV-cache default is u8): the same arithmetic as the target it is compared to.
F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}


def _openvino():
    return require("openvino", "openvino", "OpenVINO export and GenAI pipelines")


class _WithExplicitCache(torch.nn.Module):
    """model(input_ids, attention_mask, position_ids, *past keys and values) -> (logits, *present), traceable."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        q, k = input_ids.shape[1], attention_mask.shape[1]
        causal = torch.arange(k)[None, :] <= (torch.arange(q) + (k - q))[:, None]
        mask = causal[None, None] & attention_mask[:, None, None, :].bool()  # 4D: transformers uses it as given
        cache = DynamicCache(config=self.model.config)
        for i, layer in enumerate(cache.layers):  # set directly: the lazy init concatenates onto a 1-D empty tensor
            layer.device, layer.keys, layer.values, layer.is_initialized = past[2 * i].device, past[2 * i], past[2 * i + 1], True
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
        return (out.logits, *(t for layer in out.cache.layers for t in (layer.keys, layer.values)))


IR_WEIGHTS = ("f32", "f16", "int8", "int4")
"""How `export_ir` stores weights: as traced, as float16, or compressed by NNCF (computation stays float32)."""


def export_ir(model: PreTrainedModel, out_dir: str | Path, weights: str = "f32",
              tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Write `model` (a float32 transformers causal LM with a KV cache per layer: the Llama family) as a
    stateful OpenVINO IR that GenAI's LLMPipeline loads, its weights stored as `weights` (IR_WEIGHTS). A previous
    export in `out_dir` is replaced; a folder holding anything else is refused.

    `tokenizer` (the model's transformers tokenizer) is converted for GenAI, so the folder takes text; without
    one the folder gets the word-level id tokenizer (ids in, ids out)."""
    ov = _openvino()
    if weights not in IR_WEIGHTS:
        raise FastdraftError(f"unknown IR weights {weights!r} (expected one of {', '.join(IR_WEIGHTS)})")
    ops = require("openvino.opset13", "openvino", "OpenVINO export")
    from openvino._offline_transformations import apply_make_stateful_transformation

    if next(model.parameters()).dtype != torch.float32:
        raise FastdraftError(f"export_ir writes float32 IR from a float32 model, got {next(model.parameters()).dtype}")
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):
        if not (out / "openvino_model.xml").is_file():
            raise FastdraftError(f"{out} is not empty and holds no OpenVINO export: choose an empty or new folder")
        shutil.rmtree(out)  # a previous export is replaced whole
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    example = (torch.randint(3, 100, (1, 2)), torch.ones(1, 5, dtype=torch.long), torch.arange(3, 5)[None],
               *(torch.randn(1, kv_heads, 3, head_dim) for _ in range(2 * layers)))
    names = [f"{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    with torch.no_grad():
        graph = ov.convert_model(_WithExplicitCache(model), example_input=example,
                                 input=[([-1, -1], ov.Type.i64)] * 3 + [([-1, kv_heads, -1, head_dim], ov.Type.f32)] * len(names))
    for port, name in zip(graph.inputs, ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in names]):
        port.get_tensor().set_names({name})
    for port, name in zip(graph.outputs, ["logits"] + [f"present.{n}" for n in names]):
        port.get_tensor().set_names({name})
    # GenAI feeds beam_idx and reorders the cache with it; then the cache becomes state, starting empty.
    beam = ops.parameter([-1], ov.Type.i32, name="beam_idx")
    beam.output(0).get_tensor().set_names({"beam_idx"})
    for port in graph.inputs[3:]:
        past = port.get_node()
        users = list(past.output(0).get_target_inputs())
        reordered = ops.gather(past, beam, ops.constant(0, ov.Type.i64))
        for user in users:
            user.replace_source_output(reordered.output(0))
    graph.add_parameters([beam])
    apply_make_stateful_transformation(graph, {f"past_key_values.{n}": f"present.{n}" for n in names})
    batch = ops.gather(ops.shape_of(graph.input("input_ids"), output_type="i64"), ops.constant([0]), ops.constant(0))
    empty = ops.concat([batch, *(ops.constant([d], ov.Type.i64) for d in (kv_heads, 0, head_dim))], 0)
    for op in graph.get_ops():
        if op.get_type_name() == "ReadValue":  # the CPU plugin needs an initializer: [batch, kv_heads, 0, head_dim]
            op.set_arguments([ops.broadcast(ops.constant(0.0, ov.Type.f32), empty)])
    graph.validate_nodes_and_infer_types()
    ov.save_model(compress_weights(graph, weights), out / "openvino_model.xml", compress_to_fp16=weights == "f16")
    cfg.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    _write_tokenizer(tokenizer or _id_tokenizer(cfg.vocab_size), out)
    return out


def compress_weights(graph, weights: str):
    """NNCF's data-free weight compression for "int8"/"int4" (other graphs are returned as they are).

    int8: asymmetric, one scale per output channel (NNCF's default, near-lossless). int4: asymmetric in groups
    of 128 input channels (64, 32 or 16 where 128 does not divide every layer), with NNCF's default int8 backup for the
    embeddings and the output layer, whose errors cost the most.
    """
    if weights not in ("int8", "int4"):
        return graph
    nncf = require("nncf", "openvino", "int8/int4 weight compression")
    nncf.set_log_level(logging.WARNING)  # its per-layer bitwidth table is noise in a CLI's output
    if weights == "int8":
        return nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT8_ASYM)
    widths = [int(op.get_output_partial_shape(0)[1].get_length()) for op in graph.get_ops()
              if op.get_type_name() == "Constant" and len(op.get_output_partial_shape(0)) == 2]
    group = next((g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths)), -1)  # -1: NNCF's per-channel
    return nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=group, ratio=1.0)


def _id_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """A word-level tokenizer whose token i is the word "t{i}": GenAI requires one; we only pass and read ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    words.pre_tokenizer, words.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", pad_token="t0")


def _write_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """openvino_tokenizer.xml and openvino_detokenizer.xml, converted by openvino_tokenizers."""
    ov = _openvino()
    convert = require("openvino_tokenizers", "openvino", "OpenVINO export").convert_tokenizer
    encoder, decoder = convert(tokenizer, with_detokenizer=True)
    ov.save_model(encoder, out / "openvino_tokenizer.xml")
    ov.save_model(decoder, out / "openvino_detokenizer.xml")


class GenAIPipeline:
    """openvino_genai.LLMPipeline over exported IRs: the target alone (no draft) or speculative, float32, on CPU."""

    def __init__(self, target_dir: str | Path, draft_dir: str | Path | None = None, threads: int = 0):
        ov_genai = require("openvino_genai", "openvino", "OpenVINO GenAI pipelines")
        props = {**F32, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        extra = {"draft_model": ov_genai.draft_model(str(draft_dir), "CPU", **props)} if draft_dir else {}
        self._genai, self.speculative = ov_genai, draft_dir is not None
        self._pipe = ov_genai.LLMPipeline(str(target_dir), "CPU", **extra, **props)

    def generate(self, prompt: list[int], max_new_tokens: int, gamma: int = 0) -> list[int]:
        """Greedy, exactly `max_new_tokens` new token ids (EOS ignored); `gamma` draft tokens per round, constant."""
        return self.run(prompt, max_new_tokens, gamma).tokens

    def run(self, prompt: list[int], max_new_tokens: int, gamma: int = 0) -> "GenAIRun":
        """`generate`, with the draft tokens GenAI proposed and accepted (0 and 0 without a draft)."""
        import numpy as np

        # ignore_eos runs on past EOS like transformers without an eos_token_id; min_new_tokens would instead mask
        # EOS out of the logits, and greedy output would part from the target's wherever EOS is its argmax.
        cfg = self._genai.GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True, do_sample=False)
        if self.speculative:
            cfg.num_assistant_tokens = gamma
        result = self._pipe.generate(_openvino().Tensor(np.array([prompt], dtype=np.int64)), cfg)
        tokens = [int(t) for t in result.tokens[0]]
        if not self.speculative:
            return GenAIRun(tokens, 0, 0)
        counts = result.extended_perf_metrics  # SDPerModelsPerfMetrics: the speculative pipeline's own counters
        return GenAIRun(tokens, int(counts.get_num_draft_tokens()), int(counts.get_num_accepted_tokens()))


@dataclass
class GenAIRun:
    """One greedy generation by `GenAIPipeline`: the new tokens and GenAI's draft counters (D and A of
    fastdraft.evaluation.metrics)."""

    tokens: list[int]
    drafted: int
    accepted: int

"""Where does a q8_0 GGUF export lose top-1 agreement? Diagnostics behind ``gguf_roundtrip.py``.

On the same held-out texts as ``benchmarks/gguf_roundtrip.py`` (the recipe's test split,
prompt + chosen answer through the chat template) the float32 safetensors model is compared
with copies whose weights were put through ggml's Q8_0 round trip (quantize, dequantize) one
tensor group at a time, all in transformers (no GGUF file, so only the weights differ):

1. reference check: every 2-D weight quantized by ``gguf.quants.quantize`` (what
   :mod:`orpo_core.publish.gguf` writes) is compared byte for byte with an independent
   implementation of ggml's ``quantize_row_q8_0_ref`` (blocks of 32 along a row,
   ``d = amax / 127``, ``q = roundf(x / d)`` rounding half away from zero, ``d`` stored as
   float16); with ``--gguf FILE`` also the Q8_0 tensors stored in an exported file (after the
   q/k RoPE row permutation, which moves whole rows and so whole blocks);
2. groups: ``attn`` (q, k, v, o), ``mlp`` (gate, up, down), ``embed`` (the tied token embedding
   = output matrix), their union ``linear`` (= what the q8_0 export quantizes; the tied
   embedding stays float16 there), ``embed_f16`` (only the embedding rounded to float16),
   ``all`` (linear + embedding in Q8_0, as ``convert_hf_to_gguf.py --outtype q8_0``), and for
   scale ``bf16`` (every weight rounded to bfloat16, a common way to ship the same model);
   ``act_only+act`` (weights float32, embedding float16) isolates the activation rounding;
   ``+act`` after a variant (``linear+act``) also rounds the *inputs* of its Q8_0 linear layers
   to Q8_0 blocks of 32 along the hidden axis, as llama.cpp's CPU backend does before its
   Q8_0 x Q8_0 dot products (``vec_dot_type`` of Q8_0 is Q8_0; int32 sums per block times the
   two scales equal the dequantized products); ``act:G1+G2`` rounds only the inputs of those
   linear kinds (``qkv``, ``o``, ``gateup``, ``down``) with weights Q8_0 everywhere, and
   ``f16:G`` writes linear kind ``G`` float16 (no activation rounding, as llama.cpp's f16
   kernels round activations to f16 only) with the rest Q8_0 + activation rounding, i.e. what
   ``llama-quantize --tensor-type ffn_down=f16`` would give;
3. for each: top-1 agreement with its Wilson 95 % interval, KL(ref || variant), mean / max
   |logit diff|, and the reference's top-1 minus top-2 logit gap at the disagreeing positions
   (:func:`orpo_core.publish.gguf_roundtrip.compare_logits`).

4. with ``--llama-f16 down[,o,...]``: real q8_0 exports read by llama.cpp (llama-cpp-python) on
   the same texts: the plain q8_0 file, then one file per listed kind written float16 (the rest
   Q8_0), to measure that lever where it matters.

    nice -n 5 python benchmarks/gguf_q8_diagnose.py --model RUN/train/model --n-texts 80 --json q8.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GROUPS = {
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "embed": ("embed_tokens",),
}


def q8_0_reference(w: np.ndarray) -> np.ndarray:
    """ggml's ``quantize_row_q8_0_ref`` written out independently of ``gguf.quants``: rows of
    ``w`` (float32 ``[..., K]``, ``K % 32 == 0``) -> uint8 ``[..., K / 32 * 34]`` blocks
    (2-byte float16 scale, then 32 int8)."""
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(x).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d)).astype(np.float32)
    v = (x * inv[:, None]).astype(np.float32)
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)  # C roundf: half away from zero
    out = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), q.view(np.uint8)], axis=1)
    return out.reshape(*w.shape[:-1], w.shape[-1] // 32 * 34)


def q8_0_roundtrip(w: np.ndarray) -> np.ndarray:
    """float32 weights after ``gguf.quants`` Q8_0 quantize + dequantize (what a reader of the file sees)."""
    import gguf

    Q = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), Q), Q).reshape(w.shape)


KINDS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gateup": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def _kind_of(name: str) -> str | None:
    for g, keys in KINDS.items():
        if any(k in name for k in keys):
            return g
    return None


def q8_0_activations(x):
    """torch: round a float tensor ``[..., K]`` (``K % 32 == 0``) through Q8_0 blocks along the last
    axis (``d = amax / 127`` stored float16, round to nearest), as ggml's ``quantize_row_q8_0``."""
    import torch

    shape = x.shape
    b = x.reshape(-1, shape[-1] // 32, 32).float()
    d = b.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d == 0, torch.zeros_like(b), torch.round(b / torch.where(d == 0, torch.ones_like(d), d)))
    return (q * d.half().float()).reshape(shape).to(x.dtype)


def _group_of(name: str) -> str | None:
    for g, keys in GROUPS.items():
        if any(k in name for k in keys):
            return g
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-instructions.yaml"))
    ap.add_argument("--model", required=True, help="safetensors model folder (float32 reference)")
    ap.add_argument("--n-texts", type=int, default=80)
    ap.add_argument("--gguf", default=None, help="an exported q8_0 GGUF of --model to check against the reference quantizer")
    ap.add_argument("--variants", default="linear,linear+act,act:qkv,act:o,act:gateup,act:down,f16:down,embed,all,bf16")
    ap.add_argument("--llama-f16", default=None, help="linear kinds (qkv,o,gateup,down) to try float16 in llama.cpp")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import gguf
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo_core.config import load_recipe
    from orpo_core.data.prepare import prepare_dataset
    from orpo_core.publish.gguf import _permute_rope
    from orpo_core.publish.gguf_roundtrip import compare_logits, logits_of

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    recipe = load_recipe(args.recipe)
    model_dir = Path(args.model)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    report: dict = {"model": str(model_dir), "load_average_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}

    # 1. quantizer against the reference
    state = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    checked, mism = 0, 0
    for k, w in state.items():
        if w.ndim == 2 and w.shape[-1] % 32 == 0 and k != "lm_head.weight":
            mine = gguf.quants.quantize(np.ascontiguousarray(w), gguf.GGMLQuantizationType.Q8_0)
            mism += int((mine != q8_0_reference(w)).sum())
            checked += mine.size
    report["quantizer_vs_reference"] = {"bytes_checked": checked, "bytes_different": mism}
    print(f"gguf.quants Q8_0 vs independent ggml reference: {mism} of {checked} bytes differ", file=sys.stderr)
    if args.gguf:
        from gguf import GGUFReader

        cfg = ref.config
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
        stored = {t.name: t for t in GGUFReader(args.gguf).tensors}
        n_q8, diff = 0, 0
        for k, w in state.items():
            gname = name_map.get_name(k, try_suffixes=(".weight", ".bias"))
            t = stored.get(gname or "")
            if t is None or t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
                continue
            if "q_proj" in k:
                w = _permute_rope(w, cfg.num_attention_heads)
            elif "k_proj" in k:
                w = _permute_rope(w, cfg.num_key_value_heads)
            diff += int((np.asarray(t.data).reshape(-1) != q8_0_reference(w).reshape(-1)).sum())
            n_q8 += 1
        report["gguf_file_vs_reference"] = {"q8_0_tensors": n_q8, "bytes_different": diff}
        print(f"{args.gguf}: {n_q8} Q8_0 tensors, {diff} bytes differ from the reference quantizer", file=sys.stderr)

    # relative weight error per group (Frobenius)
    rel: dict[str, list[float]] = {}
    for k, w in state.items():
        g = _group_of(k)
        if g and w.ndim == 2:
            rel.setdefault(g, []).append(float(np.linalg.norm(q8_0_roundtrip(w) - w) / np.linalg.norm(w)))
    report["q8_0_weight_rel_error"] = {g: {"mean": float(np.mean(v)), "max": float(np.max(v))} for g, v in rel.items()}

    # 2. held-out texts
    with tempfile.TemporaryDirectory(prefix="gguf-q8-") as tmp:
        prepare_dataset(recipe, Path(tmp) / "data")
        rows = pq.read_table(Path(tmp) / "data" / "test.parquet").to_pylist()
    texts = [tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False) for r in rows[: args.n_texts]]
    text_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ref_logits = [logits_of(ref, ids) for ids in text_ids]
    report["held_out"] = {"texts": len(texts), "positions": sum(map(len, text_ids))}

    def variant_state(v: str) -> dict[str, torch.Tensor]:
        out = {}
        if v.startswith("f16:"):
            keep = v[4:]
            for k, w in state.items():
                if w.ndim == 2 and _kind_of(k) is not None:
                    out[k] = torch.from_numpy(w.astype(np.float16).astype(np.float32) if _kind_of(k) == keep else q8_0_roundtrip(w))
                elif w.ndim == 2 and _group_of(k) == "embed":
                    out[k] = torch.from_numpy(w.astype(np.float16).astype(np.float32))
            return out
        if v.startswith("act:"):
            return variant_state("linear")
        for k, w in state.items():
            g = _group_of(k)
            if w.ndim != 2 or g is None:
                continue
            if v == "bf16":
                out[k] = torch.from_numpy(w).to(torch.bfloat16).float()
            elif v == "embed_f16" and g == "embed":
                out[k] = torch.from_numpy(w.astype(np.float16).astype(np.float32))
            elif (v == "linear" and g in ("attn", "mlp")) or v == g or v == "all":
                out[k] = torch.from_numpy(q8_0_roundtrip(w))
            elif v in ("linear", "act_only") and g == "embed":  # the export keeps the tied embedding float16
                out[k] = torch.from_numpy(w.astype(np.float16).astype(np.float32))
        return out

    report["variants"] = {}
    for v in [x for x in args.variants.split(",") if x]:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        base_v = v.removesuffix("+act")
        missing = set(model.load_state_dict(variant_state(base_v), strict=False).unexpected_keys)
        assert not missing, missing
        model.tie_weights()
        if v.endswith("+act"):  # attn / mlp: only that group's layers are Q8_0; act_only: fp32 weights
            act_kinds = {"attn": {"qkv", "o"}, "mlp": {"gateup", "down"}}.get(base_v, set(KINDS))
        elif v.startswith("act:"):
            act_kinds = set(v[4:].split("+"))
        elif v.startswith("f16:"):
            act_kinds = set(KINDS) - {v[4:]}
        else:
            act_kinds = set()
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and _kind_of(name) in act_kinds:
                mod.register_forward_pre_hook(lambda m, args: (q8_0_activations(args[0]),) + tuple(args[1:]))
        cmp = compare_logits(ref_logits, [logits_of(model, ids) for ids in text_ids])
        cmp["seconds"] = round(time.perf_counter() - t0, 1)
        report["variants"][v] = cmp
        print(f"{v}: {json.dumps(cmp)}", file=sys.stderr)
        del model
    if args.llama_f16 is not None:
        import orpo_core.publish.gguf as ge
        from orpo_core.publish.gguf_roundtrip import LlamaCppRunner

        gg_names = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gateup": ("ffn_gate", "ffn_up"),
                    "down": ("ffn_down",)}
        orig = ge._tensor_type
        report["llama_cpp"] = {}
        for keep in [""] + [k for k in args.llama_f16.split(",") if k]:
            names = tuple(f".{n}.weight" for n in gg_names[keep]) if keep else ()

            def patched(name, arr, quantization, tied=False, _names=names):
                if _names and name.endswith(_names):
                    return gguf.GGMLQuantizationType.F16, arr.astype(np.float16)
                return orig(name, arr, quantization, tied)

            ge._tensor_type = patched
            try:
                with tempfile.TemporaryDirectory(prefix="gguf-q8-lever-") as tmp:
                    info = ge.export_gguf(model_dir, Path(tmp) / "m.Q8_0.gguf", "q8_0")
                    t0 = time.perf_counter()
                    runner = LlamaCppRunner(info["path"], n_ctx=1024)
                    cmp = compare_logits(ref_logits, [runner.logits(ids) for ids in text_ids])
                    del runner
            finally:
                ge._tensor_type = orig
            label = f"q8_0, {keep} f16" if keep else "q8_0"
            cmp.update(size=info["size"], tensor_types=info["tensor_types"], seconds=round(time.perf_counter() - t0, 1))
            report["llama_cpp"][label] = cmp
            print(f"llama.cpp {label}: {json.dumps(cmp)}", file=sys.stderr)
    report["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which prompt positions NVIDIA's kvpress keeps, per layer and KV head: run by tests/test_kvpress.py in
.venv-kvpress (scripts/setup_kvpress.sh), since kvpress pins an older transformers than ours. Imports only
torch, transformers and kvpress.

    .venv-kvpress/bin/python tests/kvpress_positions.py HF_DIR IDS RATIO [RATIO ...]   (IDS: 1,2,3,...)

Prints JSON: {"snapkv": {"window_size": 64, "kernel_size": 5}, "kept": {press: {ratio: [layer][head] ->
sorted positions}}}. How positions are read: a press only gathers rows of the prefill's keys, so every
key left in a compressed cache is bit-identical to the row of the same layer and head in an uncompressed
run of the same model on the same prompt (a press acts after its layer's attention, so the next layers'
inputs do not change); each kept key is matched to that row. This reads kvpress's result, not its
internals (scores, top-k, tie rule), and fails loudly if a kept key matches no row or several.
"""
import json
import sys
from contextlib import nullcontext

import torch
import transformers
from transformers import DynamicCache

import kvpress


def cache_keys(model, ids, press=None):
    """[layer] -> keys [H_kv, n, D] after a prefill of ids, compressed by `press` if given."""
    cache = DynamicCache()
    with torch.no_grad(), press(model) if press else nullcontext():
        model(ids, past_key_values=cache, use_cache=True)
    return [layer.keys[0] for layer in cache.layers]


def kept_positions(full, kept):
    """[layer][head] -> sorted positions of the kept keys, each matched to one row of the full keys."""
    out = []
    for f, k in zip(full, kept):
        heads = []
        for h in range(f.shape[0]):
            same = (k[h][:, None, :] == f[h][None, :, :]).all(-1)  # [kept, T]
            if not (same.sum(-1) == 1).all():
                raise SystemExit(f"a kept key of head {h} matches {same.sum(-1).tolist()} rows of the full cache")
            heads.append(sorted(same.int().argmax(-1).tolist()))
        out.append(heads)
    return out


def main():
    hf_dir, ids, ratios = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], [float(r) for r in sys.argv[3:]]
    torch.set_num_threads(1)
    ids = torch.tensor([ids])
    presses = {"streamingllm": kvpress.StreamingLLMPress, "knorm": kvpress.KnormPress,
               "snapkv": kvpress.SnapKVPress, "tova": kvpress.TOVAPress}
    snap = kvpress.SnapKVPress()
    result = {"snapkv": {"window_size": snap.window_size, "kernel_size": snap.kernel_size},
              "streamingllm": {"n_sink": kvpress.StreamingLLMPress().n_sink}, "kept": {}}
    # ObservedAttentionPress (H2O-like, not our definition; recorded for the test's note) needs eager attention
    for attn, names in (("sdpa", presses), ("eager", {"observed_attention": kvpress.ObservedAttentionPress})):
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn)
        model.eval()
        full = cache_keys(model, ids)
        for name, press in names.items():
            result["kept"][name] = {str(r): kept_positions(full, cache_keys(model, ids, press(compression_ratio=r)))
                                    for r in ratios}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
